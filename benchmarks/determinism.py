"""Deterministic target training: is the same training bit-identical when it runs again, and what
does determinism cost per epoch?

    python benchmarks/determinism.py [--n N] [--epochs E] [--batch B] [--json PATH]

It trains a PGD-AT ResNet-18 three times in this process from the same seed and the same images:
twice with ``train: {deterministic: true}`` (``benchmark.runtime.deterministic_algorithms``) and
once without. It prints the SHA-256 of each run's weights (as the checkpoint stores them), whether
the two deterministic runs agree, and the median seconds per epoch with and without determinism
(the first epoch dropped: warm-up). On the CPU the default training is already deterministic, so
all three hashes normally agree there; on CUDA the third usually differs (atomics in the
convolutions' backward), which shows what the option buys.

Figures written with ``--json``: ``deterministic_same_hash`` (1 or 0), ``deterministic_epoch_seconds``,
``nondeterministic_epoch_seconds`` and ``determinism_cost_ratio`` (their ratio).
"""

from __future__ import annotations

import argparse
import hashlib

import torch
from bench_common import (
    add_data_args,
    add_json_arg,
    describe,
    load_images,
    median_epoch_seconds,
    pick_device,
    write_figures,
)

from benchmark.config import from_dict
from benchmark.models import create_model
from benchmark.runtime import fix_cublas_workspace
from benchmark.training import TrainConfig, train_classifier


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict's names and float32 CPU bytes, in order (buffers included)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype)
                 .contiguous().numpy().tobytes())
    return h.hexdigest()


def train_once(train, args, device: torch.device, deterministic: bool) -> tuple[str, float]:
    torch.manual_seed(args.seed)  # the same initial weights every time
    model = create_model("resnet18", num_classes=train.num_classes, in_channels=train.channels, mean=train.mean,
                         std=train.std)
    cfg = from_dict(TrainConfig, dict(method="at", epochs=args.epochs, batch_size=args.batch, lr=0.1,
                                      attack_steps=5, seed=args.seed, deterministic=deterministic, eval_n=None,
                                      progress=False), "train")
    result = train_classifier(model, train, cfg, device)
    return weights_sha256(model), median_epoch_seconds(result.history)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help="training images (default: 16,384 on CUDA, 256 on a CPU)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    add_data_args(ap)
    add_json_arg(ap)
    args = ap.parse_args()
    fix_cublas_workspace()  # before the first CUDA call, as the runner does for a deterministic target
    device = pick_device()
    n = args.n or (16_384 if device.type == "cuda" else 256)
    train = load_images(args, "train", n)
    print(f"{describe(device)}; {len(train)} training images ({train.copy}); PGD-5 AT ResNet-18, "
          f"{args.epochs} epochs, batch {args.batch}", flush=True)
    runs = []
    for label, det in (("deterministic", True), ("deterministic again", True), ("default", False)):
        digest, seconds = train_once(train, args, device, det)
        runs.append((label, digest, seconds))
        print(f"{label}: {digest[:16]}  {seconds:.3f} s/epoch", flush=True)
    same = runs[0][1] == runs[1][1]
    det_s = (runs[0][2] + runs[1][2]) / 2
    plain_s = runs[2][2]
    print()
    print("| run | weights SHA-256 (first 16) | s/epoch (median, first dropped) |")
    print("|---|---|---:|")
    for label, digest, seconds in runs:
        print(f"| {label} | {digest[:16]} | {seconds:.3f} |")
    print(f"\ndeterministic runs bit-identical: {'yes' if same else 'NO'}; default run identical to them: "
          f"{'yes' if runs[2][1] == runs[0][1] else 'no'}; determinism costs {det_s / plain_s:.2f}x per epoch")
    conditions = {"images": len(train), "epochs": args.epochs, "batch": args.batch, "method": "at (PGD-5)",
                  "arch": "resnet18"}
    write_figures(args.json,
                  {"deterministic_same_hash": int(same), "deterministic_epoch_seconds": det_s,
                   "nondeterministic_epoch_seconds": plain_s, "determinism_cost_ratio": det_s / plain_s},
                  {name: conditions for name in ("deterministic_same_hash", "deterministic_epoch_seconds",
                                                 "nondeterministic_epoch_seconds", "determinism_cost_ratio")},
                  [{"run": label, "sha256": digest, "seconds_per_epoch": s} for label, digest, s in runs])
    if not same:
        raise SystemExit("determinism.py: the two deterministic trainings gave different weights")


if __name__ == "__main__":
    main()
