"""Reading user files safely (YAML without tags or aliases, bounded JSON) and writing atomically."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from cruijff.errors import CruijffError

MAX_INPUT_BYTES = 10 * 1024 * 1024
"""Config, design and data-description files larger than this are refused, not parsed."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that also refuses aliases, so a 'billion laughs' file cannot expand."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases (*name) are not allowed", event.start_mark
            )
        return super().compose_node(parent, index)


class _FastLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml's safe loader: the pure-Python one takes seconds on a 1,000-trial experiment.
    It resolves aliases to shared objects, which parse_yaml detects and then re-reads with
    _StrictLoader for the error message."""


# YAML 1.1 reads "1e-4" as a string; researchers (and torchtune's configs) mean a float.
for _loader in (_StrictLoader, _FastLoader):
    _loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
        list("-+0123456789."),
    )


def _shares_objects(data: Any) -> bool:
    """Whether a list or mapping occurs twice in the tree: what a YAML alias produces. Stops
    at the first repeat, so an exponential 'billion laughs' document costs linear time."""
    seen: set[int] = set()
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict | list):
            if id(item) in seen:
                return True
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)
    return False


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """Never writes aliases: cruijff's own files must load with the strict loader, and a
    value shared between trials (one controls list) would otherwise become &id001/*id001."""

    def ignore_aliases(self, data: Any) -> bool:
        return True



def _read_text(path: Path, what: str) -> str:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CruijffError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise CruijffError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not path.is_file():
        raise CruijffError(f"{what} is not a file: {path}")
    if size > MAX_INPUT_BYTES:
        raise CruijffError(f"{what} {path} is {size} bytes; the limit is {MAX_INPUT_BYTES}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CruijffError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise CruijffError(f"cannot read {what} {path}: {exc.strerror}") from None


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text (safe: no tags, no aliases); any error names the source and line."""
    try:
        data = yaml.load(text, Loader=_FastLoader)  # a SafeLoader subclass
        if not _shares_objects(data):
            return data
    except yaml.YAMLError:
        pass  # the strict loader below says what is wrong, with the line
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CruijffError(f"{source}:{where}: invalid YAML: {problem}") from None


def load_yaml(path: Path, what: str = "YAML file") -> Any:
    return parse_yaml(_read_text(path, what), str(path))


def load_yaml_mapping(path: Path, what: str = "YAML file") -> dict[str, Any]:
    """Load a YAML file that must hold a mapping (an empty file is an empty mapping)."""
    data = load_yaml(path, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CruijffError(f"{what} {path} must hold a mapping (key: value), not {type_name(data)}")
    return data


def parse_json(text: str, source: str) -> Any:
    if len(text) > MAX_INPUT_BYTES:
        raise CruijffError(f"{source} is {len(text)} characters; the limit is {MAX_INPUT_BYTES}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CruijffError(
            f"{source}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise CruijffError(f"{source}: JSON nested too deeply") from None


def load_json(path: Path, what: str = "JSON file") -> Any:
    return parse_json(_read_text(path, what), str(path))


def type_name(value: Any) -> str:
    """A user-facing name for a parsed value's type."""
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
