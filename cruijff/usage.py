"""Measure one stage attempt from outside: `python -m cruijff.usage --out F -- COMMAND...`.

Runs COMMAND as its child and, until it exits, samples the resident memory of its whole
process tree (and, where NVML is there, each visible GPU's memory); at the end writes wall
time, CPU time (getrusage of the reaped children: the tree), peaks and what sampling cost to
F as JSON (state.Usage's fields). It exits as COMMAND did (re-raising the signal that killed
it), so whoever started it sees the stage's own exit. A snapshot is written now and then, so
an attempt killed with its worker (an OOM, a TIMEOUT) still leaves the figure it reached.

Why a launcher and not a thread in the runner: on Slurm the stage runs as an `srun` step,
whose processes are not the worker's children; and RUSAGE_CHILDREN counts a whole tree only
in a process whose sole children are the stage's. Standard library only: it starts in
~30 ms and never imports what it measures.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20
SNAPSHOT_EVERY_S = 15.0
FAST_INTERVAL_S, SLOW_INTERVAL_S, FAST_FOR_S = 0.5, 2.0, 60.0
"""Sampling: every 0.5 s for the first minute (short stages), then every 2 s."""
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36


def tree(root: int) -> list[int]:
    """root's descendants (not root), from /proc/<pid>/task/<tid>/children: reads only the
    tree's own files, so the cost grows with the stage, not with the node's process count."""
    found: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as fh:
                    children = [int(c) for c in fh.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def resident_mib(pid: int) -> float:
    """A process's resident memory (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * PAGE_MIB
    except (OSError, IndexError, ValueError):
        return 0.0


class Gpus:
    """Each visible GPU's memory in use, by NVML, if it is installed and a GPU is there; any
    NVML error stops GPU sampling, never the stage."""

    def __init__(self) -> None:
        self.handles: list[tuple[str, Any]] = []
        self.peaks: dict[str, dict[str, Any]] = {}
        if not (os.path.exists("/dev/nvidiactl") or os.environ.get("CRUIJFF_USAGE_NVML")):
            return
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            self.nvml = pynvml
            count = pynvml.nvmlDeviceGetCount()
            all_handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            for handle in self._visible(all_handles):
                uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                self.handles.append((uuid, handle))
                self.peaks[uuid] = {"device": uuid,
                                    "name": _text(pynvml.nvmlDeviceGetName(handle)),
                                    "total_mib": int(memory.total // 2**20),
                                    "peak_used_mib": int(memory.used // 2**20)}
        except Exception:  # measuring must never fail the stage
            self.handles = []

    def _visible(self, handles: list[Any]) -> list[Any]:
        """The devices CUDA_VISIBLE_DEVICES names (UUIDs or indices); all where it is unset
        or where NVML sees only the visible ones already (a cgroup)."""
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
        if not visible or len(visible) == len(handles):
            return handles
        chosen = []
        for entry in visible:
            if entry.isdigit() and int(entry) < len(handles):
                chosen.append(handles[int(entry)])
            else:
                chosen += [h for h in handles
                           if _text(self.nvml.nvmlDeviceGetUUID(h)).startswith(entry)]
        return chosen

    def sample(self) -> None:
        try:
            for uuid, handle in self.handles:
                used = int(self.nvml.nvmlDeviceGetMemoryInfo(handle).used // 2**20)
                peak = self.peaks[uuid]
                peak["peak_used_mib"] = max(peak["peak_used_mib"], used)
        except Exception:  # an NVML error stops GPU sampling
            self.handles = []

    def figures(self) -> list[dict[str, Any]]:
        return list(self.peaks.values())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Meter:
    """The figures of one attempt so far."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.peak_rss_mib = 0.0
        self.max_processes = 0
        self.samples = 0
        self.gpus = Gpus()

    def sample(self) -> None:
        pids = tree(os.getpid())  # the stage and any orphan of it this subreaper adopted
        self.peak_rss_mib = max(self.peak_rss_mib, sum(resident_mib(p) for p in pids))
        self.max_processes = max(self.max_processes, len(pids))
        self.gpus.sample()
        self.samples += 1

    def figures(self, *, final: bool) -> dict[str, Any]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = resource.getrusage(resource.RUSAGE_SELF)
        largest = children.ru_maxrss / 1024  # KiB: the largest single reaped process
        return {
            "wall_s": round(time.monotonic() - self.start, 3),
            "cpu_s": round(children.ru_utime + children.ru_stime, 3) if final else None,
            "peak_rss_mib": round(max(self.peak_rss_mib, largest), 1),
            "largest_process_rss_mib": round(largest, 1) if final else None,
            "max_processes": self.max_processes,
            "samples": self.samples,
            "sampler_cpu_s": round(own.ru_utime + own.ru_stime, 3),
            "gpus": self.gpus.figures(),
            "final": final,
        }


def write(path: Path, figures: dict[str, Any]) -> None:
    """Atomically: a reader sees the last complete snapshot, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(figures), encoding="utf-8")
    os.replace(temporary, path)


def interval(elapsed: float) -> float:
    chosen = os.environ.get("CRUIJFF_USAGE_INTERVAL_S")
    if chosen:
        return max(float(chosen), 0.05)
    return FAST_INTERVAL_S if elapsed < FAST_FOR_S else SLOW_INTERVAL_S


def measure(command: list[str], out: Path) -> int:
    """Run command, measuring it into out; its exit status (negative: killed by a signal)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphaned grandchildren stay in this tree
    meter = Meter()
    proc = subprocess.Popen(command, preexec_fn=lambda: libc.prctl(_PR_SET_PDEATHSIG,
                                                                   signal.SIGKILL))

    def forward(signum: int, frame: Any) -> None:  # a signal sent to the launcher alone
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    every = float(os.environ.get("CRUIJFF_USAGE_SNAPSHOT_S") or SNAPSHOT_EVERY_S)
    snapshot_at = time.monotonic() + every
    while True:
        meter.sample()
        if time.monotonic() >= snapshot_at:
            with contextlib.suppress(OSError):
                write(out, meter.figures(final=False))
            snapshot_at = time.monotonic() + every
        try:
            proc.wait(timeout=interval(time.monotonic() - meter.start))
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ChildProcessError):  # adopted orphans that have exited
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    with contextlib.suppress(OSError):
        write(out, meter.figures(final=True))
    return proc.returncode


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[0] != "--out" or argv[2] != "--":
        sys.exit("usage: python -m cruijff.usage --out FILE -- COMMAND [ARG...]")
    code = measure(argv[3:], Path(argv[1]))
    if code < 0:  # die as the stage died, so the runner sees the same signal
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those cannot be caught anyway
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
