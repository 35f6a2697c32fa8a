"""What a YAML text parses to, kept by the text's sha256 in a JSON file: commands over a
1,000-trial experiment parsed 1,000 trial configs (and 2,000 stage configs) each time, seconds
of a `summary`. What a text parses to does not change; a cache file names the cruijff and
PyYAML versions that wrote it and is ignored under others. Losing a race to write it, or a
read-only folder, costs only a parse next time."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from cruijff.fileio import atomic_write_text, dump_yaml, load_yaml_mapping, read_text

PARSED_CONFIGS = "parsed-configs.json"
"""In an experiment's records folder: its config.yaml files' data, written by the build."""


@functools.cache
def _tag() -> str:
    import yaml

    from cruijff import __version__

    return f"cruijff {__version__}, PyYAML {yaml.__version__}"


def read_cache(file: Path) -> dict[str, Any]:
    """The entries of a cache file ({} when absent, unreadable or written under other
    versions)."""
    try:
        stored = json.loads(file.read_text(encoding="utf-8"))
        if stored.get("written_by") == _tag() and isinstance(stored["texts"], dict):
            return stored["texts"]  # type: ignore[no-any-return]
    except (OSError, ValueError, AttributeError, KeyError, TypeError, RecursionError):
        pass  # a damaged (or hostile, nested too deep) file is not believed
    return {}


def cache_text(entries: dict[str, Any]) -> str:
    return json.dumps({"written_by": _tag(), "texts": entries})


def write_cache(file: Path, entries: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        atomic_write_text(file, cache_text(entries))


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class BuiltFiles(dict[str, str]):
    """A build's files (relative path -> text) that keep the data of the YAML mappings every
    later command parses again (the experiment's and each trial's config.yaml): the build
    writes them, and their cache (`cache_text()`) for ParsedMappings."""

    def __init__(self) -> None:
        super().__init__()
        self.parsed: dict[str, Any] = {}

    def add_mapping(self, relative: str, data: dict[str, Any]) -> None:
        text = self[relative] = dump_yaml(data)
        with contextlib.suppress(TypeError, ValueError):
            if json.loads(json.dumps(data)) == data:  # kept only if JSON gives it back as is
                self.parsed[text_sha(text)] = data

    def cache_text(self) -> str:
        return cache_text(self.parsed)


class ParsedMappings:
    """YAML mappings read through a cache file the build wrote; a file edited since (its
    text's hash unknown) is parsed. Never writes: a command that only reads, or one refused,
    leaves the experiment as it was."""

    def __init__(self, file: Path) -> None:
        self.known = read_cache(file)

    def mapping(self, path: Path, what: str) -> dict[str, Any]:
        """load_yaml_mapping(path, what), from the cache when the build wrote this text; the
        same errors for a missing, unreadable or invalid file."""
        raw = read_text(path, what)
        data = self.known.get(text_sha(raw))
        return data if isinstance(data, dict) else load_yaml_mapping(path, what, text=raw)
