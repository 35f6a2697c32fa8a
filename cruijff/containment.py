"""Keeping an experiment's writes inside the experiment folder.

cruijff writes into folders it built (a trial's `logs/`, `.cruijff/`, `checkpoints/`, the
experiment's `.cruijff/`, `.archive/`, `report/`, `results.sqlite`). If one of them is replaced
by a symbolic link to somewhere else, a run would write (and `--force` would move files) there.
`check_contained` refuses such an experiment before anything is written. It looks only at the
experiment's top-level entries, each trial folder and that folder's direct children: the places
cruijff writes into. That is a few directory reads per trial, so it runs for every command on
experiments of a thousand trials. Links that stay inside the experiment are fine: a trial that
shares another's fine-tune has `checkpoints` linked to that trial's `checkpoints`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cruijff.errors import CruijffError


def _shown(path: Path | str) -> str:
    """A path for a one-line message: as is, or quoted when it holds a newline or the like."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _inside(target: Path, root: Path) -> bool:
    return target == root or target.is_relative_to(root)


def _refuse(link: Path, target: Path, root: Path) -> CruijffError:
    return CruijffError(
        f"{_shown(link)} is a symbolic link to {_shown(target)}, outside the experiment "
        f"{_shown(root)}: remove the link (cruijff writes only inside the experiment folder)"
    )


def _resolve(link: Path) -> Path:
    try:
        return link.resolve()
    except (RuntimeError, OSError):  # a loop of links (RuntimeError up to Python 3.12)
        raise CruijffError(f"{_shown(link)} is a symbolic link that never ends (a loop of "
                           "links): remove the link") from None


def _check_entries(folder: Path, root: Path) -> None:
    """Every symbolic link directly in `folder` must resolve (link chains followed, even to
    a target that does not exist yet) to a path inside `root`."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return  # a trial folder not there: loading it reports that, not this check
    except OSError as exc:
        raise CruijffError(f"cannot read {_shown(folder)}: {exc.strerror}") from None
    for entry in entries:
        if entry.is_symlink():
            link = Path(entry.path)
            target = _resolve(link)
            if not _inside(target, root):
                raise _refuse(link, target, root)


def check_contained(experiment_path: Path, trial_dirs: Iterable[Path]) -> None:
    """Raise CruijffError if a place cruijff writes into leads outside the experiment: a
    symbolic link among the experiment's entries or a trial folder's, or a trial folder
    that is not a folder directly inside the experiment."""
    root = _resolve(Path(experiment_path).expanduser())
    _check_entries(root, root)
    for trial_dir in trial_dirs:
        trial_dir = Path(trial_dir)
        if not trial_dir.is_absolute():
            trial_dir = root / trial_dir
        resolved = _resolve(trial_dir)
        if trial_dir.is_symlink() and not _inside(resolved, root):
            raise _refuse(trial_dir, resolved, root)
        if resolved.parent != root:
            raise CruijffError(
                f"trial folder {_shown(trial_dir)} is not a folder directly inside the "
                f"experiment {_shown(root)}: the experiment's config.yaml has been edited; "
                "rebuild the experiment with `cruijff build --force`"
            )
        _check_entries(resolved, root)
