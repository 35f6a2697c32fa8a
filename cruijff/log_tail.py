"""A bounded excerpt of a stage attempt's log: its last lines and the earlier lines that look
like errors. The orchestrator's view of an attempt (a Prefect task run's log pane) shows this,
not the whole log: a fine-tune's log can be megabytes, and a log pane is for reading."""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

ERROR_LINE = re.compile(r"Traceback|Error|ERROR|FATAL|Killed|exceeded memory limit")
"""A line worth showing even far from the end: a traceback's start, its `...Error: why`, a
logger's ERROR, a process killed (for memory)."""

TAIL_LINES = 40
MAX_LINES = 200
LINE_WIDTH = 500


@dataclass(frozen=True)
class Excerpt:
    """What to show of a log, in order; `lines` includes `… N lines not shown …` markers."""

    path: Path
    lines: list[str]
    total: int
    """Non-empty lines in the log."""
    tail: int
    """Lines shown from the end."""
    earlier_errors: int
    """Error-looking lines shown from before the tail."""

    def header(self, name: str | None = None) -> str:
        """One line saying what the excerpt is (of the log called `name`, default its path),
        for whoever reads it without the file."""
        what = (f"all {self.total} lines" if self.tail == self.total
                else f"the last {self.tail} of {self.total} lines")
        if self.earlier_errors:
            what += f" and {self.earlier_errors} earlier error line" + (
                "s" if self.earlier_errors > 1 else "")
        return f"{name or self.path}: {what}"


def _shown(raw: str, width: int) -> str:
    """A line as shown: the last state of a progress bar (text after the last carriage
    return), cut at `width` characters."""
    parts = [p for p in raw.rstrip("\r\n").split("\r") if p.strip()]
    line = parts[-1].rstrip() if parts else ""
    return line if len(line) <= width else line[:width] + " …"


def excerpt(path: Path, *, tail: int = TAIL_LINES, limit: int = MAX_LINES,
            width: int = LINE_WIDTH) -> Excerpt | None:
    """The last `tail` non-empty lines of the log at `path`, after the latest error-looking
    lines before them (together at most `limit` lines, each at most `width` characters).
    Read in one pass holding only what is shown; None if the log cannot be read."""
    last: deque[tuple[int, str]] = deque(maxlen=tail)
    errors: deque[tuple[int, str]] = deque(maxlen=max(limit - tail, 0))
    total = 0
    try:
        with path.open(encoding="utf-8", errors="replace", newline="\n") as log:
            for raw in log:
                line = _shown(raw, width)
                if not line.strip():
                    continue
                total += 1
                if len(last) == last.maxlen:
                    number, leaving = last[0]
                    if ERROR_LINE.search(leaving):
                        errors.append((number, leaving))
                last.append((total, line))
    except OSError:
        return None
    lines: list[str] = []
    previous = 0
    for number, line in [*errors, *last]:
        if number > previous + 1:
            gap = number - previous - 1
            lines.append(f"… {gap} line{'s' if gap > 1 else ''} not shown …")
        lines.append(line)
        previous = number
    return Excerpt(path, lines, total, len(last), len(errors))
