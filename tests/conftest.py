"""Shared fixtures: an offline environment, the CLI run in-process, a small project on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["CRUIJFF_TEST_DOUBLES"] = "1"  # the testing_touch stage (cruijff.registry)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "capitalization"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `-n` (pytest-xdist, `--dist loadgroup`) a module's tests share a worker, so its
    module fixtures are built once; tests marked `slurm` share one, since they use the one
    cluster (one drains its node, another stops its controller)."""
    for item in items:
        slurm = item.get_closest_marker("slurm") is not None
        item.add_marker(pytest.mark.xdist_group("slurm" if slurm else item.module.__name__))


def pytest_configure(config: pytest.Config) -> None:
    """pytest-xdist 3.8 marks a group in `Node._nodeid`, which pytest 9.2 no longer reads: its
    groups would be silently ignored, and the Slurm tests run on both workers at once."""
    if config.getoption("dist", "no") == "loadgroup" and \
            tuple(int(p) for p in pytest.__version__.split(".")[:2]) >= (9, 2):
        raise pytest.UsageError("pytest-xdist ignores --dist loadgroup under pytest "
                                f"{pytest.__version__}: install 'pytest<9.2' (the dev extra "
                                "asks for it)")


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def _prefect_url_restored(monkeypatch):
    """An in-process command exports its Prefect server's URL into os.environ
    (flows/server.py): put the variables back after each test, so that a later test's
    subprocess does not inherit the URL of a server that is gone."""
    for name in ("PREFECT_API_URL", "PREFECT_SERVER_EPHEMERAL_ENABLED"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:  # recorded as absent, so that a value set during the test is removed after it
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `cruijff ARGS...` in this process (optionally in `cwd`) and return its outcome."""
    from cruijff.cli import main

    def run(*args: str, cwd: Path | None = None) -> Result:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def tiny_random_model(tmp_path_factory) -> Path:
    """The random-init tiny model, materialized once per test session."""
    from cruijff.tiny_model import materialize

    dest = tmp_path_factory.mktemp("models") / "cruijff__tiny-llama-random"
    materialize("cruijff/tiny-llama-random", dest)
    return dest


@pytest.fixture(scope="session")
def family_models(tmp_path_factory, tiny_random_model) -> dict[str, Path]:
    """The family-shaped tiny models (cruijff/tiny_families.py) beside the random demo
    model, materialized once per test session."""
    from cruijff.tiny_model import materialize

    folder = tmp_path_factory.mktemp("family-models")
    paths = {"cruijff/tiny-llama-random": tiny_random_model}
    for model in ("cruijff/tiny-llama3", "cruijff/tiny-qwen2.5"):
        paths[model] = folder / model.replace("/", "__", 1)
        materialize(model, paths[model])
    return paths


TOY_EVAL = '''
from inspect_ai import Task, task

@task
def toy(data_path: str, data_ext: str = "json", split: str = "test", shots: int = 0) -> Task:
    """A task that is only built, never evaluated, in these tests."""
    raise NotImplementedError
'''

TOY_DATA = '''
import json
import os

def build(dataset, data_dir):
    if dataset.startswith("nothing"):
        return
    with open(os.path.join(data_dir, dataset), "w") as fh:
        json.dump({"train": [{"input": "a", "output": "A"}], "test": []}, fh)
'''

CONFIG = """
model_dir: models
data_dir: data
tasks_dir: tasks
use_fine_tune: true
use_prompt_opt: false
run_control_trials: true
resources:
  default:
    nodes: 1
    ntasks_per_node: 1
    time: "00:30:00"
    account: cses
  cruijff__tiny-llama-random:
    mem: 8
    gres: 1
"""


@dataclass
class Project:
    root: Path
    config: Path
    experiments: Path

    def write_config(self, text: str) -> Path:
        self.config.write_text(textwrap.dedent(text))
        return self.config

    def task(self, name: str) -> Path:
        return self.root / "tasks" / name


@pytest.fixture
def project(tmp_path, tiny_random_model) -> Project:
    """A config, a toy task and the tiny random model, as a researcher's folder would hold."""
    (tmp_path / "tasks" / "toy").mkdir(parents=True)
    (tmp_path / "tasks" / "toy" / "eval.py").write_text(TOY_EVAL)
    (tmp_path / "tasks" / "toy" / "data.py").write_text(TOY_DATA)
    (tmp_path / "tasks" / "toy" / "eval.yaml").write_text("split: test\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / tiny_random_model.name).symlink_to(tiny_random_model)
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    return Project(tmp_path, config, experiments)


@pytest.fixture
def doubles(cli, project, monkeypatch, tmp_path):
    """build(pipeline, treatments, name="exp", config="") -> an experiment of test-double
    stages (cruijff/testing), no control trials, built by the real CLI; `config` is added to
    the project's config.yaml. No Prefect server is reachable."""
    monkeypatch.setenv("CRUIJFF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")

    def build(pipeline: list[str], treatments: list[dict], name: str = "exp",
              config: str = "") -> Path:
        text = project.config.read_text().replace("run_control_trials: true",
                                                  "run_control_trials: false")
        project.config.write_text(f"{text}pipeline: [{', '.join(pipeline)}]\n{config}")
        result = cli("build", "--config-path", project.config, "--task", "toy", "--model",
                     "cruijff/tiny-llama-random", "--dataset", "d.json", "--treatments",
                     json.dumps(treatments), "--name", name, "--root", project.experiments)
        assert result.code == 0, result.err
        return project.experiments / name

    return build


@pytest.fixture
def built(cli, project, monkeypatch, tmp_path):
    """A built one-treatment experiment of the project, with no Prefect server reachable."""
    monkeypatch.setenv("CRUIJFF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing may start
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model",
                 "cruijff/tiny-llama-random", "--dataset", "d.json", "--treatment",
                 "finetune.model.lora_rank=4", "--name", "exp", cwd=project.experiments)
    assert result.code == 0, result.err
    return project.experiments / "exp"


def copy_tree(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=False)
    return dest


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory):
    """A managed Prefect server in a private cruijff home, and the environment to reach it."""
    from cruijff.flows.server import start_server, stop_server

    home = tmp_path_factory.mktemp("cruijff-home")
    info = start_server(home)
    yield dict(os.environ, CRUIJFF_HOME=str(home), PREFECT_API_URL=info.url,
               HF_DATASETS_CACHE=str(home / "hf-datasets"), OMP_NUM_THREADS="1")
    stop_server(home)


def says_no_gpu(text: str) -> bool:
    """The error torch gives a stage that asks for a GPU (e.g. device=cuda:7) on a machine
    without one: its CPU build names CUDA; its CUDA build (PyPI's on Linux, which the
    Python 3.12 leg of CI installs) asks for an NVIDIA GPU and driver."""
    return "CUDA" in text or "NVIDIA" in text


def cruijff(*args: object, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real `cruijff` command, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "cruijff", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def make_site(root: Path, model: Path, config: str = "") -> Path:
    """A researcher's folder: config.yaml (plus `config`), the example tasks, the tiny model."""
    (root / "config.yaml").write_text(
        f"model_dir: models\ntasks_dir: {EXAMPLE / 'tasks'}\ndata_dir: data\n{config}")
    (root / "models").mkdir()
    (root / "models" / model.name).symlink_to(model)
    return root
