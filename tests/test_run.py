"""`cruijff run` for real: torchtune fine-tunes, Inspect evals, Prefect flows on Dask, records.

One small experiment (tiny random model, a few training steps, a few eval samples) is built
and run once; the tests below read what it left on disk and in the Prefect server, then
re-run it, force one stage, and kill a run in the middle of a fine-tune.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cruijff, make_site, says_no_gpu

from cruijff.state import read_record

pytestmark = pytest.mark.slow
TINY = "cruijff/tiny-llama-random"
FAST = ["--control", "torchtune.epochs=1", "--control", "torchtune.max_steps_per_epoch=6",
        "--control", "torchtune.lr_scheduler.num_warmup_steps=0", "--control", "eval.limit=4"]


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_random_model):
    return make_site(tmp_path_factory.mktemp("site"), tiny_random_model)


@pytest.fixture(scope="module")
def env(prefect_env):
    return prefect_env


@pytest.fixture(scope="module")
def experiment(site, env):
    """Trial a: control; b: differs from a only in an eval setting; c: LoRA rank 4."""
    result = cruijff("run", "--config-path", site / "config.yaml", "--root", site,
                     "--name", "three", "--task", "capitalization",
                     "--dataset", "words_5L_80_1000.json", "--model", TINY, *FAST,
                     "--treatment", "eval.limit=2", "--treatment", "torchtune.model.lora_rank=4",
                     env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return site / "three"


def attempt_logs(exp: Path) -> list[str]:
    return sorted(str(p.relative_to(exp)) for p in exp.glob("trial-*/logs/*-attempt*.log"))


def run_ids(exp: Path) -> dict[str, str]:
    return {f"{t.name}/{s}": read_record(t, s).run_id
            for t in sorted(exp.glob("trial-*")) for s in ("finetune", "eval")
            if read_record(t, s) is not None}


def test_finetunes_really_train(experiment):
    from cruijff.stages.finetune import training_losses

    for trial in ("a", "c"):
        losses = training_losses(experiment / f"trial-{trial}" / "logs" / "finetune")
        assert len(losses) == 6
        assert losses[-1] < losses[0], losses
        record = read_record(experiment / f"trial-{trial}", "finetune")
        assert record.status == "done" and record.metrics["steps"] == 6
        final = experiment / f"trial-{trial}" / "checkpoints" / "final"
        assert final.is_symlink() and any(final.glob("*.safetensors"))
        work = record.usage.throughput  # the recipe's own count, and torchtune's logged speed
        assert work["training_tokens"] > 0 and 0 < work["train_s"] < record.usage.wall_s
        assert work["tokens_per_s"] == pytest.approx(work["training_tokens"] / work["train_s"],
                                                     rel=0.01)
        assert record.usage.peak_rss_mib > 100 and record.usage.cpu_s > 0


def test_evals_are_inspect_logs_with_status_success(experiment):
    from inspect_ai.log import read_eval_log

    for trial, samples in (("a", 4), ("b", 2), ("c", 4)):
        record = read_record(experiment / f"trial-{trial}", "eval")
        assert record.status == "done" and record.metrics["samples"] == samples
        log = read_eval_log(str(experiment / f"trial-{trial}" / record.outputs[0]))
        assert log.status == "success"
        assert log.eval.model == f"hf/{TINY}+{trial}"  # named by id, not by its folder
        assert log.eval.model_args["model_path"].endswith("checkpoints/final")
        work = record.usage.throughput
        assert work["samples"] == samples and work["samples_per_s"] > 0
        assert 0 < work["eval_s"] < record.usage.wall_s
    assert read_record(experiment / "trial-b", "finetune").usage is None  # reused: no cost


def test_a_shared_finetune_runs_once(experiment):
    """a and b differ only in an eval setting: one `tune` run, b links to it."""
    finetunes = [p for p in attempt_logs(experiment) if "/finetune-" in p]
    assert finetunes == ["trial-a/logs/finetune-attempt1.log", "trial-c/logs/finetune-attempt1.log"]
    shared = read_record(experiment / "trial-b", "finetune")
    assert shared.status == "reused" and shared.reused_from == "a"
    assert (experiment / "trial-b" / "checkpoints").resolve() == (
        experiment / "trial-a" / "checkpoints").resolve()


def test_prefect_has_tagged_flow_and_task_runs(experiment, env):
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterTags,
        TaskRunFilter,
        TaskRunFilterTags,
    )

    async def query():
        async with PrefectClient(api=env["PREFECT_API_URL"]) as client:
            flows = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=["cruijff", "exp:three"])))
            for _ in range(30):  # task-run records reach the server in batches
                tasks = await client.read_task_runs(task_run_filter=TaskRunFilter(
                    tags=TaskRunFilterTags(all_=["cruijff", "exp:three"])))
                if len([t for t in tasks if t.name.startswith("trial-")]) >= 5:
                    break
                await asyncio.sleep(1)
            return flows, tasks

    flows, tasks = asyncio.run(query())
    names = sorted(f.name for f in flows)
    assert names == ["three", "three/trial-a", "three/trial-b", "three/trial-c"]
    assert all(f.state_type.value == "COMPLETED" for f in flows)
    for flow_run in flows:
        if flow_run.name != "three":
            assert f"trial:{flow_run.name[-1]}" in flow_run.tags
    stage_runs = {t.name: t for t in tasks if t.name.startswith("trial-")}  # not subflow stubs
    assert sorted(stage_runs) == ["trial-a/eval attempt 1", "trial-a/finetune attempt 1",
                                  "trial-b/eval attempt 1", "trial-c/eval attempt 1",
                                  "trial-c/finetune attempt 1"]
    for name, task_run in stage_runs.items():
        trial, stage = name.removeprefix("trial-").removesuffix(" attempt 1").split("/")
        assert {f"trial:{trial}", f"stage:{stage}", "attempt:1"} <= set(task_run.tags)


def test_rerunning_a_complete_experiment_executes_nothing(experiment, env):
    before, ids = attempt_logs(experiment), run_ids(experiment)
    result = cruijff("run", experiment, env=env)
    assert result.returncode == 0, result.stderr
    assert "already complete" in result.stdout
    assert attempt_logs(experiment) == before and run_ids(experiment) == ids


def test_force_one_stage_of_one_trial(experiment, env):
    ids = run_ids(experiment)
    old_log = read_record(experiment / "trial-b", "eval").outputs[0]
    result = cruijff("run", "--stage", "eval", "--trials", "b", "--force", experiment, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    now = run_ids(experiment)
    changed = {k for k in ids if ids[k] != now[k]}
    assert changed == {"trial-b/eval"}
    archived = list((experiment / ".archive").glob("*/trial-b"))
    assert len(archived) == 1
    assert (archived[0] / ".cruijff" / "eval.json").is_file()
    assert (archived[0] / old_log).is_file()
    assert read_record(experiment / "trial-b", "eval").status == "done"


def test_a_second_run_is_refused_while_one_holds_the_lock(experiment, env):
    lock = experiment / ".cruijff" / "run.lock"
    with lock.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write('{"pid": 1}')
        handle.flush()
        result = cruijff("run", experiment, env=env)
    assert result.returncode == 2
    assert "already being run" in result.stderr and "Traceback" not in result.stderr


def test_kill_9_during_a_finetune_then_run_again(site, env):
    build = cruijff("build", "--config-path", site / "config.yaml", "--root", site,
                    "--name", "killed", "--task", "capitalization",
                    "--dataset", "words_5L_80_1000.json", "--model", TINY,
                    "--control", "torchtune.epochs=2", "--control", "eval.limit=2", env=env)
    assert build.returncode == 0, build.stderr
    trial = site / "killed" / "trial-a"
    proc = subprocess.Popen([sys.executable, "-m", "cruijff", "run", "-q", str(site / "killed")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = trial / "logs" / "finetune-attempt1.log"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # wait until torchtune is training
        if log.exists() and "loss" in log.read_text(errors="replace"):
            break
        assert proc.poll() is None, "the run ended before the fine-tune started"
        time.sleep(0.5)
    else:
        pytest.fail("the fine-tune never started")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    record = read_record(trial, "finetune")
    assert record is not None and record.status == "running"
    assert not (trial / "checkpoints" / "final").exists()
    result = cruijff("run", site / "killed", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ("finetune", "eval"):
        assert read_record(trial, stage).status == "done"
    assert read_record(trial, "finetune").attempts == 2
    assert any((trial / "checkpoints" / "final").glob("*.safetensors"))
    leftover = subprocess.run(["pgrep", "-f", str(trial / "finetune.yaml")],
                              capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "a fine-tune from the killed run is still running"


def test_run_json_reports_each_trial(experiment, env):
    result = cruijff("run", "--json", experiment, env=env)
    assert result.returncode == 0
    report = json.loads(result.stdout)
    assert [t["id"] for t in report["trials"]] == ["a", "b", "c"]
    assert report["ran"] is False


def test_a_failing_stage_fails_its_trial_only_after_its_retry(site, env):
    """Trial b's eval cannot load its model (a CUDA device on a CPU machine, a failure cruijff
    cannot tell will repeat): it is retried once, recorded failed with the error's last lines,
    the run exits 1, and trial a still completes. (A missing split is refused at build.)"""
    result = cruijff("run", "--config-path", site / "config.yaml", "--root", site,
                     "--name", "failing", "--task", "capitalization",
                     "--dataset", "words_5L_80_1000.json", "--model", TINY,
                     "--control", "use_fine_tune=false", "--control", "eval.limit=2",
                     "--treatment", "eval.model_args.device=cuda:7", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    good = read_record(site / "failing" / "trial-a", "eval")
    bad = read_record(site / "failing" / "trial-b", "eval")
    assert good.status == "done"
    assert bad.status == "failed" and bad.attempts == 2
    assert says_no_gpu(bad.error) and bad.failure == "transient"
    assert "trial b eval failed: " in result.stderr
    assert (site / "failing" / "trial-b" / "logs" / "eval-attempt2.log").is_file()
    summary = cruijff("summary", site / "failing", env=env)
    assert summary.returncode == 1
    assert "trial b eval failed" in summary.stdout and says_no_gpu(summary.stdout)
