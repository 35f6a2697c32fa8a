"""Where a trial's model comes from: `<model_dir>/org__name`, the Hugging Face cache (used in
place, never copied), or a local model folder (a checkpoint fine-tuned elsewhere); and a model
fingerprint that follows the files' content, not the folder they are in."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import cruijff, make_site

from cruijff.errors import CruijffError
from cruijff.models import (
    ARCHITECTURES,
    ensure_model,
    family_of,
    model_fingerprint,
    model_key,
    validate_model,
)
from cruijff.runner import load_experiment, stage_key
from cruijff.settings import CruijffSettings
from cruijff.state import read_record

TINY = "cruijff/tiny-llama-random"
HUB_ID = "org/stand-in"
"""A hub id the cache holds: the tiny random model's files stand in for a real model."""


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def cache_model(cache: Path, model_id: str, source: Path) -> Path:
    """`source`'s files in the cache layout huggingface_hub writes: blobs named by the hub's
    hash (sha256 for weights, which the hub keeps in LFS; git's blob sha1 for small files),
    a snapshot of relative links to them, and refs/main naming that snapshot."""
    repo = cache / f"models--{model_id.replace('/', '--')}"
    commit = hashlib.sha1(model_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        etag = (hashlib.sha256(data).hexdigest() if path.suffix == ".safetensors"
                else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache named by HF_HUB_CACHE. huggingface_hub reads the variable
    once, when it is imported (earlier in this process): its constant is set too."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def site(project, monkeypatch, tmp_path):
    """The project with an empty model_dir and no Prefect server reachable."""
    (project.root / "models" / f"{TINY.replace('/', '__')}").unlink()
    monkeypatch.setenv("CRUIJFF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    return project


def build(cli, site, *args: object, name: str = "exp", model: str = TINY):
    return cli("build", "--config-path", site.config, "--task", "toy", "--model", model,
               "--dataset", "d.json", "--name", name, *args, cwd=site.experiments)


def read_digests(monkeypatch) -> list[str]:
    """The files whose content the fingerprint reads (and hashes) from now on."""
    import cruijff.models

    read: list[str] = []
    real = cruijff.models.file_digest

    def digest(path: Path) -> str:
        read.append(path.name)
        return real(path)

    monkeypatch.setattr(cruijff.models, "file_digest", digest)
    return read


# --- the Hugging Face cache ---------------------------------------------------------------


def test_the_fake_cache_has_the_layout_huggingface_hub_reads(hub_cache, tiny_random_model):
    from huggingface_hub import scan_cache_dir

    snapshot = cache_model(hub_cache, HUB_ID, tiny_random_model)
    [repo] = scan_cache_dir(hub_cache).repos
    assert repo.repo_id == HUB_ID and set(repo.refs) == {"main"}
    [revision] = repo.revisions
    assert revision.snapshot_path == snapshot
    assert revision.nb_files == len(list(tiny_random_model.iterdir()))


def test_a_cached_model_is_used_in_place(hub_cache, tiny_random_model, tmp_path):
    snapshot = cache_model(hub_cache, HUB_ID, tiny_random_model)
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    blobs = sorted((snapshot.parents[1] / "blobs").iterdir())
    assert ensure_model(HUB_ID, model_dir, CruijffSettings(offline=True)) == snapshot
    assert list(model_dir.iterdir()) == []  # nothing downloaded or copied
    assert sorted((snapshot.parents[1] / "blobs").iterdir()) == blobs


def test_model_dir_wins_over_the_cache(hub_cache, tiny_random_model, tmp_path):
    cache_model(hub_cache, HUB_ID, tiny_random_model)
    placed = shutil.copytree(tiny_random_model, tmp_path / "models" / model_key(HUB_ID))
    assert ensure_model(HUB_ID, tmp_path / "models", CruijffSettings(offline=True)) == placed


def test_an_incomplete_snapshot_is_not_used(hub_cache, tiny_random_model, tmp_path):
    """A snapshot without weights (only config.json was fetched) is not a model: offline,
    the one-line error says where to put the files."""
    snapshot = cache_model(hub_cache, HUB_ID, tiny_random_model)
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(CruijffError, match=r"neither in .* nor in the Hugging Face cache"):
        ensure_model(HUB_ID, tmp_path / "models", CruijffSettings(offline=True))


def test_a_build_uses_the_cached_model_without_a_copy(cli, site, hub_cache, tiny_random_model):
    snapshot = cache_model(hub_cache, TINY, tiny_random_model)
    result = build(cli, site)
    assert result.code == 0, result.err
    assert list((site.root / "models").iterdir()) == []  # not materialized, not copied
    trial = site.experiments / "exp" / "trial-a"
    assert load(trial / "config.yaml")["model_path"] == str(snapshot)
    assert load(trial / "finetune.yaml")["checkpointer"]["checkpoint_dir"] == str(snapshot)
    assert load(trial / "eval.yaml")["model"] == f"hf/{trial}/checkpoints/final"


def test_the_installed_command_finds_the_cache_by_hf_hub_cache(site, tmp_path,
                                                                tiny_random_model):
    """The real command in a fresh process: HF_HUB_CACHE alone points it at the cache."""
    cache = tmp_path / "other-cache"
    snapshot = cache_model(cache, TINY, tiny_random_model)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), CRUIJFF_HOME=str(tmp_path / "home"))
    proc = cruijff("build", "--config-path", site.config, "--task", "toy", "--model", TINY,
                   "--dataset", "d.json", "--name", "exp", "--root", site.experiments,
                   "--control", "use_fine_tune=false", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    trial = site.experiments / "exp" / "trial-a"
    assert load(trial / "eval.yaml")["model"] == f"hf/{snapshot}"
    assert list((site.root / "models").iterdir()) == []


# --- the fingerprint ----------------------------------------------------------------------


def test_the_fingerprint_is_the_same_from_the_cache_model_dir_or_a_download(
        hub_cache, tiny_random_model, tmp_path, monkeypatch):
    from huggingface_hub._local_folder import write_download_metadata

    snapshot = cache_model(hub_cache, HUB_ID, tiny_random_model)
    copied = shutil.copytree(tiny_random_model, tmp_path / "models" / "copied")  # new mtimes
    downloaded = shutil.copytree(tiny_random_model, tmp_path / "models" / "downloaded")
    for path in downloaded.iterdir():  # as snapshot_download(local_dir=...) leaves it
        data = path.read_bytes()
        etag = (hashlib.sha256(data).hexdigest() if path.suffix == ".safetensors"
                else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        write_download_metadata(downloaded, path.name, "0" * 40, etag)
    (downloaded / ".gitattributes").write_text("*.safetensors filter=lfs\n")

    reference = model_fingerprint(tiny_random_model)
    assert model_fingerprint(copied) == reference
    read = read_digests(monkeypatch)
    assert model_fingerprint(snapshot) == reference
    assert model_fingerprint(downloaded) == reference
    assert "model.safetensors" not in read  # the hub's recorded sha256, not a second read


def test_the_fingerprint_follows_the_content(tiny_random_model, tmp_path, monkeypatch):
    """A weight file changed after its download record: the record no longer counts."""
    from huggingface_hub._local_folder import write_download_metadata

    folder = shutil.copytree(tiny_random_model, tmp_path / "m")
    weights = folder / "model.safetensors"
    write_download_metadata(folder, weights.name, "0" * 40,
                            hashlib.sha256(weights.read_bytes()).hexdigest())
    before = model_fingerprint(folder)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    stamp = weights.stat().st_mtime + 5
    os.utime(weights, (stamp, stamp))
    assert model_fingerprint(folder) != before
    (folder / "notes.txt").write_text("a new file")
    assert model_fingerprint(folder) != model_fingerprint(tiny_random_model)


def test_the_stage_keys_are_the_same_from_the_cache_or_model_dir(cli, site, hub_cache,
                                                                 tiny_random_model):
    cache_model(hub_cache, TINY, tiny_random_model)
    assert build(cli, site, name="from-cache").code == 0
    shutil.copytree(tiny_random_model, site.root / "models" / model_key(TINY))
    assert build(cli, site, name="from-model-dir").code == 0
    a1 = load_experiment(site.experiments / "from-cache").trial("a")
    a2 = load_experiment(site.experiments / "from-model-dir").trial("a")
    assert a1.model_path != a2.model_path
    for stage in ("finetune", "eval"):
        assert stage_key(a1, stage) == stage_key(a2, stage)


# --- local model folders ------------------------------------------------------------------


def test_an_eval_only_build_of_a_local_folder(cli, site, tiny_random_model):
    folder = shutil.copytree(tiny_random_model, site.root / "elsewhere" / "ckpt-final")
    site.config.write_text(site.config.read_text() + "  local__ckpt-final:\n    mem: 4\n")
    result = build(cli, site, "--control", "use_fine_tune=false", "--json",
                   model="./elsewhere/ckpt-final")
    assert result.code == 0, result.err
    [row] = json.loads(result.out)["trials"]
    assert row["model"] == str(folder) and row["stages"] == ["eval"]
    trial = site.experiments / "exp" / "trial-a"
    config = load(trial / "config.yaml")
    assert config["model_path"] == str(folder) and config["resources"]["mem"] == 4
    assert load(trial / "eval.yaml")["model"] == f"hf/{folder}"
    assert not (trial / "finetune.yaml").exists()
    assert list((site.root / "models").iterdir()) == []


def test_an_absolute_folder_fine_tunes_when_its_family_is_known(cli, site, tiny_random_model,
                                                                tmp_path):
    """The tiny model's config.json is the tiny-llama family's shape: its torchtune config."""
    folder = shutil.copytree(tiny_random_model, tmp_path / "tuned elsewhere")
    assert family_of(str(folder)) is family_of("cruijff/tiny-llama")
    result = build(cli, site, model=str(folder))
    assert result.code == 0, result.err
    finetune = load(site.experiments / "exp" / "trial-a" / "finetune.yaml")
    assert finetune["checkpointer"]["checkpoint_dir"] == str(folder)
    assert finetune["tokenizer"]["path"] == str(folder / "tokenizer.model")


def test_an_unknown_architecture_asks_for_finetune_config(cli, site, tiny_random_model,
                                                         tmp_path):
    folder = shutil.copytree(tiny_random_model, tmp_path / "odd")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 96}))
    assert family_of(str(folder)) is None
    result = build(cli, site, model=str(folder))
    assert result.code == 2
    assert "error: no torchtune config is known for model" in result.err
    assert "set finetune_config" in result.err
    own = load(Path(__file__).parent.parent / "cruijff" / "configs" / "tiny_llama_lora.yaml")
    own["tokenizer"]["path"] = str(folder / "tokenizer.model")  # no family to set it
    (site.root / "odd.yaml").write_text(yaml.safe_dump(own))
    site.config.write_text(site.config.read_text() + "finetune_config: odd.yaml\n")
    result = build(cli, site, model=str(folder))
    assert result.code == 0, result.err


def test_every_known_architecture_names_a_family():
    for model_id in ARCHITECTURES.values():
        assert family_of(model_id) is not None, model_id


def make_bad(root: Path, tiny: Path, case: str) -> str:
    if case == "missing":
        return "./nowhere"
    if case == "a-file":
        (root / "weights.bin").write_text("x")
        return "./weights.bin"
    folder = shutil.copytree(tiny, root / case)
    (folder / ("config.json" if case == "no-config" else "model.safetensors")).unlink()
    return f"./{case}"


@pytest.mark.parametrize(("case", "problem"), [
    ("missing", "does not exist"), ("a-file", "is not a folder"),
    ("no-config", "has no config.json"), ("no-weights", "has no *.safetensors weights")])
def test_a_bad_model_folder_is_one_line_at_build(cli, site, tiny_random_model, case, problem):
    model = make_bad(site.root, tiny_random_model, case)
    for dry_run in ([], ["--dry-run"]):
        result = build(cli, site, "--control", "use_fine_tune=false", *dry_run, model=model)
        assert result.code == 2, result.out
        lines = [line for line in result.err.splitlines() if line.strip()]
        expected = f"error: model folder {(site.root / model).resolve()} {problem}: "
        assert len(lines) == 1 and lines[0].startswith(expected), result.err
    assert list(site.experiments.iterdir()) == []
    assert not (site.root / "data" / "d.json").exists()  # refused before data is prepared


def test_a_hostile_folder_name_reaches_no_shell_line(cli, site, tiny_random_model):
    """The path is only in the YAML configs and, in a treatment's label, the scripts' comment
    line; its key (a resources profile) is a safe word."""
    name = "x; touch CANARY $(touch CANARY) `touch CANARY`"
    folder = shutil.copytree(tiny_random_model, site.root / name)
    assert model_key(str(folder)) == "local__x--touch-CANARY---touch-CANARY---touch-CANARY-"
    treatment = json.dumps({"model": f"./{name}", "eval.limit": 1})
    result = build(cli, site, "--control", "use_fine_tune=false", "--treatments", treatment,
                   model=f"./{name}")
    assert result.code == 0, result.err
    trial = site.experiments / "exp" / "trial-b"
    lines = [line for line in (trial / "eval.slurm").read_text().splitlines() if "CANARY" in line]
    assert len(lines) == 1 and lines[0].startswith("# experiment exp, trial b (model=./x; ")
    assert load(trial / "eval.yaml")["model"] == f"hf/{folder}"
    assert not any(site.root.rglob("CANARY"))


@pytest.mark.parametrize(("model", "message"), [
    ("ckpt", "is not a Hugging Face id of the form 'org/name'"),
    ("org/x;rm -rf ~", "nor a model folder (an absolute path, or one starting with ./ or ../"),
])
def test_a_model_that_is_neither_is_refused(model, message):
    with pytest.raises(CruijffError, match=re.escape(message)):
        validate_model(model)


# --- end to end ---------------------------------------------------------------------------


@pytest.mark.slow
def test_run_evaluates_a_local_checkpoint(tmp_path, tiny_random_model, prefect_env):
    """`cruijff run` of an eval-only experiment on a folder outside model_dir."""
    from inspect_ai.log import read_eval_log

    (tmp_path / "site").mkdir()
    site = make_site(tmp_path / "site", tiny_random_model)
    folder = shutil.copytree(tiny_random_model, tmp_path / "site" / "runs" / "ckpt-final")
    result = cruijff("run", "--config-path", site / "config.yaml", "--root", site,
                     "--name", "local", "--task", "capitalization",
                     "--dataset", "words_5L_80_1000.json", "--model", "./runs/ckpt-final",
                     "--control", "use_fine_tune=false", "--control", "eval.limit=2",
                     env=prefect_env)
    assert result.returncode == 0, result.stdout + result.stderr
    trial = site / "local" / "trial-a"
    record = read_record(trial, "eval")
    assert record.status == "done" and record.metrics["samples"] == 2
    assert read_record(trial, "finetune") is None
    log = read_eval_log(str(trial / record.outputs[0]))
    assert log.status == "success" and log.eval.model == f"hf/{folder}"
