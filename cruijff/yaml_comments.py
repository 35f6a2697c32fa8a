"""A generated config written with the comments of the file it started from.

Why: a trial's finetune.yaml is what a researcher reads, edits and runs by hand; with the
comments of the torchtune or cruijff config it came from, it reads like torchtune's own
configs. How, cheaply (a build writes one per trial, and 1,000 trials build in seconds):
the template's comments are read once per file (by the key they stand above or beside), the
config is dumped as before, and each comment is put back at its key's line. No comment may
contradict the value written: a key whose value differs from the template's loses its
end-of-line comment (unless the template's value was the FILLED_BY_CRUIJFF placeholder,
whose comment says what cruijff fills in), and a section whose `_component_` changed loses
all the comments in it (they described the other component).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cruijff.fileio import dump_yaml, dump_yaml_unfolded, parse_yaml

PLACEHOLDER = "FILLED_BY_CRUIJFF"
"""What cruijff's own templates hold where the build fills in a value (cruijff/configs)."""
COMPONENT = "_component_"
INDENT = 2
"""The indentation of dump_yaml's nested mappings."""
LINE_BREAKS = ("\n", "\r", "\x85", "\u2028", "\u2029")

KeyPath = tuple[Any, ...]


@dataclass(frozen=True)
class Comments:
    """A template key's comments: the comment (and blank) lines right above it, and the one
    at the end of its line."""

    above: tuple[str, ...]
    inline: str | None


@dataclass(frozen=True)
class Template:
    comments: dict[KeyPath, Comments]
    data: dict[str, Any]
    inside: frozenset[KeyPath]
    """The mappings with a comment on a key below them."""


class _Lost(Exception):
    """The dump does not have the expected key where expected: write it without comments."""


def _inline(line: str, start: int) -> str | None:
    rest = line[start:].strip()
    if rest.startswith(":"):
        rest = rest[1:].strip()
    return rest if rest.startswith("#") else None


def _collect(node: yaml.MappingNode, lines: list[str], prefix: KeyPath,
             out: dict[KeyPath, Comments]) -> None:
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        path = (*prefix, key_node.value)
        line = key_node.start_mark.line
        above: list[str] = []
        row = line - 1
        while row >= 0 and (not lines[row].strip() or lines[row].lstrip().startswith("#")):
            above.append(lines[row].strip())
            row -= 1
        ends_here = value_node.end_mark.line == line and not isinstance(value_node,
                                                                        yaml.MappingNode)
        start = value_node.end_mark.column if ends_here else key_node.end_mark.column
        inline = _inline(lines[line], start)
        if inline or any(above):
            out[path] = Comments(tuple(reversed(above)), inline)
        if isinstance(value_node, yaml.MappingNode):
            _collect(value_node, lines, path, out)


@functools.lru_cache(maxsize=16)
def _read_template(path: Path, stamp: tuple[int, int]) -> Template:
    """The template's comments by key path, and its values; read once per file version."""
    text = path.read_text(encoding="utf-8")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    node = yaml.compose(text, Loader=loader)
    comments: dict[KeyPath, Comments] = {}
    if isinstance(node, yaml.MappingNode):
        _collect(node, text.splitlines(), (), comments)
    data = parse_yaml(text, str(path))
    inside = frozenset(path[:cut] for path in comments for cut in range(1, len(path)))
    return Template(comments, data if isinstance(data, dict) else {}, inside)


def read_template(path: Path) -> Template | None:
    try:
        stat = path.stat()
        return _read_template(path, (stat.st_size, stat.st_mtime_ns))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


@functools.lru_cache(maxsize=1024)
def _key_text(key: Any) -> str:
    """How the dump writes a key (quoted where YAML needs it: 'on', '1')."""
    return dump_yaml({key: 0}).rsplit(":", 1)[0]


_MISSING = object()


def _one_line(value: Any) -> bool:
    if isinstance(value, str):
        return not any(mark in value for mark in LINE_BREAKS)
    return True  # numbers, booleans, null; a mapping's or list's comment goes on its key line


def _kept_inline(comment: str | None, old: Any, new: Any) -> str | None:
    if comment is None or not _one_line(new):
        return None
    if old == new or (isinstance(old, str) and PLACEHOLDER in old):
        return comment
    return None


def _place(lines: list[str], data: dict[str, Any], template: Template,
           notes: dict[str, str]) -> dict[int, tuple[int, Comments]]:
    """Dump line -> (indentation, comments to write there), walking data and lines in order
    (the dump writes keys in the data's order, each at its depth's indentation, and what a
    key holds on deeper-indented lines below it). Mappings without template comments inside
    are not walked: the next key's search passes over their lines."""
    placed: dict[int, tuple[int, Comments]] = {}
    index = 0
    count = len(lines)

    def walk(mapping: dict[Any, Any], old_mapping: Any, depth: int, prefix: KeyPath) -> None:
        nonlocal index
        indent = " " * (depth * INDENT)
        for key, value in mapping.items():
            head = indent + _key_text(key) + ":"
            size = len(head)
            while index < count:
                line = lines[index]
                if line.startswith(head) and (len(line) == size or line[size] == " "):
                    break
                index += 1
            else:
                raise _Lost
            path = (*prefix, key)
            old = old_mapping.get(key, _MISSING) if isinstance(old_mapping, dict) else _MISSING
            if isinstance(old, dict) and COMPONENT in old and (
                    not isinstance(value, dict) or value.get(COMPONENT) != old[COMPONENT]):
                index += 1  # another component: the template's words were about the old one
                continue
            found = template.comments.get(path)
            if found is not None:
                placed[index] = (len(indent), Comments(found.above,
                                                       _kept_inline(found.inline, old, value)))
            elif not prefix and key in notes and old is _MISSING and _one_line(value):
                placed[index] = (len(indent), Comments((), f"# {notes[key]}"))
            index += 1
            if isinstance(value, dict) and value and path in template.inside:
                walk(value, old, depth + 1, path)

    walk(data, template.data, 0, ())
    return placed


def dump_commented(data: dict[str, Any], template_path: Path,
                   notes: dict[str, str] | None = None) -> str:
    """`data` as YAML with the comments of the template it was made from (see the module
    docstring); `notes`: end-of-line comments for top-level keys the template lacks. Loads
    back to exactly `data`."""
    text = dump_yaml_unfolded(data)
    template = read_template(template_path)
    if template is None or not (template.comments or notes):
        return text
    lines = text.splitlines()
    try:
        placed = _place(lines, data, template, notes or {})
    except _Lost:
        return text
    out: list[str] = []
    done = 0
    for index in sorted(placed):
        indent, comments = placed[index]
        out.extend(lines[done:index])
        out.extend(f"{' ' * indent}{c}" if c else "" for c in comments.above)
        out.append(f"{lines[index]}  {comments.inline}" if comments.inline else lines[index])
        done = index + 1
    out.extend(lines[done:])
    return "\n".join(out) + "\n"
