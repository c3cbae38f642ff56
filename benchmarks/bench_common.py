"""What the benchmark scripts share: the device, timing, and where their images come from.

Every script takes ``--dataset`` (default ``cifar10-jpeg``, the offline JPEG copy) and ``--root``
(a folder for that dataset), so the same script runs at full size on a GPU and at toy size in the
tests on a small CIFAR-format folder the test writes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmark.data import ImageData, load_dataset


def pick_device() -> torch.device:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    return device


def describe(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"device: {name}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int):
    """Median seconds of ``repeats`` calls after one warm-up call (cuDNN autotuning, compilation),
    and the last call's result."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def add_data_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dataset", default="cifar10-jpeg",
                    help="a registered dataset (default: the offline CIFAR-10 JPEG copy)")
    ap.add_argument("--root", default=None, help="the dataset's folder (default: where the suite looks for it)")


def load_images(args: argparse.Namespace, split: str, n: int | None, *, size: tuple[int, int, int] | None = None
                ) -> ImageData:
    """Split ``split`` of ``--dataset``, ``n`` images (all when ``n`` is None or too large)."""
    data = load_dataset(args.dataset, split, root=args.root)
    if size is not None and tuple(data.images.shape[1:]) != size:
        raise SystemExit(f"--dataset {args.dataset}: images are {tuple(data.images.shape[1:])}, "
                         f"this benchmark needs {size} (CIFAR-sized)")
    return data.subset(n if n is not None and n < len(data) else None, seed=0)


def count_flops(fn) -> tuple[float, object]:
    """(FLOPs of the matmuls and convolutions ``fn()`` runs, forward and backward, its result).

    torch's ``FlopCounterMode`` cannot watch ``torch.autograd.grad`` (its module tracker hooks
    the backward), which is how every attack here takes input gradients; this dispatch mode uses
    the same per-operator FLOP formulas (``torch.utils.flop_counter``) without module tracking."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Counter(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            packet = func._overloadpacket
            if packet in flop_registry:
                Counter.flops += flop_registry[packet](*args, **kwargs, out_val=out)
            return out

    with Counter():
        result = fn()
    return float(Counter.flops), result
