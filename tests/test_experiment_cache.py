"""`load_experiment` reuses its parse within a process (a run loads the experiment once per
trial subflow and stage task), but never hands back what the files no longer say."""

from __future__ import annotations

import pytest
import yaml

from cruijff.errors import CruijffError
from cruijff.runner import load_experiment


def test_an_unchanged_experiment_is_parsed_once(built):
    first = load_experiment(built)
    assert load_experiment(built) is first
    assert load_experiment(built / ".." / built.name) is first  # the same folder, spelled apart


def test_an_edited_trial_config_is_read_again(built):
    before = load_experiment(built)
    config = built / "trial-b" / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["label"] += " (relabelled by hand)"
    config.write_text(yaml.safe_dump(data))  # in place: same inode, new size and time
    after = load_experiment(built)
    assert after is not before
    assert after.trial("b").label.endswith("(relabelled by hand)")
    assert before.trial("b").label != after.trial("b").label


def test_a_rebuilt_experiment_is_read_again(built, cli, project):
    before = load_experiment(built)
    rebuilt = cli("build", "--config-path", project.config, "--task", "toy", "--model",
                  "cruijff/tiny-llama-random", "--dataset", "d.json", "--treatments",
                  '{"finetune.model.lora_rank": [4, 8]}', "--name", "exp", "--force",
                  cwd=project.experiments)
    assert rebuilt.code == 0, rebuilt.err
    after = load_experiment(built)
    assert [t.id for t in before.trials] == ["a", "b"]
    assert [t.id for t in after.trials] == ["a", "b", "c"]


def test_a_link_planted_after_a_load_is_still_refused(built, tmp_path):
    load_experiment(built)
    outside = tmp_path / "outside"
    outside.mkdir()
    logs = built / "trial-a" / "logs"
    if logs.exists():
        logs.rmdir()
    logs.symlink_to(outside)
    with pytest.raises(CruijffError, match="trial-a/logs"):
        load_experiment(built)
