"""How soon does `cruijff run --no-wait` return? (run on demand, not in tests)

    python benchmarks/no_wait_latency.py [--repeats 5]

With `cruijff serve` running, `cruijff run --no-wait EXPERIMENT` triggers the served
experiment deployment and prints the flow run's id: it should return at once, whatever the
run will take. Here: a Prefect server and `cruijff serve` in a private cruijff home in a
temporary folder (started before timing, not timed), `--repeats` experiments of one
`testing_touch` stage that waits for a file (so every triggered run is still going when the
command returns), and each triggered once. Goal: under 3 s (median), a user's command as
typed, interpreter start-up included. For reference `cruijff run --dry-run` of the same
experiment (everything up to the trigger: start-up, loading and planning, no server) is timed
in the same run, the order alternated; the difference is the cost of triggering.
(tests/test_deployments.py checks that `--no-wait` returns the id while the run goes on, not
its speed.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from uuid import UUID

from timing import alternate, describe, verdict

REPO = Path(__file__).resolve().parent.parent
GOAL_S = 3.0


def cruijff(*args: object, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "cruijff", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"cruijff {' '.join(map(str, args))} failed ({done.returncode}):\n"
                         f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done


def wait_until_served(env: dict, serve: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    probe = ("from cruijff.deployments.client import served_experiment_deployment as s; "
             "print(s() or '')")
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            raise SystemExit(f"cruijff serve exited with {serve.returncode}")
        found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                               text=True)
        if found.stdout.strip():
            return
        time.sleep(1)
    raise SystemExit("the experiment deployment never became ready")


def wait_until_final(api: str, run_ids: list[str], timeout: float = 300) -> list[str]:
    """The runs' final state names, once all are final (or their states at the timeout)."""
    from prefect.client.orchestration import PrefectClient

    async def states() -> list:
        async with PrefectClient(api=api) as client:
            return [(await client.read_flow_run(UUID(i))).state for i in run_ids]

    deadline = time.monotonic() + timeout
    found = asyncio.run(states())
    while not all(s.is_final() for s in found) and time.monotonic() < deadline:
        time.sleep(1)
        found = asyncio.run(states())
    return [s.name for s in found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from cruijff.flows.server import start_server, stop_server

    from cruijff.tiny_model import materialize

    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        home = site / "home"
        materialize("cruijff/tiny-llama-random", site / "models" / "cruijff__tiny-llama-random")
        release = site / "release"
        (site / "config.yaml").write_text(
            f"model_dir: models\ntasks_dir: {REPO / 'examples' / 'capitalization' / 'tasks'}\n"
            "data_dir: data\npipeline: [testing_touch]\nrun_control_trials: false\n")
        info = start_server(home)
        serve = None
        triggered: list[str] = []
        try:
            env = dict(os.environ, CRUIJFF_HOME=str(home), PREFECT_API_URL=info.url,
                       HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
                       HF_DATASETS_CACHE=str(site / "hf"),
                       CRUIJFF_TEST_DOUBLES="1")  # offers the testing_touch stage
            experiments = []
            for i in range(args.repeats):
                cruijff("build", "--config-path", site / "config.yaml", "--root", site,
                        "--name", f"nowait{i}", "--task", "capitalization", "--dataset",
                        "words_5L_80_1000.json", "--model", "cruijff/tiny-llama-random",
                        "--treatment", f"testing_touch.wait_for={release}", env=env)
                experiments.append(site / f"nowait{i}")
            serve = subprocess.Popen([sys.executable, "-m", "cruijff", "serve"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_until_served(env, serve)
            to_trigger, to_plan = iter(experiments), iter(experiments)
            times = alternate({
                "cruijff run --no-wait": lambda: triggered.append(
                    cruijff("run", "--no-wait", next(to_trigger), env=env).stdout.strip()),
                "cruijff run --dry-run (reference)": lambda: cruijff(
                    "run", "--dry-run", next(to_plan), env=env),
            }, args.repeats)
            release.touch()  # now let the triggered runs end
            ended = wait_until_final(info.url, triggered)
        finally:
            release.touch()
            if serve is not None:
                serve.terminate()
                serve.wait(timeout=60)
            stop_server(home)

    print(f"{args.repeats} experiments, each triggered once on the served deployment")
    for name, seconds in times.items():
        print(f"  {name:34s} {describe(seconds)}")
    print(f"cruijff run --no-wait: {verdict(times['cruijff run --no-wait'], GOAL_S)}")
    print(f"the triggered runs then ended: {', '.join(ended)}")


if __name__ == "__main__":
    main()
