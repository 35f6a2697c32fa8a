"""`cruijff build` writes the spec's layout, and every spec example works as written."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import EXAMPLE

M1, M70 = "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-70B-Instruct"
TINY = "cruijff/tiny-llama-random"


def load(path):
    return yaml.safe_load(path.read_text())


@pytest.fixture
def spec_site(tmp_path, family_models):
    """The spec's folders, with the example task and stand-in weights under the Llama names:
    real Llama weights cannot be downloaded here, so the Llama-3.2-shaped tiny model (same
    files, same tokenizer) stands in for them."""
    site = tmp_path / "cruijff"
    shutil.copytree(EXAMPLE / "tasks", site / "tasks")
    for model in (M1, M70):
        shutil.copytree(family_models["cruijff/tiny-llama3"],
                        site / "models" / model.replace("/", "__"))
    (site / "experiments").mkdir()
    config = site / "experiments" / "config.yaml"
    config.write_text(f"""
model_dir: {site}/models
data_dir: {site}/data
tasks_dir: {site}/tasks
use_fine_tune: True
use_prompt_opt: False
run_control_trials: True
resources:
  default: {{nodes: 1, ntasks_per_node: 1, time: "00:30:00", account: cses}}
  meta-llama__Llama-3.2-1B-Instruct: {{mem: 8, gres: 1}}
  meta-llama__Llama-3.2-70B-Instruct: {{mem: 8, gres: 4}}
""")
    return site


def built_trials(cli, *args, cwd):
    result = cli("build", *args, "--json", cwd=cwd)
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_spec_example_key_value_form_with_stand_in_llama(cli, spec_site):
    exps = spec_site / "experiments"
    out = built_trials(
        cli, "--config-path", exps / "config.yaml", "--task", "capitalization",
        "--dataset", "words_5L_80_1000.json", "--model", M1,
        "--control", "torchtune.model.lora_alpha=32",
        "--treatment", "torchtune.model.lora_rank=4",
        "--treatment", "torchtune.model.lora_rank=64", "--name", "my-awesome-experiment",
        cwd=exps,
    )
    assert [t["label"] for t in out["trials"]] == [
        "control", "finetune.model.lora_rank=4", "finetune.model.lora_rank=64"]
    exp = exps / "my-awesome-experiment"
    assert (exps / "config.yaml").is_file() and (exp / "config.yaml").is_file()
    for trial in "abc":
        folder = exp / f"trial-{trial}"
        for name in ("config.yaml", "finetune.yaml", "finetune.slurm", "eval.yaml", "eval.slurm"):
            assert (folder / name).is_file(), name
        assert (folder / "checkpoints").is_dir()
    finetune = load(exp / "trial-b" / "finetune.yaml")
    assert finetune["model"]["lora_rank"] == 4 and finetune["model"]["lora_alpha"] == 32
    assert finetune["model"]["_component_"] == "torchtune.models.llama3_2.lora_llama3_2_1b"
    assert finetune["tokenizer"]["path"].endswith(
        "meta-llama__Llama-3.2-1B-Instruct/original/tokenizer.model")
    assert finetune["checkpointer"]["checkpoint_files"] == ["model.safetensors"]
    assert finetune["dataset"]["data_files"] == str(spec_site / "data" / "words_5L_80_1000.json")
    assert finetune["output_dir"] == str(exp / "trial-b" / "checkpoints")
    assert (spec_site / "data" / "words_5L_80_1000.json").is_file()
    resolved = load(exp / "config.yaml")
    assert resolved["design"]["controls"] == {"finetune.model.lora_alpha": 32}
    assert [t["id"] for t in resolved["trials"]] == ["a", "b", "c"]
    evaluation = load(exp / "trial-a" / "eval.yaml")
    assert evaluation["task_args"]["data_path"].endswith("words_5L_80_1000.json")
    assert evaluation["task_args"]["data_ext"] == "json"
    assert evaluation["model"] == f"hf/{exp / 'trial-a' / 'checkpoints' / 'final'}"
    assert "#SBATCH --gres=gpu:1" in (exp / "trial-a" / "finetune.slurm").read_text()


def test_spec_example_json_strings_vary_the_model(cli, spec_site):
    exps = spec_site / "experiments"
    out = built_trials(
        cli, "--config-path", exps / "config.yaml", "--task", "capitalization",
        "--dataset", "words_5L_80_1000.json",
        "--controls", '{"torchtune.model.lora_alpha": 32}',
        "--treatments", json.dumps({"model": [M1, M70], "torchtune.model.lora_rank": 4}),
        cwd=exps,
    )
    assert [(t["model"], t["control"]) for t in out["trials"]] == [
        (M1, None), (M70, None), (M1, "a"), (M70, "b")]
    exp = exps / out["name"]
    big = (exp / "trial-d" / "finetune.slurm").read_text()
    assert "#SBATCH --gres=gpu:4" in big and "lora_finetune_distributed" in big
    files = load(exp / "trial-d" / "finetune.yaml")["checkpointer"]["checkpoint_files"]
    assert files == ["model.safetensors"]


def test_spec_example_json_files_vary_the_dataset(cli, spec_site):
    exps = spec_site / "experiments"
    (exps / "controls.json").write_text('{"torchtune.model.lora_alpha": 32}')
    (exps / "treatments.json").write_text(
        '{"dataset": ["words_5L_80_1000.json", "words_10L_80_1000.json"], '
        '"torchtune.model.lora_rank": 4}')
    out = built_trials(
        cli, "--config-path", exps / "config.yaml", "--task", "capitalization", "--model", M1,
        "--control-path", exps / "controls.json", "--treatment-path", exps / "treatments.json",
        cwd=exps,
    )
    assert [(t["dataset"], t["label"]) for t in out["trials"]] == [
        ("words_5L_80_1000.json", "control"), ("words_10L_80_1000.json", "control"),
        ("words_5L_80_1000.json", "dataset=words_5L_80_1000.json, finetune.model.lora_rank=4"),
        ("words_10L_80_1000.json", "dataset=words_10L_80_1000.json, finetune.model.lora_rank=4"),
    ]
    assert (spec_site / "data" / "words_10L_80_1000.json").is_file()


def test_dry_run_lists_trials_and_writes_nothing(cli, project):
    args = ["build", "--config-path", project.config, "--task", "toy", "--model", TINY,
            "--dataset", "fresh.json", "--control", "finetune.model.lora_alpha=32",
            "--treatments", '{"finetune.model.lora_rank": [4, 8, 16, 32]}', "--dry-run"]
    result = cli(*args, "--json", cwd=project.experiments)
    assert result.code == 0, result.err
    assert len(json.loads(result.out)["trials"]) == 5
    project.config.write_text(project.config.read_text().replace(
        "run_control_trials: true", "run_control_trials: false"))
    table = cli(*args, cwd=project.experiments)
    assert table.code == 0 and "4 trials" in table.out and "Dry run" in table.out
    assert list(project.experiments.iterdir()) == []
    assert not (project.root / "data").exists()


def test_building_twice_refuses_and_force_archives(cli, project):
    args = ["build", "--config-path", project.config, "--task", "toy", "--model", TINY,
            "--dataset", "d.json", "--treatment", "finetune.model.lora_rank=4", "--name", "exp"]
    assert cli(*args, cwd=project.experiments).code == 0
    exp = project.experiments / "exp"
    marker = exp / "trial-a" / "checkpoints" / "result.txt"
    marker.write_text("precious")
    again = cli(*args, cwd=project.experiments)
    assert again.code == 2 and "already exists" in again.err and "--force" in again.err
    assert marker.read_text() == "precious"
    forced = cli(*args, "--force", cwd=project.experiments)
    assert forced.code == 0, forced.err
    archived = list((project.experiments / ".archive").iterdir())
    assert len(archived) == 1
    assert (archived[0] / "trial-a" / "checkpoints" / "result.txt").read_text() == "precious"
    assert not (exp / "trial-a" / "checkpoints" / "result.txt").exists()


def test_base_model_trial_has_no_finetune_stage(cli, project):
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--treatment", "use_fine_tune=false", "--name", "e",
                 cwd=project.experiments)
    assert result.code == 0, result.err
    base = project.experiments / "e" / "trial-b"
    assert not (base / "finetune.yaml").exists() and (base / "eval.slurm").exists()
    base_model = project.root / "models" / TINY.replace("/", "__")
    assert load(base / "eval.yaml")["model"] == f"hf/{base_model}"


def test_eval_keys_reach_task_args_and_generate(cli, project):
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--control", "inspect.shots=3",
                 "--treatment", "eval.generate.max_tokens=5", "--name", "e",
                 cwd=project.experiments)
    assert result.code == 0, result.err
    evaluation = load(project.experiments / "e" / "trial-b" / "eval.yaml")
    assert evaluation["task_args"]["shots"] == 3
    assert evaluation["generate"]["max_tokens"] == 5


def test_eval_checkpoint_picks_an_epoch_of_the_fine_tune(cli, project):
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--treatment", "eval.checkpoint=epoch_0", "--name", "e",
                 cwd=project.experiments)
    assert result.code == 0, result.err
    control = load(project.experiments / "e" / "trial-a" / "eval.yaml")
    early = load(project.experiments / "e" / "trial-b" / "eval.yaml")
    assert control["checkpoint"] == "final" and control["model"].endswith("/checkpoints/final")
    assert early["checkpoint"] == "epoch_0" and early["model"].endswith("/checkpoints/epoch_0")
    bad = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
              "--dataset", "d.json", "--treatment", "eval.checkpoint=../x", "--name", "f",
              cwd=project.experiments)
    assert bad.code == 2 and "must be 'final' or 'epoch_<N>'" in bad.err


# --- Per-stage resource profiles, work sizes, and warnings from past runs ---------------------


def _build_json(cli, project, *extra):
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--name", "e", *extra, "--json",
                 cwd=project.experiments)
    assert result.code == 0, result.err
    return json.loads(result.out)


STAGED = """
model_dir: models
data_dir: data
tasks_dir: tasks
resources:
  default:
    time: "00:30:00"
    account: cses
    stages:
      eval: {time: "00:10:00"}
  cruijff__tiny-llama-random:
    mem: 8
    gres: 1
    stages:
      finetune: {mem: 16, time: "02:00:00"}
"""


def test_each_stage_script_asks_for_its_stage_profile_and_the_worker_for_the_most(cli,
                                                                                project):
    project.write_config(STAGED)
    _build_json(cli, project)
    trial = project.experiments / "e" / "trial-a"
    finetune, evaluation = ((trial / f"{s}.slurm").read_text() for s in ("finetune", "eval"))
    assert "#SBATCH --mem=16G" in finetune and "#SBATCH --time=02:00:00" in finetune
    assert "#SBATCH --mem=8G" in evaluation and "#SBATCH --time=00:10:00" in evaluation
    assert "stages" not in finetune + evaluation
    config = load(trial / "config.yaml")
    # one worker job runs both stages: it asks for the most of each field
    assert config["resources"] == {"time": "02:00:00", "account": "cses", "mem": 16, "gres": 1}
    assert config["stage_resources"] == {
        "finetune": {"time": "02:00:00", "account": "cses", "mem": 16, "gres": 1},
        "eval": {"time": "00:10:00", "account": "cses", "mem": 8, "gres": 1}}
    from cruijff.experiment import trial_stage_profile

    assert trial_stage_profile(trial, "eval").mem == 8


def test_without_stage_overrides_the_trial_config_keeps_its_one_profile(cli, project):
    _build_json(cli, project)
    config = load(project.experiments / "e" / "trial-a" / "config.yaml")
    assert config["resources"] == {"nodes": 1, "ntasks_per_node": 1, "time": "00:30:00",
                                   "account": "cses", "mem": 8, "gres": 1}
    assert "stage_resources" not in config


CONFIG_WITH_STAGES = """
model_dir: models
data_dir: data
tasks_dir: tasks
resources:
  cruijff__tiny-llama-random:
    mem: 8
    stages: {stages}
"""


@pytest.mark.parametrize(("stages", "words"), [
    ("{fintune: {mem: 16}}", "resources.cruijff__tiny-llama-random.stages.fintune: the "
     "pipeline has no stage 'fintune' (finetune, prompt_opt, eval) (did you mean 'finetune'?)"),
    ("{finetune: {partition: gpu}, eval: {partition: cpu}}",
     "the stages ask for different partition (finetune gpu, eval cpu)"),
    ("{finetune: {stages: {eval: {}}}}", "a stage's profile cannot hold stages itself"),
])
def test_stage_profiles_that_cannot_work_are_refused_in_one_line(cli, project, stages, words):
    project.write_config(CONFIG_WITH_STAGES.format(stages=stages))
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", cwd=project.experiments)
    assert result.code == 2 and words in result.err and len(result.err.splitlines()) == 1




def test_each_trial_records_the_size_of_its_stages_work(cli, project, tiny_random_model):
    from safetensors import safe_open

    _build_json(cli, project, "--treatment", "finetune.epochs=2")
    with safe_open(next(tiny_random_model.glob("*.safetensors")), "pt") as weights:
        names = list(weights.keys())
        parameters = sum(weights.get_tensor(name).numel() for name in names)
    control, treated = (load(project.experiments / "e" / f"trial-{t}" / "config.yaml")["sizes"]
                        for t in "ab")
    finetune = load(project.experiments / "e" / "trial-a" / "finetune.yaml")
    # the toy dataset: one 'train' record, no 'test' record
    assert control == {
        "finetune": {"epochs": finetune["epochs"], "train_examples": 1,
                     "batch_size": finetune["batch_size"], "parameters": parameters},
        "eval": {"eval_samples": 0, "parameters": parameters}}
    assert treated["finetune"]["epochs"] == 2


def _past_runs(root, memory_gib, wall_s, n=3):
    from compute_support import Attempt, write_experiment

    for i in range(n):
        write_experiment(root, f"past-{i}", TINY, [
            Attempt("finetune", wall_s - i, (memory_gib - i * 0.5) * 1024),
            Attempt("eval", 60 - i, (0.5 - i * 0.1) * 1024)])


def test_build_warns_of_a_profile_that_asks_for_less_than_past_runs_used(cli, project):
    _past_runs(project.experiments, memory_gib=11, wall_s=2400)
    built = _build_json(cli, project)
    assert ("cruijff__tiny-llama-random/finetune asks mem 8G, but past-0/trial-a "
            "(2026-11-30) used 11.0G: likely OUT_OF_MEMORY") in built["warnings"]
    assert ("cruijff__tiny-llama-random/finetune asks time 00:30:00, but past-0/trial-a "
            "(2026-11-30) took 00:40:00: likely TIMEOUT") in built["warnings"]
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--dry-run", cwd=project.experiments)
    assert result.code == 0
    assert "warning: cruijff__tiny-llama-random/finetune asks mem 8G" in result.err


def test_build_warns_of_a_profile_that_asks_for_far_more_than_past_runs_used(cli, project):
    _past_runs(project.experiments, memory_gib=1.5, wall_s=100)
    built = _build_json(cli, project)
    assert built["warnings"] == [
        "cruijff__tiny-llama-random/finetune asks mem 8G, over 4× the most a run used: "
        "past-0/trial-a (2026-11-30) used 1.5G: likely waste",
        "cruijff__tiny-llama-random/finetune asks time 00:30:00, over 4× the longest a run "
        "took: past-0/trial-a (2026-11-30) took 00:01:40: likely waste",
        "cruijff__tiny-llama-random/eval asks mem 8G, over 4× the most a run used: "
        "past-0/trial-a (2026-11-30) used 0.5G: likely waste",
        "cruijff__tiny-llama-random/eval asks time 00:30:00, over 4× the longest a run took: "
        "past-0/trial-a (2026-11-30) took 00:01:00: likely waste"]


def test_build_without_history_warns_of_nothing(cli, project):
    assert _build_json(cli, project)["warnings"] == []
