"""Hostile designs that looked like settings: a `_component_` torchtune would call, a grid of a
million trials, NaN and infinities, one key under two names. Each is refused at build with
one line and exit 2, and nothing is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from cruijff.components import ALLOWED_NAMESPACES, _outside, check_components, named_components
from cruijff.errors import CruijffError
from cruijff.fileio import load_yaml_mapping
from cruijff.models import PACKAGE_CONFIGS, torchtune_config_path

TINY = "cruijff/tiny-llama-random"


def build(cli, project, *extra, name="exp"):
    return cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
               "--dataset", "d.json", "--name", name, *extra, cwd=project.experiments)


def assert_refused(result, project, expected):
    assert result.code == 2, (result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.err + result.out
    assert [p.name for p in project.experiments.iterdir()] == []


# --- `_component_`: torchtune imports and calls whatever it names ---------------------------

COMPONENT_CASES = [
    ("section-replaced-by-os-system",
     ["--treatments", json.dumps({"finetune.metric_logger": {
         "_component_": "os.system", "command": "touch {canary}"}})],
     "key 'finetune.metric_logger._component_' names 'os.system'"),
    ("component-key-set-directly", ["--control", "torchtune.optimizer._component_=os.system"],
     "key 'finetune.optimizer._component_' names 'os.system'"),
    ("nested-in-a-section",
     ["--treatments", json.dumps({"finetune.optimizer": {
         "_component_": "torch.optim.AdamW", "lr": 0.001,
         "params": {"_component_": "builtins.exec", "source": "open('{canary}', 'w')"}}})],
     "key 'finetune.optimizer.params._component_' names 'builtins.exec'"),
    ("inside-a-list",
     ["--treatments", json.dumps({"finetune.metric_logger": {
         "_component_": "torchtune.training.metric_logging.DiskLogger",
         "hooks": [{"_component_": "subprocess.run", "args": "touch {canary}"}]}})],
     "key 'finetune.metric_logger.hooks._component_' names 'subprocess.run'"),
    ("a-treatment-list-value",
     ["--treatments", json.dumps({"finetune.loss": [
         {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
         {"_component_": "os.popen", "cmd": "touch {canary}"}]})],
     "key 'finetune.loss._component_' names 'os.popen'"),
    ("spelled-inside-torchtune",
     ["--control",
      "finetune.optimizer._component_=torchtune.training.checkpointing._checkpointer.os.system"],
     "goes through os, defined outside torchtune"),
    ("spelled-inside-torch-optim",
     ["--control", "finetune.optimizer._component_=torch.optim.optimizer.torch.load"],
     "goes through torch, defined outside"),
    ("torchtunes-own-loader", ["--control",
                               "finetune.optimizer._component_=torchtune.config.instantiate"],
     "names 'torchtune.config.instantiate', which cruijff does not let a config instantiate"),
    ("dunder-attribute", ["--control", "finetune.optimizer._component_="
                          "torchtune.models.llama2.lora_llama2.__globals__"],
     "which cruijff does not let a config instantiate"),
    ("not-a-string", ["--treatments", json.dumps({"finetune.loss": {"_component_": ["os"]}})],
     "key 'finetune.loss._component_' names ['os']"),
    ("prompt-template-path", ["--control", "finetune.tokenizer.prompt_template=os.abort"],
     "key 'finetune.tokenizer.prompt_template' names 'os.abort'"),
    ("resolver-reads-the-environment",
     ["--control", "finetune.tokenizer.prompt_template=${oc.env:HF_TOKEN}"],
     "key 'finetune.tokenizer.prompt_template': '${oc.env:HF_TOKEN}' calls an OmegaConf "
     "resolver"),
    ("resolver-builds-a-section", ["--treatments", json.dumps({"finetune.loss": {
        "_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss",
        "num_output_chunks": "${oc.create:'{_component_: os.system, command: touch x}'}"}})],
     "key 'finetune.loss.num_output_chunks': \"${oc.create:'{_component_: os.system, command: "
     "touch x}'}\" calls an OmegaConf resolver"),
    ("for-the-eval-stage", ["--treatments", json.dumps({"eval.model_args": {
        "device": {"_component_": "os.system", "command": "touch {canary}"}}})],
     "key 'eval.model_args.device._component_': only the fine-tune (torchtune) config"),
]


@pytest.mark.parametrize(("extra", "expected"), [c[1:] for c in COMPONENT_CASES],
                         ids=[c[0] for c in COMPONENT_CASES])
def test_a_component_outside_torchtune_is_refused_at_build(cli, project, tmp_path, extra,
                                                           expected):
    canary = tmp_path / "CANARY"
    extra = [arg.replace("{canary}", str(canary)) for arg in extra]
    result = build(cli, project, *extra)
    assert_refused(result, project, expected)
    if "resolver" not in expected and "only the fine-tune" not in expected:
        # a refused component: the line says what is allowed
        assert "allowed are torchtune.*, torch.optim.*, bitsandbytes.optim.*" in result.err
        assert "that config.yaml's finetune_config file names itself" in result.err
    assert not canary.exists()


def test_torchtune_components_and_what_the_finetune_config_names_build(cli, project):
    """Torchtune's own components (also a deliberate re-export and a qlora partial), the
    optimizers, and a component only the user's finetune_config names, in any section."""
    own = load_yaml_mapping(PACKAGE_CONFIGS / "tiny_llama_lora.yaml")
    own["optimizer"]["_component_"] = "mylab.optim.Lion"
    (project.root / "tt.yaml").write_text(yaml.safe_dump(own))
    # fine-tune only: the prompt templates below would (rightly) fail the eval's format check
    project.write_config(project.config.read_text()
                         + "finetune_config: tt.yaml\npipeline: [finetune]\n")
    treatments = [
        {"finetune.optimizer._component_": "torch.optim.SGD"},
        {"finetune.loss": {"_component_": "mylab.optim.Lion"}},
        {"finetune.lr_scheduler._component_":
         "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup"},
        {"finetune.model._component_": "torchtune.models.llama2.qlora_llama2_7b"},
        {"finetune.optimizer": {
            "_component_": "torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer"}},
        {"finetune.tokenizer.prompt_template": "torchtune.models.llama2.Llama2ChatTemplate",
         "finetune.checkpointer.model_type": "${output_dir}"},  # a plain reference is data
        {"finetune.tokenizer.prompt_template": {"user": ["[INST] ", " [/INST]"]}},
    ]
    result = build(cli, project, "--treatments", json.dumps(treatments))
    assert result.code == 0, result.err
    trial = project.experiments / "exp"
    components = [yaml.safe_load((trial / f"trial-{t}" / "finetune.yaml").read_text())
                  for t in "abcdef"]
    assert components[0]["optimizer"]["_component_"] == "mylab.optim.Lion"
    assert components[1]["optimizer"]["_component_"] == "torch.optim.SGD"
    assert components[2]["loss"]["_component_"] == "mylab.optim.Lion"
    # named nowhere: refused even with a finetune_config
    result = build(cli, project, "--control", "finetune.optimizer._component_=mylab.optim.Other",
                   name="other")
    assert result.code == 2 and "names 'mylab.optim.Other'" in result.err
    assert not (project.experiments / "other").exists()


def _built_in_configs() -> list[Path]:
    recipes = torchtune_config_path("llama3_2/1B_lora_single_device").parents[1]
    return [*sorted(recipes.rglob("*.yaml")), *sorted(PACKAGE_CONFIGS.glob("*.yaml"))]


def test_every_component_the_built_in_configs_name_is_allowed():
    """cruijff's and torchtune's own configs stay buildable with their components set by a
    design (names a config file holds are trusted anyway): each is in an allowed namespace
    and, where it can be imported here, really is a component from there."""
    configs = _built_in_configs()
    assert len(configs) > 100
    names = set().union(*(named_components(load_yaml_mapping(c)) for c in configs))
    assert {"torch.optim.AdamW", "torchtune.training.metric_logging.DiskLogger"} <= names
    for config in configs:
        check_components(load_yaml_mapping(config), "finetune",
                         named_components(load_yaml_mapping(config)))
    for name in sorted(names):
        assert name.split(".")[0] in {n.split(".")[0] for n in ALLOWED_NAMESPACES}, name
        reason = _outside(name)
        assert reason is None or reason.startswith("cannot be imported here ("), (name, reason)
        if reason is not None:  # optional packages (bitsandbytes, torchvision) missing here
            assert "torchvision" in reason or "bitsandbytes" in reason, (name, reason)


def test_the_tiny_and_a_torchtune_built_in_config_build(cli, project, family_models):
    """The tiny model's config (cruijff/configs) and a Llama family's torchtune built-in
    (the Llama-3.2-shaped tiny model stands in for the hub's files)."""
    llama = "meta-llama/Llama-3.2-1B-Instruct"
    shutil.copytree(family_models["cruijff/tiny-llama3"],
                    project.root / "models" / llama.replace("/", "__"))
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--model", llama, "--dataset", "d.json", "--name", "exp",
                 "--treatment", "finetune.optimizer._component_=torch.optim.AdamW",
                 cwd=project.experiments)
    assert result.code == 0, result.err
    models = {yaml.safe_load(p.read_text())["model"]["_component_"]
              for p in (project.experiments / "exp").glob("trial-*/finetune.yaml")}
    assert models == {"torchtune.models.llama2.lora_llama2",
                      "torchtune.models.llama3_2.lora_llama3_2_1b"}


def test_a_component_check_names_the_key_path():
    with pytest.raises(CruijffError, match=r"key 'finetune\.a\.b\._component_' names 'x\.y'"):
        check_components({"a": {"b": [{"_component_": "x.y"}]}}, "finetune")


# --- the number of trials, counted before expanding ------------------------------------------

def test_a_million_trial_grid_is_refused_before_expanding(cli, project):
    values = list(range(1000))
    treatment = {"finetune.seed": values, "eval.generate.seed": values}
    result = build(cli, project, "--treatments", json.dumps(treatment))
    assert_refused(result, project, "the design makes up to 1,000,001 trials; the limit is "
                   "max_trials = 10,000")
    assert "CRUIJFF_MAX_TRIALS" in result.err
    result = build(cli, project, "--dry-run", "--treatments", json.dumps(treatment))
    assert result.code == 2 and "1,000,001 trials" in result.err


def test_a_grid_too_large_to_print_is_refused(cli, project):
    treatment = {f"eval.task_args.k{i}": [1, 2] for i in range(5000)}  # 2**5000 trials
    assert_refused(build(cli, project, "--treatments", json.dumps(treatment)), project,
                   "the design makes at least 1,000,000,000,000,000 trials")


@pytest.mark.parametrize(("limit", "code"), [(5, 2), (6, 0)])
def test_max_trials_in_config_sets_the_limit(cli, project, limit, code):
    project.write_config(project.config.read_text() + f"max_trials: {limit}\n")
    treatment = {"finetune.model.lora_rank": [1, 2, 4, 8, 16]}  # 5 + the control trial
    result = build(cli, project, "--treatments", json.dumps(treatment))
    assert result.code == code, result.err
    if code:
        assert_refused(result, project,
                       "the design makes up to 6 trials; the limit is max_trials = 5")
    else:
        assert len(list((project.experiments / "exp").glob("trial-*"))) == 6


def test_max_trials_from_the_environment(cli, project, monkeypatch):
    monkeypatch.setenv("CRUIJFF_MAX_TRIALS", "2")
    result = build(cli, project, "--treatments",
                   json.dumps({"model": [TINY, "cruijff/tiny-llama"], "finetune.epochs": 2}))
    assert_refused(result, project, "the design makes up to 4 trials; the limit is max_trials = 2")


# --- NaN and infinities ------------------------------------------------------------------------

@pytest.mark.parametrize(("extra", "expected"), [
    (["--control", "torchtune.optimizer.lr=.nan"], "key 'finetune.optimizer.lr': nan is not"),
    (["--treatment", "torchtune.optimizer.lr=.inf"], "key 'finetune.optimizer.lr': inf is not"),
    (["--treatment", "torchtune.optimizer.lr=-.Inf"], "key 'finetune.optimizer.lr': -inf is"),
    (["--controls", '{"torchtune.optimizer.lr": 1e999}'], "key 'finetune.optimizer.lr': inf"),
    (["--treatments", '{"torchtune.optimizer.lr": [0.1, -1e999]}'],
     "key 'finetune.optimizer.lr': -inf is not a finite number"),
    (["--treatments", '{"finetune.optimizer": {"_component_": "torch.optim.AdamW", '
                      '"lr": 1e999}}'], "key 'finetune.optimizer.lr': inf is not"),
    (["--treatment", "eval.generate.stop_seqs=[a, [.nan]]"], "key 'eval.generate.stop_seqs'"),
], ids=["yaml-nan", "yaml-inf", "yaml-minus-inf", "json-1e999", "json-in-a-list",
        "json-in-a-mapping", "yaml-nested-list"])
def test_nan_and_infinities_in_a_design_are_refused(cli, project, extra, expected):
    assert_refused(build(cli, project, *extra), project, expected)


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("    account: cses\n", "    account: cses\n    mem: .nan\n",
     "resources.default.mem: Input should be a finite number"),
    ("    account: cses\n", "    account: cses\n    nice: .nan\n",
     "nice nan is not a finite number"),
    ("run_control_trials: true\n", "run_control_trials: true\norchestration:\n"
     "  submit_timeout_s: .inf\n", "orchestration.submit_timeout_s: Input should be a finite"),
    ("run_control_trials: true\n", "run_control_trials: true\nmax_trials: .nan\n",
     "max_trials: Input should be a finite number"),
], ids=["mem", "pass-through", "submit-timeout", "max-trials"])
def test_nan_and_infinities_in_config_yaml_are_refused(cli, project, old, new, expected):
    """An infinite sbatch budget would let a hanging sbatch hang the run; a NaN pass-through
    value would reach sbatch as `--nice=nan`."""
    text = project.config.read_text()
    assert text.count(old) == 1
    project.write_config(text.replace(old, new))
    assert_refused(build(cli, project), project, expected)


# --- one key under two names -----------------------------------------------------------------

@pytest.mark.parametrize(("option", "data", "expected"), [
    ("--treatments", {"finetune.model.lora_rank": 4, "torchtune.model.lora_rank": 8},
     "--treatments sets finetune.model.lora_rank twice, as 'finetune.model.lora_rank' and "
     "'torchtune.model.lora_rank'"),
    ("--treatments", [{"finetune.epochs": 1}, {"eval.limit": 5, "inspect.limit": 5}],
     "--treatments item 2 sets eval.limit twice, as 'eval.limit' and 'inspect.limit'"),
    ("--controls", {"inspect.limit": 5, "eval.limit": 6},
     "--controls sets eval.limit twice, as 'inspect.limit' and 'eval.limit'"),
    ("--controls", {"torchtune.epochs": 1, "finetune.epochs": 1},
     "--controls sets finetune.epochs twice"),
], ids=["treatment-differing", "treatment-list-equal", "controls-differing", "controls-equal"])
def test_one_key_under_two_names_is_refused(cli, project, option, data, expected):
    assert_refused(build(cli, project, option, json.dumps(data)), project, expected)


def test_one_key_under_two_names_in_a_file_is_refused(cli, project):
    path = project.experiments.parent / "controls.json"
    path.write_text('{"torchtune.model.lora_alpha": 16, "finetune.model.lora_alpha": 32}')
    assert_refused(build(cli, project, "--control-path", path), project,
                   "sets finetune.model.lora_alpha twice")
