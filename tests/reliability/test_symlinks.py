"""Symbolic links out of an experiment: refused in one line (exit 2) before anything is written;
links that stay inside (a trial sharing another's fine-tune) keep working."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cruijff.containment import check_contained
from cruijff.errors import CruijffError


def snapshot(folder: Path) -> list[tuple[str, int]]:
    """Every file under `folder` (links not followed) with its size."""
    return sorted((str(p.relative_to(folder)), p.lstat().st_size) for p in folder.rglob("*"))


def replace_with_link(entry: Path, target: str | Path) -> None:
    """Put a symbolic link where cruijff expects its own file or folder."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    elif entry.exists() or entry.is_symlink():
        entry.unlink()
    entry.symlink_to(target)


def link_outside(relative: str, target: str = "{outside}"):
    def setup(exp: Path, outside: Path) -> Path:
        entry = exp / relative
        replace_with_link(entry, target.format(outside=outside))
        return entry
    return setup


def trial_folder_outside(exp: Path, outside: Path) -> Path:
    """The whole trial folder moved out and linked back."""
    moved = outside / "trial-b"
    shutil.move(str(exp / "trial-b"), str(moved))
    (exp / "trial-b").symlink_to(moved)
    return exp / "trial-b"


def chain_through_another_trial(exp: Path, outside: Path) -> Path:
    """trial-a/logs -> trial-b/logs (inside), which -> outside: the chain is followed."""
    replace_with_link(exp / "trial-b" / "logs", outside)
    replace_with_link(exp / "trial-a" / "logs", exp / "trial-b" / "logs")
    return exp / "trial-a" / "logs"


CASES = [
    # (id, how the experiment is changed, command, the link the one line must name)
    ("run-trial-logs", link_outside("trial-a/logs"), ["run", "{exp}"], "trial-a/logs"),
    ("run-trial-records", link_outside("trial-a/.cruijff"), ["run", "{exp}"],
     "trial-a/.cruijff"),
    ("run-experiment-records", link_outside(".cruijff"), ["run", "{exp}"], "exp/.cruijff"),
    ("run-force-checkpoints", link_outside("trial-b/checkpoints"),
     ["run", "--force", "--trials", "b", "{exp}"], "trial-b/checkpoints"),
    ("run-force-archive", link_outside(".archive"), ["run", "--force", "{exp}"], "exp/.archive"),
    ("run-trial-folder", trial_folder_outside, ["run", "{exp}"], "exp/trial-b"),
    ("run-relative-link", link_outside("trial-a/logs", "../../../outside"), ["run", "{exp}"],
     "trial-a/logs"),
    ("run-dangling-link", link_outside("trial-a/logs", "{outside}/not-yet"), ["run", "{exp}"],
     "trial-a/logs"),
    ("run-chain-of-links", chain_through_another_trial, ["run", "{exp}"], "/logs"),
    ("run-dry-run", link_outside("trial-a/logs"), ["run", "--dry-run", "{exp}"],
     "trial-a/logs"),
    ("analyze-report-folder", link_outside("report"), ["analyze", "{exp}"], "exp/report"),
    ("analyze-results-database", link_outside("results.sqlite", "{outside}/results.sqlite"),
     ["analyze", "{exp}"], "exp/results.sqlite"),
    ("summary-trial-logs", link_outside("trial-a/logs"), ["summary", "{exp}"], "trial-a/logs"),
]


@pytest.mark.parametrize(("setup", "args", "link"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_a_link_out_of_the_experiment_is_refused(cli, built, project, setup, args, link):
    line = refused_writing_nothing(cli, built, project, setup, args)
    assert "is a symbolic link to" in line and "remove the link" in line, line
    assert link in line


def refused_writing_nothing(cli, built, project, setup, args) -> str:
    """Run the command on an experiment `setup` linked out of: one error line (returned),
    exit 2, nothing changed inside or outside."""
    outside = project.root / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not cruijff's\n")
    setup(built, outside)
    before_outside, before_exp = snapshot(outside), snapshot(built)
    result = cli(*[a.format(exp=built) for a in args], cwd=project.root)
    assert result.code == 2, (result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "outside the experiment" in lines[0] and "Traceback" not in result.out + result.err
    assert snapshot(outside) == before_outside
    assert snapshot(built) == before_exp
    return lines[0]


def test_a_trial_id_that_leaves_the_experiment_is_refused(cli, built, project):
    """An edited config.yaml whose trial id walks out of the experiment ('x/../../../elsewhere'),
    even where a trial config waits there to be read."""
    config = built / "config.yaml"
    config.write_text(config.read_text().replace("- id: b", "- id: a/../../../elsewhere"))
    elsewhere = project.root / "elsewhere"
    shutil.copytree(built / "trial-b", elsewhere)
    before = snapshot(elsewhere)
    result = cli("run", built, cwd=project.root)
    assert result.code == 2, (result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "is not a folder directly inside the experiment" in lines[0]
    assert snapshot(elsewhere) == before


def test_links_inside_the_experiment_keep_working(cli, built, project):
    """What runner.link_shared makes (trial-b/checkpoints -> trial-a/checkpoints, absolute),
    and a relative link: `run --dry-run` and `summary` go on as usual."""
    replace_with_link(built / "trial-b" / "checkpoints", built / "trial-a" / "checkpoints")
    replace_with_link(built / "trial-b" / "logs", "../trial-a/logs")
    result = cli("run", "--dry-run", built, cwd=project.root)
    assert result.code == 0, result.err
    assert "Would run" in result.out
    result = cli("summary", built, cwd=project.root)
    assert result.code == 1 and "error" not in result.err, result.err  # 1: nothing ran yet


# check_contained itself


def make_experiment(root: Path, trials: int) -> tuple[Path, list[Path]]:
    """An experiment folder shaped like a built one, without building it."""
    exp = root / "exp"
    (exp / ".cruijff").mkdir(parents=True)
    (exp / "config.yaml").write_text("name: exp\n")
    dirs = []
    for number in range(trials):
        trial = exp / f"trial-{number}"
        for folder in ("logs", "checkpoints", ".cruijff"):
            (trial / folder).mkdir(parents=True)
        for name in ("config.yaml", "eval.yaml", "eval.slurm"):
            (trial / name).write_text("x\n")
        dirs.append(trial)
    return exp, dirs


def test_check_contained_accepts_inside_links_and_names_the_outside_one(tmp_path):
    exp, dirs = make_experiment(tmp_path, 3)
    replace_with_link(dirs[1] / "checkpoints", dirs[0] / "checkpoints")
    replace_with_link(dirs[2] / "checkpoints", "../trial-0/checkpoints")
    check_contained(exp, dirs)
    check_contained(exp, [Path(d.name) for d in dirs])  # relative to the experiment
    (dirs[2] / "eval.yaml").unlink()
    (dirs[2] / "eval.yaml").symlink_to("/etc/hostname")
    with pytest.raises(CruijffError, match=r"trial-2/eval.yaml is a symbolic link to /etc/"):
        check_contained(exp, dirs)


def test_check_contained_quotes_a_target_with_a_newline(tmp_path):
    exp, dirs = make_experiment(tmp_path, 1)
    target = tmp_path / "a\nb"
    target.mkdir()
    replace_with_link(dirs[0] / "logs", target)
    with pytest.raises(CruijffError) as caught:
        check_contained(exp, dirs)
    assert "\n" not in str(caught.value) and "a\\nb" in str(caught.value)


def test_a_link_to_the_experiment_itself_or_a_sibling_with_its_name_prefix(tmp_path):
    """'exp2' is outside 'exp' although its path starts with it; 'exp' itself is inside."""
    exp, dirs = make_experiment(tmp_path, 1)
    (tmp_path / "exp2").mkdir()
    replace_with_link(dirs[0] / "logs", exp)
    check_contained(exp, dirs)
    replace_with_link(dirs[0] / "logs", tmp_path / "exp2")
    with pytest.raises(CruijffError, match="outside the experiment"):
        check_contained(exp, dirs)


def test_an_experiment_reached_through_a_link_is_fine(tmp_path):
    """Experiments on scratch, linked from home: the experiment itself may be a link."""
    exp, dirs = make_experiment(tmp_path / "scratch", 2)
    replace_with_link(dirs[1] / "checkpoints", dirs[0] / "checkpoints")
    (tmp_path / "home").mkdir()
    linked = tmp_path / "home" / "exp"
    linked.symlink_to(exp)
    check_contained(linked, [linked / d.name for d in dirs])


def test_check_contained_checks_every_one_of_a_thousand_trials(tmp_path):
    """Every trial shares trial-0's fine-tune: 999 links to check, as after a real run; all
    are fine, and one outside link in the last trial is still found. (Its speed on such an
    experiment: benchmarks/containment_scale.py.)"""
    exp, dirs = make_experiment(tmp_path, 1000)
    for trial in dirs[1:]:
        replace_with_link(trial / "checkpoints", dirs[0] / "checkpoints")
    check_contained(exp, dirs)
    replace_with_link(dirs[-1] / "logs", tmp_path)
    with pytest.raises(CruijffError, match=r"trial-999/logs is a symbolic link to .*outside"):
        check_contained(exp, dirs)


def test_a_loop_of_links_is_named_not_a_crash(tmp_path):
    exp, dirs = make_experiment(tmp_path, 1)
    (dirs[0] / "a").symlink_to("b")
    (dirs[0] / "b").symlink_to("a")
    with pytest.raises(CruijffError, match=r"trial-0/[ab] is a symbolic link that never ends"):
        check_contained(exp, dirs)


# links below a trial's own entries: cruijff writes into logs/eval/, logs/finetune/,
# checkpoints/epoch_N/, logs/prompt_opt/cN/ too


def link_below(relative: str):
    """`relative`'s parent folders made as cruijff would, then `relative` linked outside."""
    def setup(exp: Path, outside: Path) -> Path:
        (exp / relative).parent.mkdir(parents=True, exist_ok=True)
        replace_with_link(exp / relative, outside)
        return exp / relative
    return setup


def through_a_folder_inside(exp: Path, outside: Path) -> Path:
    """trial-a/logs -> exp/other (a folder inside, in no trial), whose eval -> outside."""
    (exp / "other").mkdir()
    (exp / "other" / "eval").symlink_to(outside)
    replace_with_link(exp / "trial-a" / "logs", exp / "other")
    return exp / "other" / "eval"


DEEP_CASES = [
    # (id, how the experiment is changed, the link the one line must name)
    ("logs-eval", link_below("trial-a/logs/eval"), "trial-a/logs/eval"),
    ("logs-finetune", link_below("trial-a/logs/finetune"), "trial-a/logs/finetune"),
    ("checkpoint-epoch", link_below("trial-b/checkpoints/epoch_0"),
     "trial-b/checkpoints/epoch_0"),
    ("prompt-opt-candidate", link_below("trial-b/logs/prompt_opt/c0"),
     "trial-b/logs/prompt_opt/c0"),
    ("four-deep", link_below("trial-a/logs/eval/one/two"), "trial-a/logs/eval/one/two"),
    ("experiment-slurm-logs", link_below(".cruijff/slurm"), "exp/.cruijff/slurm"),
    ("through-a-folder-inside", through_a_folder_inside, "exp/other/eval"),
]
DEEP_COMMANDS = [["run", "{exp}"], ["run", "--force", "{exp}"], ["summary", "{exp}"],
                 ["analyze", "{exp}"]]


@pytest.mark.parametrize("args", DEEP_COMMANDS, ids=[" ".join(c[:-1]) for c in DEEP_COMMANDS])
@pytest.mark.parametrize(("setup", "link"), [c[1:] for c in DEEP_CASES],
                         ids=[c[0] for c in DEEP_CASES])
def test_a_link_below_a_trials_entries_out_of_the_experiment_is_refused(cli, built, project,
                                                                        setup, link, args):
    """Before, only a trial folder's direct entries were checked: a run wrote through
    `trial-a/logs/eval` to wherever it led."""
    line = refused_writing_nothing(cli, built, project, setup, args)
    assert f"{link} is a symbolic link to" in line, line


def test_links_below_trial_level_inside_the_experiment_keep_working(cli, built, project):
    """A deep link to another trial's folder, and one to a folder inside in no trial."""
    (built / "trial-a" / "logs" / "eval").mkdir()
    (built / "trial-b" / "logs" / "eval").symlink_to("../../trial-a/logs/eval")
    (built / "kept").mkdir()
    (built / "trial-a" / "logs" / "finetune").symlink_to(built / "kept")
    result = cli("run", "--dry-run", built, cwd=project.root)
    assert result.code == 0, result.err
    result = cli("summary", built, cwd=project.root)
    assert result.code == 1 and "error" not in result.err, result.err


def test_check_contained_walks_every_trial_folder_of_a_thousand(tmp_path):
    """Each trial with the folders a run leaves (logs/eval, logs/finetune, checkpoints with
    epochs; all but the first sharing the first's checkpoints): one link out in the last
    trial's logs/eval is found. (Its speed: benchmarks/containment_scale.py.)"""
    exp, dirs = make_experiment(tmp_path, 1000)
    for trial in dirs:
        for folder in ("logs/eval", "logs/finetune", "checkpoints/epoch_0"):
            (trial / folder).mkdir(parents=True)
    for trial in dirs[1:]:
        replace_with_link(trial / "checkpoints", dirs[0] / "checkpoints")
    check_contained(exp, dirs)
    replace_with_link(dirs[-1] / "logs" / "eval", tmp_path)
    with pytest.raises(CruijffError, match=r"trial-999/logs/eval is a symbolic link to "):
        check_contained(exp, dirs)


def test_a_loop_of_links_below_a_trial_is_named_not_a_crash(tmp_path):
    exp, dirs = make_experiment(tmp_path, 1)
    (dirs[0] / "logs" / "a").symlink_to("b")
    (dirs[0] / "logs" / "b").symlink_to("a")
    with pytest.raises(CruijffError, match=r"trial-0/logs/[ab] is a symbolic link that never"):
        check_contained(exp, dirs)
    (dirs[0] / "logs" / "a").unlink()
    (dirs[0] / "logs" / "b").unlink()
    (dirs[0] / "logs" / "up").symlink_to("..")  # a folder loop: inside, walked once
    check_contained(exp, dirs)
