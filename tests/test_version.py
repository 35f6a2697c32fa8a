"""One version: the package metadata pip and uv see is what `cruijff --version` prints."""

from __future__ import annotations

from importlib import metadata

from cruijff import __version__


def test_version_flag_and_command_print_the_installed_version(cli):
    assert metadata.version("cruijff") == __version__
    for args in (["--version"], ["version"]):
        result = cli(*args)
        assert result.code == 0 and result.out.strip() == f"cruijff {__version__}"
