"""Data for the capitalization task: random lowercase words and their UPPER-case form.

A dataset name says how it is made: ``words_<L>L_<P>_<N>.json`` is N distinct random
lowercase words of L letters; P percent of them go to training (of which 10 % are held out
as validation) and the rest to test. The words depend only on the name, so every machine
builds the same file. Example: ``words_5L_80_1000.json`` -> 720 train, 80 validation,
200 test.

Each record is ``{"id": ..., "input": "Capitalize: hello", "output": "HELLO"}``. The prompt
uses only letters, the space and ``:``, which the tiny demo model's tokenizer covers.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import string
from pathlib import Path

PROMPT = "Capitalize: {word}"
NAME_PATTERN = re.compile(r"^words_(?P<length>\d+)L_(?P<train_pct>\d+)_(?P<count>\d+)\.json$")
VALIDATION_FRACTION = 0.10


def parse_name(dataset: str) -> tuple[int, int, int]:
    """(word length, train percent, count) from a name like ``words_5L_80_1000.json``."""
    m = NAME_PATTERN.match(dataset)
    if m is None:
        raise ValueError(
            f"capitalization: cannot build dataset {dataset!r}; expected a name like "
            "'words_5L_80_1000.json' (word length 5, 80 % train+validation, 1000 words)"
        )
    length, train_pct, count = (int(m[k]) for k in ("length", "train_pct", "count"))
    if not 1 <= length <= 64:
        raise ValueError(f"capitalization: word length must be 1..64, got {length} in {dataset!r}")
    if not 0 <= train_pct <= 100:
        raise ValueError(
            f"capitalization: train percent must be 0..100, got {train_pct} in {dataset!r}"
        )
    if count < 1 or count > 26**length:
        raise ValueError(
            f"capitalization: cannot draw {count} distinct words of {length} letters ({dataset!r})"
        )
    return length, train_pct, count


def build(dataset: str, data_dir: str | os.PathLike) -> None:
    length, train_pct, count = parse_name(dataset)
    # A stable seed from the name (Python's hash() is randomized per process).
    seed = int.from_bytes(hashlib.sha256(dataset.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
        if w not in seen:
            seen.add(w)
            words.append(w)

    n_train_val = round(count * train_pct / 100)
    n_val = round(n_train_val * VALIDATION_FRACTION)
    stem = dataset.removesuffix(".json")
    records = [
        {
            "id": f"{stem}-{i:0{len(str(count))}d}",
            "input": PROMPT.format(word=w),
            "output": w.upper(),
        }
        for i, w in enumerate(words)
    ]
    splits = {
        "train": records[: n_train_val - n_val],
        "validation": records[n_train_val - n_val : n_train_val],
        "test": records[n_train_val:],
    }
    out = Path(data_dir) / dataset
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(splits, indent=1) + "\n")
    os.replace(tmp, out)
