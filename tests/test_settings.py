"""config.yaml: defaults, aliases, relative paths, environment overrides, clear errors."""

from __future__ import annotations

import pytest

from cruijff.errors import CruijffError
from cruijff.settings import ExperimentConfig


def write(tmp_path, text: str):
    path = tmp_path / "sub" / "config.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ExperimentConfig.load(write(tmp_path, "model_dir: m\ndata_dir: ../d\n"))
    assert config.model_dir == tmp_path / "sub" / "m"
    assert config.data_dir == tmp_path / "d"
    assert config.tasks_dir == tmp_path / "sub" / "tasks"


def test_spec_aliases_torchtune_config_and_inspect_config(tmp_path):
    config = ExperimentConfig.load(
        write(tmp_path, "torchtune_config: tt.yaml\ninspect_config: /abs/eval.yaml\n"))
    assert config.finetune_config == tmp_path / "sub" / "tt.yaml"
    assert str(config.eval_config) == "/abs/eval.yaml"


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CRUIJFF_USE_FINE_TUNE", "false")
    monkeypatch.setenv("CRUIJFF_ORCHESTRATION__EXECUTOR", "slurm")
    monkeypatch.setenv("CRUIJFF_RESOURCES", '{"default": {"account": "envacct"}}')
    config = ExperimentConfig.load(write(
        tmp_path, "use_fine_tune: true\nresources:\n  default:\n    account: fileacct\n"))
    assert config.use_fine_tune is False
    assert config.orchestration.executor == "slurm"
    assert config.resources["default"].account == "envacct"


def test_model_resources_merge_over_default(tmp_path):
    config = ExperimentConfig.load(write(tmp_path, """
resources:
  default: {nodes: 1, time: "00:30:00", account: cses, mem: 4}
  meta-llama__Llama-3.2-1B-Instruct: {mem: 8, gres: 1, constraint: a100}
"""))
    merged = config.resources_for("meta-llama__Llama-3.2-1B-Instruct")
    assert merged.model_dump(exclude_none=True) == {
        "nodes": 1, "time": "00:30:00", "account": "cses", "mem": 8, "gres": 1,
        "constraint": "a100"}
    assert config.resources_for("other__model").mem == 4


@pytest.mark.parametrize(("text", "message"), [
    ("use_finetune: true\n", "unknown key 'use_finetune' (did you mean 'use_fine_tune'?)"),
    ("orchestration:\n  exector: slurm\n",
     "unknown key 'orchestration.exector' (did you mean 'executor'?)"),
    ("orchestration:\n  executor: k8s\n", "orchestration.executor"),
    ("resources:\n  llama: {mem: 8}\n", "must be 'default' or a model as '<org>__<name>'"),
    ("resources:\n  default: {mem: lots}\n", "resources.default.mem"),
    ("- a\n- b\n", "must hold a mapping"),
    ("a: [1\n", "invalid YAML"),
])
def test_config_errors_name_the_problem(tmp_path, text, message):
    with pytest.raises(CruijffError) as info:
        ExperimentConfig.load(write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)
