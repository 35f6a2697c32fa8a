"""Editing an experiment config in place: `cruijff resources --apply` sets figures under
`resources.<model>.stages.<stage>` and nothing else.

ruamel.yaml's round trip keeps the file's comments, key order, quoting and indentation; the
result is checked to read (with cruijff's own loader) as the old file plus those values, and
to pass ExperimentConfig.load, before it replaces the file atomically; the old file is kept
in `<folder>/.archive/`.
"""

from __future__ import annotations

import difflib
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cruijff.errors import CruijffError
from cruijff.experiment import ARCHIVE
from cruijff.fileio import parse_yaml
from cruijff.settings import ExperimentConfig


@dataclass
class Edit:
    """A planned edit of an experiment's source config."""

    path: Path
    old: str
    new: str
    changes: dict[tuple[str, str], dict[str, Any]]
    """(model key, stage) -> the values written under resources.<key>.stages.<stage>."""

    def diff(self) -> str:
        return "".join(difflib.unified_diff(
            self.old.splitlines(keepends=True), self.new.splitlines(keepends=True),
            fromfile=str(self.path), tofile=f"{self.path} (suggested)"))


def _round_trip() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: comments, order and quoting stay as they are
    yaml.preserve_quotes = True
    yaml.width = 4096
    return yaml


def _indents(text: str) -> tuple[int, int]:
    """(mapping indent, dash offset of block sequences) the file uses: 2 and 0 (how
    cruijff and PyYAML write YAML) unless its first nested mapping / sequence says else."""
    mapping = sequence = None
    parent: tuple[int, str] | None = None
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        if not stripped or stripped.startswith("#"):
            continue
        depth = len(line) - len(stripped)
        if parent is not None and parent[1].endswith(":") and depth >= parent[0]:
            if stripped.startswith("- ") and sequence is None:
                sequence = depth - parent[0]
            elif not stripped.startswith("- ") and depth > parent[0] and mapping is None:
                mapping = depth - parent[0]
        parent = (depth, stripped.split(" #")[0].rstrip())
    return mapping or 2, sequence or 0


def _deepest_last(node: Any) -> tuple[Any, Any] | None:
    """(mapping, key) of the last key at the bottom of a block mapping's last values: where
    ruamel keeps the blank lines and comments that follow the mapping."""
    from ruamel.yaml.comments import CommentedMap

    found = None
    while isinstance(node, CommentedMap) and node and not node.fa.flow_style():
        key = list(node)[-1]
        found, node = (node, key), node[key]
    return found


def _take_trailing(node: Any) -> str:
    """Remove and return what follows a block mapping (blank lines, the next section's
    comments), leaving its last line's own end-of-line comment where it is."""
    spot = _deepest_last(node)
    slots = spot[0].ca.items.get(spot[1]) if spot else None
    if not slots or len(slots) < 3 or slots[2] is None:
        return ""
    token = slots[2]
    own, newline, rest = token.value.partition("\n")
    if own.lstrip().startswith("#"):
        token.value = own + newline
    else:
        slots[2] = None
    return rest


def _put_trailing(node: Any, rest: str) -> None:
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    spot = _deepest_last(node)
    if rest and spot is not None:
        token = CommentToken("\n" + rest, CommentMark(0), None)
        spot[0].ca.items[spot[1]] = [None, None, token, None]


def _set(data: Any, path: tuple[str, ...], values: dict[str, Any], where: Path) -> None:
    """Set values in the mapping at `path`, making the missing mappings (block style, placed
    before what followed the mapping they join)."""
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    node, made, trailing = data, None, ""
    for part in path:
        if node.get(part) is None:
            if made is None:
                made = (node, part)
                trailing = "" if node.fa.flow_style() else _take_trailing(node)
            node[part] = CommentedMap()
        node = node[part]
        if not isinstance(node, CommentedMap):
            raise CruijffError(f"--apply: {where}: {'.'.join(path)}: {part} is not a mapping")
    for name, value in values.items():
        node[name] = DoubleQuotedScalarString(value) if isinstance(value, str) else value
    if made is not None:
        _put_trailing(made[0][made[1]], trailing)


def edit_resources(path: Path, wanted: Callable[[ExperimentConfig],
                                                dict[tuple[str, str], dict[str, Any]]]) -> Edit:
    """The config at `path` with `wanted(config)`'s values, (model key, stage) -> values,
    set under resources.<key>.stages.<stage>, where they differ from the file's (ruamel.yaml
    round trip: comments, order, quoting and indentation stay); nothing else changed
    (checked)."""
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.error import YAMLError

    path = path.expanduser().resolve()
    try:
        old = path.read_text(encoding="utf-8")
        yaml = _round_trip()
        mapping, offset = _indents(old)
        yaml.indent(mapping=mapping, sequence=offset + 2, offset=offset)
        data = yaml.load(old)
    except OSError as exc:
        raise CruijffError(f"--apply: cannot read the config {path}: {exc.strerror} (give it "
                           "with --config)") from None
    except YAMLError as exc:
        raise CruijffError(f"--apply: {path} is not YAML cruijff can edit: "
                           f"{str(exc).splitlines()[0]}") from None
    if data is None:
        data = CommentedMap()
    if not isinstance(data, CommentedMap):
        raise CruijffError(f"--apply: {path} does not hold a mapping")
    changes = {k: v for k, v in wanted(ExperimentConfig.load(path)).items() if v}
    for (key, stage), values in changes.items():
        _set(data, ("resources", key, "stages", stage), values, path)
    text = io.StringIO()
    yaml.dump(data, text)
    new = text.getvalue() if changes else old
    _check_only_resources_changed(path, old, new, changes)
    return Edit(path, old, new, changes)


def _check_only_resources_changed(path: Path, old: str, new: str,
                                  changes: dict[tuple[str, str], dict[str, Any]]) -> None:
    expected = parse_yaml(old, str(path)) or {}
    for (key, stage), values in changes.items():
        node = expected
        for part in ("resources", key, "stages", stage):
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node.update(values)
    if parse_yaml(new, str(path)) != expected:
        raise CruijffError(f"--apply: editing {path} would change more than resources; "
                           "copy the suggestion in by hand")


def write_edit(edit: Edit) -> Path:
    """Archive the old config (`<folder>/.archive/<name>-<time>`), then write the new one
    atomically, after it passed ExperimentConfig.load; returns the archived copy."""
    path = edit.path
    if path.read_text(encoding="utf-8") != edit.old:
        raise CruijffError(f"{path} changed since it was read: run `cruijff resources` again")
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(edit.new)
        os.chmod(temporary, path.stat().st_mode & 0o7777)
        try:
            ExperimentConfig.load(Path(temporary))
        except CruijffError as exc:
            raise CruijffError(str(exc).replace(temporary, str(path))) from None
        archive = path.parent / ARCHIVE / (
            f"{path.stem}-{datetime.now():%Y%m%d-%H%M%S-%f}{path.suffix}")
        archive.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, archive)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return archive
