"""Keeping an experiment's writes inside the experiment folder.

cruijff writes into folders it built (a trial's `logs/`, `.cruijff/`, `checkpoints/`, the
experiment's `.cruijff/`, `.archive/`, `report/`, `results.sqlite`). If one of them is replaced
by a symbolic link to somewhere else, a run would write (and `--force` would move files) there.
`check_contained` refuses such an experiment before anything is written. It looks at the
experiment's top-level entries and walks, at any depth and without following links, every
trial folder and the experiment's `.cruijff/` and `report/` (a stage writes into folders of its
own below the trial: `logs/eval/`, `checkpoints/epoch_0/`, `logs/prompt_opt/c0/`): every
symbolic link there must lead inside the experiment, and a link to a folder inside it that no
trial holds is walked too. A trial folder holds a few folders (checkpoints: a few files per
epoch), so that is a few directory reads per trial and it runs for every command on
experiments of a thousand trials. Links that stay inside the experiment are fine: a trial that
shares another's fine-tune has `checkpoints` linked to that trial's `checkpoints`.

`check_output_paths` does the same for the paths a stage's config names as its outputs: an
edited `eval.yaml` whose `log_dir` leads elsewhere is refused before the stage runs.
"""

from __future__ import annotations

import errno
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


def _scan(folder: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except FileNotFoundError:
        return []  # a trial folder not there: loading it reports that, not this check
    except OSError as exc:
        raise CruijffError(f"cannot read {_shown(folder)}: {exc.strerror}") from None


def _real(link: str) -> str:
    """Where a link leads (chains followed, even to a target that does not exist yet): as
    Path.resolve, in strings (this runs for every link of every trial)."""
    target = os.path.realpath(link)
    try:
        os.stat(target)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # realpath gives up on a loop quietly; stat does not
            raise CruijffError(f"{_shown(link)} is a symbolic link that never ends (a loop "
                               "of links): remove the link") from None
    return target


def _check_entries(folder: str, root: str) -> list[tuple[str, bool]]:
    """Every symbolic link directly in `folder` must resolve to a path inside `root` (both
    real paths). Returns (folder, is a link's target) for the folders in it (links not
    followed) and the folders its links lead to."""
    below = []
    inside = root + os.sep
    for entry in _scan(folder):
        if entry.is_symlink():
            target = _real(entry.path)
            if target != root and not target.startswith(inside):
                raise _refuse(Path(entry.path), Path(target), Path(root))
            if os.path.isdir(target):
                below.append((target, True))
        elif entry.is_dir(follow_symlinks=False):
            below.append((entry.path, False))
    return below


def _walk(tops: list[Path], root: Path) -> None:
    """Check every link at any depth below `tops` (folders directly inside `root`, resolved),
    whose trees are walked whole. A link to a folder elsewhere inside `root` (not below a
    top) has that folder walked too, once: writing through the link writes there."""
    base = str(root)
    names = {top.name for top in tops}
    seen: set[str] = set()
    stack = [str(top) for top in tops]
    while stack:
        folder = stack.pop()
        for sub, linked in _check_entries(folder, base):
            if sub in seen:
                continue
            if linked and sub != base and sub[len(base) + 1:].split(os.sep, 1)[0] in names:
                continue  # below a top: walked anyway
            if not linked and folder == base and os.path.basename(sub) in names:
                continue  # a link led to the experiment itself: its tops are walked anyway
            seen.add(sub)
            stack.append(sub)


def check_contained(experiment_path: Path, trial_dirs: Iterable[Path]) -> None:
    """Raise CruijffError if a place cruijff writes into leads outside the experiment: a
    symbolic link among the experiment's entries, or at any depth of a trial folder or of
    the experiment's `.cruijff/` and `report/`; or a trial folder that is not a folder
    directly inside the experiment."""
    root = _resolve(Path(experiment_path).expanduser())
    _check_entries(str(root), str(root))
    tops = [root / name for name in (".cruijff", "report")
            if (root / name).is_dir() and not (root / name).is_symlink()]
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
        tops.append(resolved)
    _walk(tops, root)


def check_output_paths(experiment_path: Path, trial_dir: Path, config_file: Path,
                       outputs: dict[str, Path]) -> None:
    """Raise CruijffError if a path a stage's config names as an output (config key -> path;
    a relative one counts from the trial folder, where the stage runs) is not in the trial
    folder, or leads outside the experiment through a link (a shared run's `checkpoints`
    leads to the owner trial's: inside, fine)."""
    root = _resolve(Path(experiment_path).expanduser())
    trial = _resolve(trial_dir)
    for key, path in outputs.items():
        written = Path(os.path.normpath(trial_dir / path))  # an absolute path stays itself
        target = _resolve(written)
        if not (_inside(written, trial_dir) or _inside(written, trial)
                or _inside(target, trial)):
            where = f"outside the trial folder {_shown(trial)}"
        elif not _inside(target, root):
            where = f"which leads to {_shown(target)}, outside the experiment {_shown(root)}"
        else:
            continue
        raise CruijffError(
            f"{_shown(config_file)}: {key} is {_shown(path)}, {where}: a stage writes only "
            "into its trial folder; set it back to a path there (or rebuild the experiment "
            "with `cruijff build --force`)")
