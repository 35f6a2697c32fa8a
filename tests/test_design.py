"""Controls and treatments become the trials a researcher expects, in a stable order."""

from __future__ import annotations

import json

import pytest

from cruijff.design import Design, canonical_key, expand, parse_assignment, trial_ids
from cruijff.errors import CruijffError
from cruijff.settings import ExperimentConfig

M1, M2 = "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-70B-Instruct"


def config(**kw) -> ExperimentConfig:
    return ExperimentConfig(**kw)


def test_assignment_values_are_yaml_scalars():
    assert parse_assignment("torchtune.model.lora_rank=32", "--control") == (
        "finetune.model.lora_rank", 32)
    assert parse_assignment("torchtune.optimizer.lr=1e-4", "--control")[1] == pytest.approx(1e-4)
    assert parse_assignment("use_fine_tune=false", "--control") == ("use_fine_tune", False)
    assert parse_assignment("inspect.split=test", "--control") == ("eval.split", "test")
    assert parse_assignment("eval.note=a=b", "--control") == ("eval.note", "a=b")


def test_namespace_aliases_are_one_namespace():
    assert canonical_key("torchtune.a.b") == canonical_key("finetune.a.b") == "finetune.a.b"
    assert canonical_key("inspect.x") == canonical_key("eval.x") == "eval.x"


def test_trial_ids_are_bijective_base_26():
    ids = trial_ids()
    first = [next(ids) for _ in range(28)]
    assert first[:3] == ["a", "b", "c"] and first[25:] == ["z", "aa", "ab"]


def test_spec_example_one_control_and_two_treatments():
    design = Design.from_options(
        models=[M1], datasets=["words_5L_80_1000.json"],
        control=["torchtune.model.lora_alpha=32"],
        treatment=["torchtune.model.lora_rank=4", "torchtune.model.lora_rank=64"],
    )
    plan = expand(design, config())
    assert [(t.id, t.label, t.control) for t in plan.trials] == [
        ("a", "control", None),
        ("b", "finetune.model.lora_rank=4", "a"),
        ("c", "finetune.model.lora_rank=64", "a"),
    ]
    assert all(t.settings["finetune.model.lora_alpha"] == 32 for t in plan.trials)


def test_model_varied_in_treatment_gets_a_control_per_model():
    design = Design.from_options(
        datasets=["d.json"], controls=['{"torchtune.model.lora_alpha": 32}'],
        treatments=[json.dumps({"model": [M1, M2], "torchtune.model.lora_rank": 4})],
    )
    plan = expand(design, config())
    assert [(t.id, t.model, t.is_control, t.control) for t in plan.trials] == [
        ("a", M1, True, None), ("b", M2, True, None), ("c", M1, False, "a"), ("d", M2, False, "b"),
    ]


def test_lists_expand_cartesian_within_one_treatment():
    design = Design.from_options(
        models=[M1], datasets=["d.json"],
        treatments=['{"finetune.model.lora_rank": [4, 8], "finetune.optimizer.lr": [0.1, 0.01]}'],
    )
    plan = expand(design, config())
    assert len(plan.trials) == 5
    assert [t.settings for t in plan.trials[1:3]] == [
        {"finetune.model.lora_rank": 4, "finetune.optimizer.lr": 0.1},
        {"finetune.model.lora_rank": 4, "finetune.optimizer.lr": 0.01},
    ]


def test_a_list_of_lists_sets_a_list_value():
    design = Design.from_options(
        models=[M1], datasets=["d.json"],
        treatments=['{"finetune.model.lora_attn_modules": [["q_proj", "v_proj"]]}'],
    )
    trial = expand(design, config()).trials[1]
    assert trial.settings == {"finetune.model.lora_attn_modules": ["q_proj", "v_proj"]}


def test_run_control_trials_false_builds_only_treatments():
    design = Design.from_options(
        models=[M1], datasets=["d.json"], control=["finetune.model.lora_alpha=32"],
        treatments=['{"finetune.model.lora_rank": [4, 8, 16, 32]}'],
    )
    assert len(expand(design, config()).trials) == 5
    plan = expand(design, config(run_control_trials=False))
    assert len(plan.trials) == 4 and all(t.control is None for t in plan.trials)


def test_treatment_equal_to_control_is_reported_not_duplicated():
    design = Design.from_options(
        models=[M1], datasets=["d.json"], control=["finetune.model.lora_alpha=32"],
        treatment=["finetune.model.lora_alpha=32", "finetune.model.lora_rank=4",
                   "torchtune.model.lora_rank=4"],
    )
    plan = expand(design, config())
    assert len(plan.trials) == 2
    assert "equals control trial a" in plan.notices[0]
    assert "repeats trial b" in plan.notices[1]


def test_use_fine_tune_treatment_gives_a_base_model_trial():
    design = Design.from_options(models=[M1], datasets=["d.json"],
                                 treatment=["use_fine_tune=false"])
    control, base = expand(design, config()).trials
    assert control.use_fine_tune and not base.use_fine_tune
    assert base.settings == {} and base.treatment == {"use_fine_tune": False}


def test_treatment_files_hold_an_object_or_a_list(tmp_path):
    one = tmp_path / "one.json"
    one.write_text('{"dataset": ["a.json", "b.json"], "torchtune.model.lora_rank": 4}')
    many = tmp_path / "many.json"
    many.write_text('[{"finetune.model.lora_rank": 4}, {"finetune.model.lora_rank": 8}]')
    controls = tmp_path / "controls.json"
    controls.write_text('{"torchtune.model.lora_alpha": 32}')
    plan = expand(Design.from_options(models=[M1], control_path=[controls],
                                      treatment_path=[one]), config())
    assert [(t.dataset, t.is_control) for t in plan.trials] == [
        ("a.json", True), ("b.json", True), ("a.json", False), ("b.json", False)]
    plan = expand(Design.from_options(models=[M1], datasets=["x.json"],
                                      treatment_path=[many]), config())
    assert len(plan.trials) == 3


def test_a_control_set_twice_differently_is_an_error():
    with pytest.raises(CruijffError, match="set twice"):
        Design.from_options(control=["finetune.a=1"], controls=['{"finetune.a": 2}'])


def test_ids_and_order_are_deterministic():
    def build():
        design = Design.from_options(
            models=[M1, M2], datasets=["x.json", "y.json"],
            treatments=['{"finetune.model.lora_rank": [1, 2, 3]}'],
        )
        return [(t.id, t.model, t.dataset, t.label) for t in expand(design, config()).trials]

    first = build()
    assert first == build()
    assert len(first) == 4 + 12 and first[-1][0] == "p"


def test_a_list_control_shared_by_trials_is_written_without_yaml_aliases(cli, project):
    """One controls list ends up in every trial: the files must still load strictly."""
    result = cli("build", "--config-path", project.config, "--task", "toy",
                 "--model", "cruijff/tiny-llama-random", "--dataset", "d.json",
                 "--controls", '{"finetune.model.lora_attn_modules": ["q_proj", "v_proj"]}',
                 "--treatment", "finetune.model.lora_rank=4", "--name", "e",
                 cwd=project.experiments)
    assert result.code == 0, result.err
    from cruijff.runner import load_experiment

    text = (project.experiments / "e" / "config.yaml").read_text()
    assert "&id" not in text and "*id" not in text
    assert len(load_experiment(project.experiments / "e").trials) == 2
