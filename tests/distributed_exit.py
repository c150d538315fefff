"""The end of a distributed test launch (`fsdp_cpu_script.py`, `distributed_train_script.py`)."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def exit_distributed_launch() -> None:
    """Tear the process group down and leave without interpreter finalisation; returns in a lone process.

    After `destroy_process_group` the wrapped model (DDP, FSDP2) still holds gloo's process group, so
    gloo's worker threads are destroyed during interpreter finalisation, and that aborts a launch now and
    then on a loaded machine (1 in 8 beside one busy process, on 2 cores): "terminate called without an
    active exception", SIGABRT, after `main` has returned on both ranks (seen in CI; located with prints
    around the teardown). pytorch/pytorch#179291 describes the same finalisation crash. Every output is written and closed by now, so the process
    leaves through `os._exit`, which skips finalisation.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 may still be saving: no rank leaves before it is done
        dist.destroy_process_group()
    elif int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return  # one process without a process group: nothing of gloo's to outlive
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
