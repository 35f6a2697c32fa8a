"""Record each Python process's peak CUDA memory at its exit (for scripts/gpu-check.sh).

cruijff does not record GPU memory itself, and its stages must stay as they are, so
gpu-check.sh puts this folder on PYTHONPATH: Python imports `sitecustomize` at start-up in
every process of the run, including each stage's (cruijff runs a stage as a subprocess with
its own environment passed on). With CRUIJFF_GPU_CHECK_PEAKS=<folder>, a process that
imported torch writes <folder>/<pid>.json when it exits: its command line, its working
folder (a stage runs in its trial's folder), whether it used CUDA and, if so,
torch.cuda.max_memory_allocated() and max_memory_reserved() in bytes. Nothing is imported
here beyond the standard library; a process that never imported torch writes nothing.
"""

import atexit
import json
import os
import sys


def _record_peak(folder: str) -> None:
    torch = sys.modules.get("torch")
    if torch is None:
        return
    record = {"argv": sys.argv, "cuda": False}
    try:
        record["cwd"] = os.getcwd()
        if torch.cuda.is_initialized():
            record.update(cuda=True, device=torch.cuda.get_device_name(),
                          max_memory_allocated=torch.cuda.max_memory_allocated(),
                          max_memory_reserved=torch.cuda.max_memory_reserved())
    except Exception as exc:  # a measurement must never fail the stage
        record["error"] = f"{type(exc).__name__}: {exc}"
    try:
        with open(os.path.join(folder, f"{os.getpid()}.json"), "w", encoding="utf-8") as out:
            json.dump(record, out)
    except OSError:
        pass


if os.environ.get("CRUIJFF_GPU_CHECK_PEAKS"):
    # Registered first, so it runs last: after the process's own exit handlers.
    atexit.register(_record_peak, os.environ["CRUIJFF_GPU_CHECK_PEAKS"])
