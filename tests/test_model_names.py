"""A misspelled known model id is named with the id it is close to (issue 16, item 10)."""

from __future__ import annotations

import pytest

from cruijff.models import KNOWN_MODELS, family_of, suggest_model

TYPO = "meta-llama/Llama-3.2-1B-Instuct"
MEANT = "meta-llama/Llama-3.2-1B-Instruct"


def _build(cli, project, model, *extra):
    return cli("build", "--config-path", project.config, "--task", "toy", "--model", model,
               "--dataset", "d.json", "--treatment", "finetune.model.lora_rank=4",
               "--name", "e", *extra, cwd=project.experiments)


def test_a_misspelled_known_model_is_refused_at_build_with_the_id_it_is_close_to(cli, project):
    result = _build(cli, project, TYPO, "--dry-run")
    assert result.code == 2
    assert result.err.strip().count("\n") == 0  # one line
    assert f"no torchtune config is known for model {TYPO} (did you mean '{MEANT}'?)" \
        in result.err
    assert "correct the model id" in result.err


def test_offline_a_misspelled_model_that_is_nowhere_says_which_was_meant(cli, project):
    result = _build(cli, project, TYPO)
    assert result.code == 2 and result.err.strip().count("\n") == 0
    assert f"model {TYPO} (did you mean '{MEANT}'?) is neither in" in result.err
    assert not (project.experiments / "e").exists()


def test_an_unknown_model_far_from_any_known_gets_no_suggestion(cli, project):
    result = _build(cli, project, "someone/some-model", "--dry-run")
    assert result.code == 2 and "did you mean" not in result.err
    assert "set finetune_config" in result.err and "correct the model id" not in result.err


@pytest.mark.parametrize(("typed", "meant"), [
    ("qwen/qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct"),
    ("cruijff/tiny-lama", "cruijff/tiny-llama"),
    ("meta-llama/Llama-3.1-8B-Instrcut", "meta-llama/Llama-3.1-8B-Instruct"),
])
def test_typos_of_known_ids_suggest_them(typed, meant):
    assert suggest_model(typed) == f" (did you mean '{meant}'?)"


@pytest.mark.parametrize("model", [
    "meta-llama/Meta-Llama-3.1-8B-Instruct",  # known by its family's pattern
    "meta-llama/Llama-3.2-11B-Vision",  # another real model, not a typo of the 1B
    "/models/Llama-3.2-1B-Instuct",  # a local folder: its config.json decides
])
def test_known_ids_other_models_and_folders_get_no_suggestion(model):
    assert suggest_model(model) == ""


def test_every_known_model_has_its_family():
    assert [m for m in KNOWN_MODELS if family_of(m) is None] == []
