"""Cron expressions checked before anything is scheduled, with the reason a bad one is bad
(Prefect's own check says only "Invalid cron string", and runs after the old schedule is
gone)."""

from __future__ import annotations

import re

NICKNAMES = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
FIELDS = (  # name, lowest, highest, names counted from `lowest`
    ("minute", 0, 59, []),
    ("hour", 0, 23, []),
    ("day of month", 1, 31, []),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 7, DAYS),
)
_PART = re.compile(r"^(\*|[0-9a-z]+(?:-[0-9a-z]+)?)(?:/([0-9]+))?$")


def cron_problem(expression: str) -> str | None:
    """What is wrong with a five-field cron expression (or @daily-style nickname), or None."""
    text = expression.strip().lower()
    if text in NICKNAMES:
        return None
    fields = text.split()
    if len(fields) != len(FIELDS):
        return (f"it has {len(fields)} field{'s' * (len(fields) != 1)}; cron needs 5 "
                "(minute hour day-of-month month day-of-week, e.g. '0 3 * * *'), or one of "
                f"{', '.join(sorted(NICKNAMES))}")
    for value, (name, low, high, names) in zip(fields, FIELDS, strict=True):
        for part in value.split(","):
            problem = _part_problem(part, name, low, high, names)
            if problem:
                return problem
    return None


def _part_problem(part: str, name: str, low: int, high: int, names: list[str]) -> str | None:
    match = _PART.match(part)
    if not match:
        return f"{name} field {part!r} is not *, a number, a range a-b, or one with /step"
    span, step = match.groups()
    if step is not None and int(step) == 0:
        return f"{name} field {part!r}: a step must be at least 1"
    if span == "*":
        return None
    numbers = []
    for bound in span.split("-"):
        if bound.isdigit():
            numbers.append(int(bound))
        elif bound in names:
            numbers.append(names.index(bound) + low)
        else:
            return f"{name} field {part!r}: {bound!r} is not a {name} ({low}-{high})"
    outside = [n for n in numbers if not low <= n <= high]
    if outside:
        return f"{name} field {part!r}: {outside[0]} is outside {low}-{high}"
    return None  # a range a-b with a > b wraps around, as Prefect's croniter reads it
