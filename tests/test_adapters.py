"""Adapter-only checkpoints (`save_adapter_weights_only: true`) on the tiny demo model: what
the fine-tune writes per epoch, the model cruijff merges from it for evaluation
(cruijff/adapters.py) against the full save of the same run, and a real run of that
treatment next to its control.

The same 2-epoch LoRA fine-tune runs twice through cruijff's recipe, once saving merged
models and once saving adapters only; with `seed: 0` both train exactly alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_site
from safetensors.torch import load_file

from cruijff.adapters import (
    ADAPTER_WEIGHTS,
    PEFT_WEIGHTS,
    LoraBase,
    checkpoint_shape,
    merged_model,
)
from cruijff.errors import CruijffError
from cruijff.stages import StageFailed
from cruijff.stages.finetune import FinetuneStage

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "cruijff" / "configs" / "tiny_llama_lora.yaml"
EPOCHS = 2
STEPS = 3
TOL = 1e-5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """cruijff/tiny-llama (the pretrained demo base), made once for this module."""
    from cruijff.tiny_model import materialize

    dest = tmp_path_factory.mktemp("models") / "cruijff__tiny-llama"
    materialize("cruijff/tiny-llama", dest)
    return dest


def _fine_tune(trial: Path, model: Path, data: Path, adapter_only: bool) -> Path:
    """Run cruijff's LoRA recipe as a trial's fine-tune lays it out; its finetune.yaml."""
    cfg = yaml.safe_load(TEMPLATE.read_text())
    cfg["output_dir"] = str(trial / "checkpoints")
    cfg["checkpointer"].update(checkpoint_dir=str(model), checkpoint_files=["model.safetensors"],
                               output_dir=str(trial / "checkpoints"))
    cfg["tokenizer"]["path"] = str(model / "tokenizer.model")
    cfg["metric_logger"]["log_dir"] = str(trial / "logs" / "finetune")
    cfg["dataset"]["data_files"] = str(data)
    cfg.update(save_adapter_weights_only=adapter_only, epochs=EPOCHS, max_steps_per_epoch=STEPS)
    cfg["lr_scheduler"]["num_warmup_steps"] = 0  # the very first steps move the adapter
    trial.mkdir(parents=True)
    config = trial / "finetune.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(trial.parent / "hf_datasets")}
    proc = subprocess.run(
        [sys.executable, "-m", "cruijff.recipes.lora_finetune_single_device",
         "--config", str(config)],
        cwd=trial, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    """'full' and 'adapter': trial folders of the same fine-tune, saved each way."""
    root = tmp_path_factory.mktemp("runs")
    words = ["abcd", "hello", "world", "quiz", "lamp", "stone", "river", "cloud"] * 6
    data = root / "data.json"
    data.write_text(json.dumps({"train": [
        {"id": f"w{i:02d}", "input": f"Capitalize: {w}", "output": w.upper()}
        for i, w in enumerate(words)]}))
    trials = {"full": root / "full", "adapter": root / "adapter"}
    for name, trial in trials.items():
        _fine_tune(trial, tiny_llama, data, adapter_only=name == "adapter")
    return trials


def _config(trial: Path) -> dict:
    return yaml.safe_load((trial / "finetune.yaml").read_text())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        weights.update(load_file(shard))
    return weights


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_adapter_only_epochs_hold_no_model_weights(runs, tiny_llama):
    base_bytes = sum(t.numel() * t.element_size()
                     for t in load_file(tiny_llama / "model.safetensors").values())
    for epoch in range(EPOCHS):
        full = runs["full"] / "checkpoints" / f"epoch_{epoch}"
        adapter = runs["adapter"] / "checkpoints" / f"epoch_{epoch}"
        assert checkpoint_shape(full) == "model"
        assert checkpoint_shape(adapter) == "adapter"
        weight_files = {p.name for p in adapter.iterdir()
                        if p.suffix in (".safetensors", ".bin", ".pt", ".pth")}
        assert weight_files == {ADAPTER_WEIGHTS, PEFT_WEIGHTS}
        adapter_bytes = sum(t.numel() * t.element_size() for t in torch.load(
            adapter / ADAPTER_WEIGHTS, weights_only=True).values())
        assert adapter_bytes < base_bytes / 4
        # each file at most the adapter (plus its headers), the whole model missing
        assert max(p.stat().st_size for p in adapter.iterdir()) < 1.1 * adapter_bytes
        assert _bytes(full) - _bytes(adapter) >= base_bytes


def test_finetune_verify_takes_an_adapter_only_run(runs):
    trial = runs["adapter"]
    verified = FinetuneStage().verify(trial, _config(trial))
    final = trial / "checkpoints" / "final"
    assert final.resolve() == (trial / "checkpoints" / f"epoch_{EPOCHS - 1}").resolve()
    assert verified.outputs == [f"checkpoints/epoch_{EPOCHS - 1}", "checkpoints/final"]
    assert verified.metrics["steps"] == EPOCHS * STEPS


def test_finetune_verify_refuses_an_epoch_with_only_the_peft_copy(tmp_path):
    """What the eval merges is torchtune's adapter_model.pt: the PEFT copy alone is not enough."""
    epoch = tmp_path / "checkpoints" / "epoch_0"
    epoch.mkdir(parents=True)
    (epoch / "config.json").write_text("{}")
    (epoch / PEFT_WEIGHTS).write_bytes(b"x")
    with pytest.raises(StageFailed, match="without model or adapter weights"):
        FinetuneStage().verify(tmp_path, {"output_dir": str(tmp_path / "checkpoints")})


def test_merged_model_equals_the_full_save(runs, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    base = LoraBase.from_config(_config(runs["adapter"]), runs["adapter"] / "finetune.yaml")
    dest = tmp_path / ".eval-model"
    ids = torch.tensor([[1, 3, 10, 20, 30, 40, 50, 60]])

    def logits(folder: Path) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            return model(ids).logits

    for epoch in range(EPOCHS):
        full = runs["full"] / "checkpoints" / f"epoch_{epoch}"
        with merged_model(runs["adapter"] / "checkpoints" / f"epoch_{epoch}", base,
                          dest) as folder:
            assert folder.is_relative_to(dest)
            merged, expected = _weights(folder), _weights(full)
            assert sorted(merged) == sorted(expected)
            for key, weight in expected.items():
                torch.testing.assert_close(merged[key], weight, atol=TOL, rtol=0)
            if epoch == EPOCHS - 1:
                tuned = logits(folder)
                torch.testing.assert_close(tuned, logits(full), atol=TOL, rtol=0)
                assert (tuned - logits(tiny_llama)).abs().max() > 1e-3  # not the base
        assert not dest.exists()


def test_a_merge_leaves_no_folder_when_it_or_its_user_fails(runs, tmp_path):
    adapter = runs["adapter"] / "checkpoints" / "epoch_0"
    base = LoraBase.from_config(_config(runs["adapter"]), runs["adapter"] / "finetune.yaml")
    dest = tmp_path / ".eval-model"
    (dest / "epoch_0").mkdir(parents=True)  # left by a killed run
    (dest / "epoch_0" / "stale.safetensors").write_bytes(b"x")
    with pytest.raises(RuntimeError), merged_model(adapter, base, dest) as folder:
        assert not (folder / "stale.safetensors").exists()
        raise RuntimeError("the evaluation failed")
    assert not dest.exists()

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    torch.save({"layers.0.attn.q_proj.lora_a.weight": torch.zeros(4, 7),
                "layers.0.attn.q_proj.lora_b.weight": torch.zeros(128, 4)},
               wrong / ADAPTER_WEIGHTS)
    with pytest.raises(CruijffError, match="does not fit the base model"), \
            merged_model(wrong, base, dest):
        pass
    assert not dest.exists()


def test_lora_base_names_a_config_it_cannot_merge_with(runs):
    config = _config(runs["adapter"])
    config["checkpointer"]["_component_"] = "torchtune.training.FullModelMetaCheckpointer"
    with pytest.raises(CruijffError, match="FullModelHFCheckpointer"):
        LoraBase.from_config(config, Path("finetune.yaml"))
    del config["model"]["lora_alpha"]
    config["checkpointer"]["_component_"] = "torchtune.training.FullModelHFCheckpointer"
    with pytest.raises(CruijffError, match="no lora_alpha"):
        LoraBase.from_config(config, Path("finetune.yaml"))


def test_a_run_with_adapter_only_checkpoints_evaluates(cli, tiny_llama, tmp_path, monkeypatch):
    """Trial a (control) saves merged models, b (the treatment) adapters only: both finish,
    b's eval merges into its trial folder and removes it, and scores exactly like a."""
    from inspect_ai.log import read_eval_log

    from cruijff.pipeline import RunPlan, run_in_process
    from cruijff.state import read_record

    monkeypatch.setenv("CRUIJFF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing may reach it
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    (tmp_path / "site").mkdir()
    site = make_site(tmp_path / "site", tiny_llama)
    result = cli("build", "--config-path", site / "config.yaml", "--root", site,
                 "--name", "adapters", "--task", "capitalization",
                 "--dataset", "words_5L_80_1000.json", "--model", "cruijff/tiny-llama",
                 "--control", f"torchtune.epochs={EPOCHS}",
                 "--control", f"torchtune.max_steps_per_epoch={STEPS}",
                 "--control", "torchtune.lr_scheduler.num_warmup_steps=0",
                 "--control", "eval.limit=4",
                 "--treatment", "finetune.save_adapter_weights_only=true")
    assert result.code == 0, result.err
    exp = site / "adapters"
    outcomes = run_in_process(RunPlan.make(exp, workers=2))
    assert outcomes == {t: {"finetune": "done", "eval": "done"} for t in "ab"}

    a, b = exp / "trial-a", exp / "trial-b"
    assert checkpoint_shape(a / "checkpoints" / "final") == "model"
    assert checkpoint_shape(b / "checkpoints" / "final") == "adapter"
    assert (b / "checkpoints" / "final").resolve().name == f"epoch_{EPOCHS - 1}"
    assert _bytes(b / "checkpoints") < _bytes(a / "checkpoints")
    records = {t: read_record(t, "eval") for t in (a, b)}
    assert "accuracy" in records[b].metrics and records[b].metrics["samples"] == 4
    assert records[b].metrics == records[a].metrics
    logs = {t: read_eval_log(str(t / records[t].outputs[0])) for t in (a, b)}
    assert logs[b].eval.model == f"hf/cruijff/tiny-llama+{b.name.removeprefix('trial-')}"
    assert logs[b].eval.model_args["model_path"] == str(b / ".eval-model" / "epoch_0")
    assert [s.output.completion for s in logs[b].samples] == \
        [s.output.completion for s in logs[a].samples]
    assert not (b / ".eval-model").exists()
    assert {p.name for p in b.iterdir()} == {p.name for p in a.iterdir()}
