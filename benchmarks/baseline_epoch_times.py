"""Seconds per training epoch of each denoising baseline at full CIFAR-10 scale (50,000 images).

Trains a short PGD-AT ResNet-18 target (a few epochs: only the cost matters here, not its
accuracy), crafts the shared static PGD-5 pairs once, then trains every baseline for one
epoch with its paper options and prints a table: seconds for the pairs, seconds per epoch,
and the clean / PGD-20 accuracy of the defended model on 1000 test images after that one
epoch (a sanity check, not a result).

    python benchmarks/baseline_epoch_times.py [TARGET_EPOCHS] [NAMES...]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from attacks.pgd import pgd_linf
from benchmark.artifacts import StageStore
from benchmark.config import from_dict
from benchmark.data import load_dataset
from benchmark.models import create_model
from benchmark.registry import DEFENSES
from benchmark.training import TrainConfig, train_classifier
from defenses.base import TrainContext
from defenses.pairs import PairTrain, static_pairs


def main() -> None:
    target_epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    names = sys.argv[2:] or ["apegan", "hgd", "nrp", "jatp"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    train = load_dataset("cifar10-jpeg", "train")
    test = load_dataset("cifar10-jpeg", "test").subset(1000, seed=0).to(device)
    clf = create_model("resnet18", num_classes=10, in_channels=3, mean=train.mean, std=train.std).to(device)
    t0 = time.perf_counter()
    tcfg = from_dict(TrainConfig, dict(method="at", epochs=target_epochs, batch_size=256, lr=0.2,
                                       schedule="onecycle", progress=False), "target")
    train_classifier(clf, train, tcfg, device)
    clf.eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    print(f"target: PGD-AT ResNet-18, {target_epochs} epochs, {time.perf_counter() - t0:.1f} s", flush=True)
    x, y = test.as_float(), test.labels

    def accuracy(model) -> tuple[float, float]:
        with torch.no_grad():
            clean = (model(x).argmax(1) == y).float().mean().item()
        adv = torch.cat([pgd_linf(model, x[i:i + 500], y[i:i + 500], eps=8 / 255, step_size=2 / 255, steps=20)
                         for i in range(0, len(x), 500)])
        with torch.no_grad():
            return clean, (model(adv).argmax(1) == y).float().mean().item()

    print(f"none: clean / PGD-20 = {accuracy(clf)}", flush=True)
    stage = StageStore(Path(tempfile.mkdtemp()))
    t0 = time.perf_counter()
    static_pairs(clf, train, PairTrain(), device, 0, stage)
    torch.cuda.synchronize() if device.type == "cuda" else None
    print(f"static PGD-5 pairs for {len(train)} images: {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for name in names:
        cls = DEFENSES.get(name)
        d = cls().to(device)
        cfg = from_dict(cls.TrainConfig, {"epochs": 1, "progress": False}, name)
        res = d.fit(clf, train, TrainContext(device, 0, stages=stage), cfg)
        d.eval()
        clean, rob = accuracy(lambda z, d=d: clf(d.purify(z)))
        n_params = sum(p.numel() for p in d.parameters())
        rows.append((name, n_params, res.seconds_per_epoch, clean, rob, res.history[-1]))
        print(f"{name}: {res.seconds_per_epoch:.1f} s/epoch, clean {clean:.3f}, PGD-20 {rob:.3f}, "
              f"{res.history[-1]}", flush=True)
        del d
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n| defense | parameters (incl. critic) | s/epoch | clean after 1 epoch | PGD-20 after 1 epoch |")
    print("|---|---:|---:|---:|---:|")
    for name, n, s, c, r, _ in rows:
        print(f"| {name} | {n / 1e6:.2f}M | {s:.1f} | {100 * c:.1f} | {100 * r:.1f} |")


if __name__ == "__main__":
    main()
