"""Reading user files safely (YAML without tags or aliases, bounded JSON) and writing atomically."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from cruijff.errors import CruijffError
from cruijff.yaml_emit import Unwritable, dump_plain

MAX_INPUT_BYTES = 10 * 1024 * 1024
"""Config, design and data-description files larger than this are refused, not parsed."""
MAX_DEPTH = 100
"""Lists and mappings nested deeper than this are refused: parsers, the YAML writer and
pydantic recurse, so a `[[[[...` document would otherwise end in a RecursionError. Real
configs nest fewer than ten levels."""
_REFUSED_TAGS = ("binary", "timestamp", "omap", "pairs", "set")
"""YAML types beyond JSON's: no cruijff input means them, and they break what reads the value
later (a set or bytes in a stage config). Refused, with the line, like `!!python/...` tags."""


def _refuse_tag(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None, None, f"the tag {node.tag} is not allowed (use plain JSON-like values)",
        node.start_mark)


def _checked_scalar(construct: Any, tag: str) -> Any:
    """A scalar constructor whose ValueError/KeyError (`!!int abc`, `!!bool maybe`, an
    integer of 5,000 digits) becomes a YAML error with the line, not a crash. An integer
    must also be writable in decimal (0x followed by 5,000 digits reads, but cannot be
    written back)."""
    kind = {"int": "integer", "float": "number", "bool": "boolean"}[tag]

    def checked(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        try:
            value = construct(loader, node)
            if isinstance(value, int) and not isinstance(value, bool):
                str(value)  # Python refuses beyond sys.get_int_max_str_digits() digits
            return value
        except (ValueError, KeyError):
            text = str(node.value)
            shown = text if len(text) <= 40 else f"{text[:40]}... ({len(text)} characters)"
            raise yaml.constructor.ConstructorError(
                None, None, f"{shown!r} is not a valid {kind}", node.start_mark) from None

    return checked


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


for _loader in (_StrictLoader, _FastLoader):
    # YAML 1.1 reads "1e-4" as a string; researchers (and torchtune's configs) mean a float.
    _loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
        list("-+0123456789."),
    )
    # ... and "2024-13-45" as a date (a crash when it is no date): a date is a string here.
    for _first, _resolvers in _loader.yaml_implicit_resolvers.items():
        _resolvers[:] = [r for r in _resolvers if r[0] != "tag:yaml.org,2002:timestamp"]
    for _tag in _REFUSED_TAGS:
        _loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_tag)
    for _kind in ("int", "float", "bool"):
        _tag = f"tag:yaml.org,2002:{_kind}"
        _loader.add_constructor(_tag, _checked_scalar(_loader.yaml_constructors[_tag], _kind))


def _too_deep(source: str) -> CruijffError:
    return CruijffError(f"{source}: nested more than {MAX_DEPTH} levels deep: "
                        "flatten the lists and mappings")


def _inspect(data: Any, source: str, *, stop_at_shared: bool = True, start: int = 0) -> bool:
    """Walk a parsed document once: refuse nesting deeper than MAX_DEPTH and strings that
    cannot be written as UTF-8 (a lone surrogate such as "\\ud800"); return whether a list
    or mapping occurs twice in the tree (what a YAML alias produces). Stops at the first
    repeat, so an exponential 'billion laughs' document costs linear time. `start`: the
    depth `data` is at."""
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(data, start)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if stop_at_shared and id(item) in seen:
                return True
            if depth >= MAX_DEPTH:
                raise _too_deep(source)
            seen.add(id(item))
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, str) and not item.isascii():
            _check_utf8(item, source)
    return False


def _check_utf8(text: str, source: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CruijffError(
            f"{source}: a string holds {text[exc.start]!r}, which is not a Unicode "
            "character (a lone surrogate escape): write the character itself"
        ) from None


_WRITING = "cannot write a value"


_STR, _INT, _BOOL, _NULL = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "bool", "null"))
_MAP, _SEQ = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"
_RESOLVED: dict[tuple[Any, Any, Any], str] = {}
"""Memo of the resolver's answer per scalar text: a build writes the same keys and values
for every trial, and the C emitter asks the (Python, regex) resolver about each one."""


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """Never writes aliases: cruijff's own files must load with the strict loader, and a
    value shared between trials (one controls list) would otherwise become &id001/*id001.

    Fast (a 1,000-trial build writes some 3,000 files): libyaml's emitter where available,
    and for the plain types cruijff writes (dict, list, str, int, bool, None) the nodes
    SafeRepresenter makes, built in one call each; other types go the representer's way.
    The text is the same, byte for byte (tests/test_caches.py). What _inspect refuses (too
    deep, a lone surrogate) it refuses on the way, instead of in a walk of its own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._depth = 0  # lists and mappings around the value being represented

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def represent_data(self, data: Any) -> yaml.Node:
        kind = type(data)
        if kind is str:
            if not data.isascii():
                _check_utf8(data, _WRITING)
            return yaml.ScalarNode(_STR, data, style=self.default_style)
        if kind is dict or kind is list:
            if self._depth >= MAX_DEPTH:
                raise _too_deep(_WRITING)
            self._depth += 1
            try:
                if kind is dict:
                    pairs = [(self.represent_data(k), self.represent_data(v))
                             for k, v in data.items()]
                    return self._collection(yaml.MappingNode(_MAP, pairs), pairs)
                items = [self.represent_data(item) for item in data]
                return self._collection(yaml.SequenceNode(_SEQ, items),
                                        [(i, i) for i in items])
            finally:
                self._depth -= 1
        if kind is bool:
            return yaml.ScalarNode(_BOOL, "true" if data else "false", style=self.default_style)
        if kind is int:
            return yaml.ScalarNode(_INT, str(data), style=self.default_style)
        if data is None:
            return yaml.ScalarNode(_NULL, "null", style=self.default_style)
        _inspect(data, _WRITING, stop_at_shared=False, start=self._depth)
        return super().represent_data(data)  # type: ignore[no-any-return]

    def _collection(self, node: yaml.Node, pairs: list[tuple[yaml.Node, yaml.Node]]
                    ) -> yaml.Node:
        """SafeRepresenter's flow style for a mapping or sequence node."""
        if self.default_flow_style is not None:
            node.flow_style = self.default_flow_style
        else:
            node.flow_style = all(isinstance(n, yaml.ScalarNode) and not n.style
                                  for pair in pairs for n in pair)
        return node

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        if kind is not yaml.ScalarNode or self.yaml_path_resolvers:  # (never set here)
            return super().resolve(kind, value, implicit)  # type: ignore[no-any-return]
        key = (kind, value, implicit)
        tag = _RESOLVED.get(key)
        if tag is None:
            if len(_RESOLVED) > 100_000:  # a long-lived process writing ever new values
                _RESOLVED.clear()
            tag = _RESOLVED[key] = super().resolve(kind, value, implicit)
        return tag


def read_text(path: Path, what: str) -> str:
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
    """Parse YAML text (safe: no tags, no aliases, bounded nesting); any error names the
    source and, where the parser knows it, the line."""
    try:
        data = yaml.load(text, Loader=_FastLoader)  # a SafeLoader subclass
        if not _inspect(data, source):
            return data
    except yaml.YAMLError:
        pass  # the strict loader below says what is wrong, with the line
    except RecursionError:
        raise _too_deep(source) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CruijffError(f"{source}:{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise _too_deep(source) from None
    _inspect(data, source)
    return data


def load_yaml(path: Path, what: str = "YAML file") -> Any:
    return parse_yaml(read_text(path, what), str(path))


def load_yaml_mapping(path: Path, what: str = "YAML file", text: str | None = None
                      ) -> dict[str, Any]:
    """Load a YAML file that must hold a mapping (an empty file is an empty mapping);
    `text`: the file's text, already read."""
    data = load_yaml(path, what) if text is None else parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CruijffError(f"{what} {path} must hold a mapping (key: value), not {type_name(data)}")
    return data


def _no_constant(name: str) -> Any:
    raise CruijffError(f"{name} is not a JSON number")


def parse_json(text: str, source: str) -> Any:
    """Parse JSON text (strict: no NaN, bounded size and nesting); errors name the source."""
    if len(text) > MAX_INPUT_BYTES:
        raise CruijffError(f"{source} is {len(text)} characters; the limit is {MAX_INPUT_BYTES}")
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise CruijffError(
            f"{source}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except CruijffError as exc:
        raise CruijffError(f"{source}: {exc}") from None
    except ValueError:  # int(): Python refuses integers of thousands of digits
        raise CruijffError(f"{source}: a number has more than {sys.get_int_max_str_digits()} "
                           "digits") from None
    except RecursionError:
        raise _too_deep(source) from None
    _inspect(data, source)
    return data


def load_json(path: Path, what: str = "JSON file") -> Any:
    return parse_json(read_text(path, what), str(path))


def type_name(value: Any) -> str:
    """A user-facing name for a parsed value's type."""
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def dump_yaml(data: Any) -> str:
    """YAML text of `data`, refused (before anything is written) if it nests so deep that
    cruijff could not read the file back."""
    return _dump(data, 80)


def dump_yaml_unfolded(data: Any) -> str:
    """dump_yaml without folding long strings across lines: each key's value starts on the
    key's line, and a value without line breaks stays on it (so a comment can follow it;
    cruijff/yaml_comments.py)."""
    return _dump(data, 10**9)


def _dump(data: Any, width: int) -> str:
    """cruijff/yaml_emit.py's text where it is sure of it, else PyYAML's (the same text)."""
    try:
        return dump_plain(data, width=width, max_depth=MAX_DEPTH)
    except Unwritable:
        return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         allow_unicode=True, width=width)


def umask() -> int:
    """The process umask, read without changing it (os.umask can only swap, which races
    with threads creating files); cruijff's own files honour it so colleagues sharing a
    project folder can read results."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file and rename, so readers never see half a file; the file gets
    the mode a plain open() would (mkstemp's is owner-only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(value: Any) -> Any:
    """Non-finite floats (a diverged loss) become None: JSON has no NaN, and tools reading
    cruijff's --json output must be able to parse it. Dataclass instances become dicts, as
    dataclasses.asdict makes them but without its deep copies (a 1,000-trial summary's)."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: json_safe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


LOCK_PATIENCE_S = 1.0
"""A look at a run lock (summary, progress, build --force) holds it for an instant: whoever
wants it for real tries again for this long before refusing."""


def lock_within(handle: Any, seconds: float = LOCK_PATIENCE_S) -> None:
    """An exclusive flock on an open file, tried for `seconds`; BlockingIOError if still held."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
