"""The Dask side of a run (cruijff.flows.clusters): what listens where, who may connect, and
which workers adaptive scaling may close. No Slurm job is submitted here."""

from __future__ import annotations

import stat
import threading

import psutil
import pytest
from cruijff.flows.clusters import KeepBusyWorkers, clusters, group_by_profile, slurm_cluster
from distributed import Client, LocalCluster, Scheduler, Worker
from distributed.security import Security

from cruijff.runner import load_experiment


def listening() -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("inet")
            if c.status == psutil.CONN_LISTEN}


def test_a_local_runs_endpoints_listen_on_this_host_only(built):
    exp = load_experiment(built)
    before = listening()
    with clusters(exp, exp.trials, executor="local", workers=2, max_jobs=1) as endpoints:
        opened = listening() - before
        assert {e.address.split("://")[0] for e in endpoints.values()} == {"inproc"}
    assert opened, "the scheduler and workers serve HTTP (metrics, health): none was seen"
    assert {ip for ip, _ in opened} == {"127.0.0.1"}


def test_a_local_runs_dask_polls_nothing_of_this_process_while_stages_run(built):
    """In-process workers and their scheduler run no statistical profiler, no memory monitor
    (a worker's limit would be cruijff's own memory, not its stage's) and a system monitor
    at most hourly: each took CPU from the stages on a busy machine."""
    exp = load_experiment(built)
    with clusters(exp, exp.trials, executor="local", workers=2, max_jobs=1) as endpoints:
        [address] = {endpoint.address for endpoint in endpoints.values()}
        [scheduler] = [s for s in Scheduler._instances if s.address == address]
        workers = [w for w in Worker._instances if w.scheduler.address == address]
        assert len(workers) == 2
        for worker in workers:
            assert worker.memory_manager.memory_limit is None
            assert not {"memory_monitor", "profile", "profile-cycle"} & set(
                worker.periodic_callbacks)
        for server in (scheduler, *workers):
            assert server.periodic_callbacks["monitor"].callback_time >= 3_600_000


def test_a_slurm_runs_scheduler_takes_only_clients_holding_the_runs_certificates(
        built, tmp_path):
    exp = load_experiment(built)
    [(name, (profile, _))] = group_by_profile(exp.trials).items()
    tls = tmp_path / "tls"
    tls.mkdir(mode=0o700)
    with slurm_cluster(exp, name, profile, tls_dir=tls) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        stranger = Security.temporary()  # certificates of another run: refused
        with pytest.raises(OSError):
            Client(cluster.scheduler_address, security=stranger, timeout=5)
        with Client(cluster.scheduler_address, security=cluster.security, timeout=10) as ok:
            assert ok.scheduler_info()["address"] == cluster.scheduler_address
        script = cluster.job_script()
        for option in (f"--tls-ca-file {tls}/ca.pem", f"--tls-cert {tls}/cert.pem",
                       f"--tls-key {tls}/key.pem", "--protocol tls://", "--no-dashboard",
                       "--dashboard-address 127.0.0.1:0"):
            assert option in script
        files = sorted(f.name for f in tls.iterdir())
        assert files == ["ca.pem", "cert.pem", "key.pem"]
        assert {stat.S_IMODE(f.stat().st_mode) for f in tls.iterdir()} == {0o600}


def test_the_scheduler_listens_where_orchestration_host_says(built, tmp_path):
    config = built / "config.yaml"
    config.write_text(config.read_text().replace("orchestration:\n",
                                                 "orchestration:\n    host: 127.0.0.1\n"))
    exp = load_experiment(built)
    assert exp.orchestration.host == "127.0.0.1"
    [(name, (profile, _))] = group_by_profile(exp.trials).items()
    before = listening()
    with slurm_cluster(exp, name, profile, tls_dir=tmp_path) as cluster:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert {ip for ip, _ in listening() - before} == {"127.0.0.1"}


STARTED, RELEASE = threading.Semaphore(0), threading.Event()


def busy(i: int) -> int:
    """A task that holds its worker until the test releases it (workers are threads here)."""
    STARTED.release()
    RELEASE.wait(30)
    return i


@pytest.mark.parametrize("plugin", [True, False])
def test_adaptive_scaling_never_closes_a_worker_running_a_stage(plugin):
    """Two workers, each running a task: asked to go down to one, the scheduler would close
    a busy one; with KeepBusyWorkers it closes none."""
    RELEASE.clear()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        if plugin:
            cluster.scheduler.add_plugin(KeepBusyWorkers())
        futures = [client.submit(busy, i, pure=False) for i in range(2)]
        for _ in futures:
            assert STARTED.acquire(timeout=30)
        closing = cluster.scheduler.workers_to_close(n=1)
        RELEASE.set()
        client.gather(futures)
    assert len(closing) == (0 if plugin else 1)
