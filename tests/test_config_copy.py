"""The config.yaml `cruijff build` copies beside the experiments means what the original
meant: building from the copy finds the same tasks, data and models (issue 16, item 8)."""

from __future__ import annotations

from pathlib import Path

import yaml

from cruijff.experiment import relocated_config

TINY = "cruijff/tiny-llama-random"


def _build(cli, config: Path, root: Path, name: str, cwd: Path):
    return cli("build", "--config-path", config, "--task", "toy", "--model", TINY,
               "--dataset", "d.json", "--treatment", "finetune.model.lora_rank=4",
               "--name", name, "--root", root, cwd=cwd)


def _experiment(path: Path) -> dict:
    return yaml.safe_load((path / "config.yaml").read_text())


def test_building_from_the_copied_config_finds_the_same_task(cli, project, tmp_path):
    project.write_config(project.config.read_text().replace(
        "tasks_dir: tasks", "tasks_dir: tasks  # the project's tasks"))
    root = tmp_path / "elsewhere" / "exps"  # another folder than the config's
    assert _build(cli, project.config, root, "first", cwd=tmp_path).code == 0
    copy = root / "config.yaml"
    # what the copy used to be, byte for byte, names a tasks folder that is not there
    verbatim = tmp_path / "verbatim" / "config.yaml"
    verbatim.parent.mkdir()
    verbatim.write_text(project.config.read_text())
    old = _build(cli, verbatim, root, "old", cwd=tmp_path)
    assert old.code == 2 and "task 'toy' not found" in old.err
    again = _build(cli, copy, root, "second", cwd=root)
    assert again.code == 0, again.err
    first, second = _experiment(root / "first"), _experiment(root / "second")
    assert second["task"] == first["task"] == "toy"
    for key, folder in (("tasks_dir", "tasks"), ("data_dir", "data"), ("model_dir", "models")):
        meant = str((project.root / folder).resolve())
        assert second["config"][key] == first["config"][key] == meant, key
    text = copy.read_text()
    assert "# the project's tasks" in text and "account: cses" in text
    data = yaml.safe_load(text)
    assert data["tasks_dir"] == "../../tasks"  # relative still: the tree can move whole
    assert data["resources"] == yaml.safe_load(project.config.read_text())["resources"]


def test_a_copy_already_there_is_kept(cli, project, tmp_path):
    root = tmp_path / "exps"
    root.mkdir()
    (root / "config.yaml").write_text("# mine\n")
    assert _build(cli, project.config, root, "e", cwd=tmp_path).code == 0
    assert (root / "config.yaml").read_text() == "# mine\n"


def test_absolute_paths_stay_and_left_out_defaults_are_written_out(tmp_path):
    origin = tmp_path / "proj" / "config.yaml"
    text = ("use_fine_tune: false\ntorchtune_config: ft.yaml   # mine\n"
            "data_dir: /shared/data\n")
    copied = yaml.safe_load(relocated_config(text, origin, tmp_path / "exps"))
    assert copied == {"use_fine_tune": False, "torchtune_config": "../proj/ft.yaml",
                      "data_dir": "/shared/data", "model_dir": "../proj/models",
                      "tasks_dir": "../proj/tasks"}


def test_indented_flow_and_odd_files_read_back_as_meant(tmp_path):
    origin, dest = tmp_path / "a" / "config.yaml", tmp_path / "b"
    for text in ("  use_fine_tune: true\n  tasks_dir: t\n", '{tasks_dir: "my tasks"}',
                 "---\ntasks_dir: t\n...\n", "", "tasks_dir: &x t\neval_config: *x\n"):
        copied = yaml.safe_load(relocated_config(text, origin, dest))
        assert copied["model_dir"] == "../a/models", text
        assert copied["tasks_dir"].startswith("../a/"), text
