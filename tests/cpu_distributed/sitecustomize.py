"""Imported by every Python process that has this folder on PYTHONPATH (the slow test of
tests/test_distributed_finetune.py sets it): in a torchrun worker on a machine without CUDA
it replaces the three CUDA-only calls that keep torchtune 0.6.1's lora_finetune_distributed
from running on CPU, and nothing else, so the rest of the recipe (FSDP2 over gloo, the
sharded LoRA step, the full-state-dict save) runs as on GPUs:

- recipes/lora_finetune_distributed.py:918 `init_process_group("cuda:nccl,cpu:gloo")`:
  a CPU build of torch has no NCCL ("Distributed package doesn't have NCCL built in");
- :544 `training.get_memory_stats(device)` on rank 0, whatever log_peak_memory_stats says:
  "Logging memory stats is not supported on CPU devices";
- :752 `training.cleanup_before_training()`: `torch.cpu` has no `empty_cache`.
"""

import os

if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun for its workers only
    import gc
    from typing import Any

    import torch
    import torch.distributed
    from torchtune import training

    if not torch.cuda.is_available():
        _init = torch.distributed.init_process_group

        def _gloo(backend: Any = None, *args: Any, **kwargs: Any) -> Any:
            return _init("gloo", *args, **kwargs)

        torch.distributed.init_process_group = _gloo
        training.get_memory_stats = lambda device: {}
        training.log_memory_stats = lambda *args, **kwargs: None
        training.cleanup_before_training = gc.collect
