"""What the benchmark scripts share: the device, timing, and where their images come from.

Every script takes ``--dataset`` (default ``cifar10-jpeg``, the offline JPEG copy) and ``--root``
(a folder for that dataset), so the same script runs at full size on a GPU and at toy size in the
tests on a small CIFAR-format folder the test writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

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


def verdict(ok: bool, judged: bool) -> str:
    """A target table's 'met' cell: judged only at the size and on the device the target is set for."""
    return ("yes" if ok else "**no**") if judged else "n/a"


def add_json_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="also write this run's figures to PATH (merged into the file if it exists; "
                         "benchmarks/gpu_figures.py collects them)")


def write_figures(path: str | None, figures: dict, conditions: dict, rows: list[dict] | None = None) -> None:
    """Merge ``figures`` (name -> number), how each was measured (``conditions``: name -> dict) and
    the script's table rows into the JSON file ``path`` (written whole, atomically)."""
    if not path:
        return
    from benchmark.io import atomic_write_text

    target = Path(path)
    old = json.loads(target.read_text()) if target.is_file() else {}
    old.setdefault("figures", {}).update(figures)
    old.setdefault("conditions", {}).update(conditions)
    if rows:
        old.setdefault("rows", []).extend(rows)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(old, indent=1, sort_keys=True) + "\n")


def median_epoch_seconds(history: list[dict]) -> float:
    """Median seconds per epoch, the first (warm-up: cuDNN autotuning, compilation) dropped when more ran."""
    seconds = [h["seconds"] for h in history]
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


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


def parse_with_test_images(ap: argparse.ArgumentParser):
    """The common tail of an attack benchmark's setup: the data, model and --json options added,
    the arguments parsed, the device picked and ``args.n`` CIFAR-sized test images loaded onto it.
    Returns (args, device, data)."""
    add_data_args(ap)
    add_model_args(ap)
    add_json_arg(ap)
    args = ap.parse_args()
    device = pick_device()
    return args, device, load_images(args, "test", args.n, size=(3, 32, 32)).to(device)


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


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="at",
                    help="at (default): a PGD-AT ResNet-18 trained here, then kept in the cache and found again; "
                         "autoattack: pyautoattack's naturally trained ResNet-18 (a 45 MB file in its wheel); "
                         "or a suite classifier checkpoint (stem, .json or .safetensors)")
    ap.add_argument("--train-epochs", type=int, default=None, help="--model at: epochs (default 4 on CUDA, 1 on a CPU)")
    ap.add_argument("--train-n", type=int, default=None,
                    help="--model at: training images (default all on CUDA, 256 on a CPU)")


def target_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, str, dict]:
    """The classifier a benchmark attacks, one line that says what it is, and, when this call
    trained it, its training figures (``epoch_seconds``: median after the first epoch; ``images``
    per epoch; empty when it came from the cache or a file).

    The default is adversarially trained so that robust accuracy is far from 0 and the comparison
    of robust accuracies between attack implementations means something (a natural model is at 0%
    under every PGD). It trains once per (dataset, root, epochs, n) and is cached."""
    from benchmark.checkpoint import (
        checkpoint_paths,
        load_checkpoint,
        load_pretrained,
        save_checkpoint,
    )
    from benchmark.experiment import classifier_card
    from benchmark.models import create_model
    from benchmark.paths import cache_dir
    from benchmark.training import TrainConfig, train_classifier

    if args.model == "autoattack":
        return load_pretrained("autoattack-resnet18-natural", device)[0].eval(), "pyautoattack's natural ResNet-18", {}
    if args.model != "at":
        return load_checkpoint(args.model, device)[0].eval(), f"checkpoint {args.model}", {}
    cuda = device.type == "cuda"
    epochs = args.train_epochs or (4 if cuda else 1)
    n = args.train_n or (None if cuda else 256)
    where = str(Path(args.root).resolve()) if args.root else "default"
    key = hashlib.sha256(json.dumps([args.dataset, where, epochs, n]).encode()).hexdigest()[:12]
    stem = cache_dir() / "bench" / f"at-resnet18-{args.dataset}-{key}"
    trained: dict = {}
    if checkpoint_paths(stem)[1].is_file():
        model, card = load_checkpoint(stem, device)
        seconds = card["training"]["seconds"]
    else:
        train = load_images(args, "train", n)
        model = create_model("resnet18", num_classes=train.num_classes, in_channels=train.channels,
                             mean=train.mean, std=train.std)
        tcfg = TrainConfig(method="at", epochs=epochs, batch_size=256, lr=0.2, schedule="onecycle", attack_steps=5,
                           progress=False)
        result = train_classifier(model, train, tcfg, device)
        save_checkpoint(model, stem, classifier_card("resnet18", train, tcfg, result, device))
        seconds = result.seconds
        trained = {"epoch_seconds": median_epoch_seconds(result.history), "images": len(train)}
    return model.eval(), f"PGD-AT ResNet-18 trained by this script ({epochs} epochs, {seconds:.0f} s; {stem})", trained
