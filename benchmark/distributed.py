"""Multi-process runs with ``torchrun`` (torch.distributed): one process per GPU, or several on a CPU.

``torchrun --nproc-per-node N run_benchmark.py run CONFIG`` starts N ranks. Each rank
attacks its share of every cell's evaluation batches (whole batches, so that with the
harness's per-batch seeding the record equals a single-process run's, stochastic
defenses included); rank 0 gathers the per-sample results and is the only writer of
records, checks, tables and artifacts. Targets train with DistributedDataParallel
(each rank a slice of every batch); defenses that declare ``data_parallel`` train on
every rank the same way (``synchronized`` averages the gradients before each step);
the others train on rank 0 while the rest wait, then load the artifact. Backend:
NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import gc
import os
import types
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
        # DDP wrappers sit in reference cycles; freed after the group is gone, gloo's threads can
        # abort the process at exit ("terminate called without an active exception")
        gc.collect()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- data-parallel training
def rank_slice(n: int) -> slice:
    """This rank's contiguous part of a batch of ``n`` (every rank draws the same batch)."""
    return slice(n * rank() // size(), n * (rank() + 1) // size())


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (the same start for data-parallel training)."""
    if not active():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def synchronized(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``opt`` whose ``step()`` first averages the gradients over the ranks: data-parallel training
    for a loop in which each rank computes its loss on its slice of every batch (as
    DistributedDataParallel does, without wrapping the modules). Without torchrun: ``opt``."""
    if not active():
        return opt
    params = [p for group in opt.param_groups for p in group["params"]]
    step = opt.step

    def step_all(_opt, *args, **kwargs):  # a bound method, as LR schedulers expect to wrap one
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= size()
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        return step(*args, **kwargs)

    opt.step = types.MethodType(step_all, opt)
    return opt


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place (a training epoch's totals)."""
    if active():
        dist.all_reduce(t)
    return t
