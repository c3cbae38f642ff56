"""Device selection, seeding and library versions."""

from __future__ import annotations

import os
import platform
import random
import subprocess
from contextlib import contextmanager

import numpy as np
import torch

from benchmark.errors import BenchError
from benchmark.paths import REPO_ROOT


def resolve_device(device: str | torch.device | None = "auto", *, available: bool = True) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a one-line error, unless
    ``available=False`` (a plan names the device it would run on and needs none)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BenchError(f"device {device!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and available and not torch.cuda.is_available():
        raise BenchError(f"device {device!r} requested but CUDA is not available on this machine; use cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"device {device!r} is not supported; allowed: auto, cpu, cuda, cuda:N")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def fix_cublas_workspace() -> None:
    """cuBLAS's fixed workspace, which deterministic matrix products need; it takes effect only if
    set before the process's first cuBLAS call. An environment that sets it wins."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@contextmanager
def deterministic_algorithms(enabled: bool = True, seed: int = 0):
    """Run the block with every source of run-to-run variation that torch controls switched off, so
    that the same training on the same GPU model and software gives bit-identical weights: Python,
    NumPy and torch seeded, ``torch.use_deterministic_algorithms`` (an op without a deterministic
    implementation warns, naming itself), cuDNN's deterministic kernels without autotuning, and
    cuBLAS's fixed workspace (:func:`fix_cublas_workspace`; the runner calls it early when a config
    asks for a deterministic target). The algorithm and cuDNN switches are restored on leaving, also after an
    error; the random generators stay seeded and the environment variable stays set.
    ``enabled=False``: does nothing."""
    if not enabled:
        yield
        return
    fix_cublas_workspace()
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              cudnn.benchmark, cudnn.deterministic)
    seed_everything(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.benchmark, cudnn.deterministic = before[2], before[3]


def git_commit() -> str | None:
    """The checkout's commit, or ``$PURIFYBENCH_GIT_COMMIT`` where the tree has no .git (copies)."""
    env = os.environ.get("PURIFYBENCH_GIT_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict:
    import torchvision

    from benchmark import __version__

    info = {
        "purifybench": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
    }
    if torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name()
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info
