"""Multi-process runs with ``torchrun`` (torch.distributed): one process per GPU, or several on a CPU.

``torchrun --nproc-per-node N run_benchmark.py run CONFIG`` starts N ranks. Each rank
attacks its share of every cell's evaluation batches (whole batches, so that with the
harness's per-batch seeding the record equals a single-process run's, stochastic
defenses included); rank 0 gathers the per-sample results and is the only writer of
records, checks, tables and artifacts. Targets train with DistributedDataParallel
(each rank a slice of every batch); defenses train on rank 0 while the others wait,
then load the artifact. Backend: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); on CUDA, one device per local
    rank. Returns the device this rank uses."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return device


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * size()
    dist.all_gather_object(out, obj)
    return out


def shard(starts: list[int]) -> list[int]:
    """This rank's contiguous share of a list of batch starts."""
    n, k, r = len(starts), size(), rank()
    return starts[r * n // k:(r + 1) * n // k]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
