"""The YAML text PyYAML writes for cruijff's own plain data, written without PyYAML's
representer and emitter: a 1,000-trial build writes some 3,000 files, and PyYAML's pipeline
(node per value, event per node, a resolver call per scalar) was a third of it.

Only what it can be sure of: block style, indent 2, mappings with plain string keys, lists,
and scalars that PyYAML writes plain or in single quotes (str, int, bool, None, finite
float). Anything else (a
string that needs quotes, a line PyYAML would fold, non-ASCII text, deep nesting, another
type) raises Unwritable, and the caller writes the document with PyYAML instead. The text is
the same, byte for byte (tests/test_caches.py compares them on random documents).
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

_STR = "tag:yaml.org,2002:str"
_PLAIN = re.compile(r"[A-Za-z0-9_./=+-][A-Za-z0-9_./=+@():-]*(?: [A-Za-z0-9_./=+@():-]+)*\Z")
"""Strings without characters that make YAML indicators, quotes or escapes ('#', ',',
brackets, quotes, '*', '&', '!', '|', '>', '%', '~', '@' or ':' first, line breaks, tabs)
and without leading, trailing or double spaces (': ' and a ':' at the end are refused
apart)."""
_PRINTABLE = re.compile(r"[\x20-\x7e]*\Z")
"""One line of printable ASCII: PyYAML writes it in single quotes when it would read back as
another type."""
_KEY_LIMIT = 128
"""PyYAML writes a longer key as a complex key ("? ")."""
_written: dict[str, str | None] = {}
"""Memo of _text (a build writes the same keys and values for every trial)."""
_resolver = yaml.resolver.Resolver()


class Unwritable(Exception):
    """Not something this writer is sure to write as PyYAML would."""


def _text(value: str) -> str | None:
    """The string as PyYAML writes it: plain, single-quoted, or None where unsure."""
    if value in _written:
        return _written[value]
    text: str | None = None
    if _PRINTABLE.match(value):
        if _resolver.resolve(yaml.ScalarNode, value, (True, False)) != _STR:
            text = "'" + value.replace("'", "''") + "'"  # it would read back as another type
        elif (_PLAIN.match(value) and ": " not in value and not value.endswith(":")
              and not value.startswith(("---", "...", "- ")) and value != "-"):
            text = value
    if len(_written) > 100_000:  # a long-lived process writing ever new values
        _written.clear()
    _written[value] = text
    return text


def _scalar(value: Any) -> str:
    kind = type(value)
    if kind is str:
        text = _text(value)
        if text is None:
            raise Unwritable
        return text
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if value is None:
        return "null"
    if kind is float and math.isfinite(value):
        text = repr(value).lower()
        if "." not in text and "e" in text:
            text = text.replace("e", ".0e", 1)
        if _resolver.resolve(yaml.ScalarNode, text, (True, False)) == _STR:
            raise Unwritable  # (never seen: repr of a finite float reads back as a float)
        return text
    raise Unwritable


def dump_plain(data: Any, *, width: int, max_depth: int) -> str:
    """`data` as PyYAML's block-style dump with `width` writes it; Unwritable if unsure."""
    lines: list[str] = []
    if type(data) is dict:
        if not data:
            return "{}\n"
        _mapping(data, "", "", lines, width, max_depth)
    elif type(data) is list:
        if not data:
            return "[]\n"
        _sequence(data, "", "", lines, width, max_depth)
    else:
        raise Unwritable  # a lone scalar ends with a document end marker: PyYAML's way
    lines.append("")
    return "\n".join(lines)


def _leaf(lines: list[str], prefix: str, value: Any, width: int) -> None:
    """Add the line of a scalar or an empty mapping or list after `prefix` ("key: ", "- ").
    PyYAML folds a string with spaces at a space past `width`: such a line is refused."""
    if type(value) is dict and not value:
        lines.append(prefix + "{}")
    elif type(value) is list and not value:
        lines.append(prefix + "[]")
    else:
        text = prefix + _scalar(value)
        if type(value) is str and " " in value and len(text) > width:
            raise Unwritable
        lines.append(text)


def _nested(value: Any, indent: str, lines: list[str], width: int, depth: int) -> None:
    """The lines of a non-empty mapping or list that sits under a key."""
    if type(value) is dict:
        _mapping(value, indent + "  ", indent + "  ", lines, width, depth - 1)
    else:
        _sequence(value, indent, indent, lines, width, depth - 1)


def _mapping(data: dict[Any, Any], first: str, indent: str, lines: list[str], width: int,
             depth: int) -> None:
    """`first`: what the first key's line starts with ("- " items put their first key on the
    item's line)."""
    if depth <= 0:
        raise Unwritable
    lead = first
    for key, value in data.items():
        if type(key) is not str or len(key) >= _KEY_LIMIT or " " in key or _text(key) != key:
            raise Unwritable
        if type(value) in (dict, list) and value:
            lines.append(f"{lead}{key}:")
            _nested(value, indent, lines, width, depth)
        else:
            _leaf(lines, f"{lead}{key}: ", value, width)
        lead = indent


def _sequence(data: list[Any], first: str, indent: str, lines: list[str], width: int,
              depth: int) -> None:
    if depth <= 0:
        raise Unwritable
    lead = first
    for item in data:
        if type(item) is dict and item:
            _mapping(item, f"{lead}- ", indent + "  ", lines, width, depth - 1)
        elif type(item) is list and item:
            _sequence(item, f"{lead}- ", indent + "  ", lines, width, depth - 1)
        else:
            _leaf(lines, f"{lead}- ", item, width)
        lead = indent
