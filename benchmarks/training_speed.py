"""Training speed: seconds per epoch of PGD-5 adversarial training of ResNet-18 and of DIR's main
training (Algorithm 1), on the CIFAR-10 JPEG copy.

    python benchmarks/training_speed.py [--n N] [--epochs E] [--skip-dir]

``--n`` images per epoch (default: 50,000 on CUDA, 1,024 on a CPU); times are scaled to a
50,000-image epoch (``s/epoch @50k``) so CPU and GPU figures read alike. The paper's DIR epoch:
527 s (its Table 4); this issue's targets on one H100: PGD-5 AT <= 6 s, DIR main >= 10x faster
than 527 s. Each phase is timed over ``--epochs`` epochs, median reported, the first epoch
(warm-up) dropped when more than one ran.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from benchmark.config import from_dict
from benchmark.data import load_dataset
from benchmark.models import create_model
from benchmark.training import TrainConfig, train_classifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--skip-dir", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the target during AT (CUDA)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    n = args.n or (50_000 if device.type == "cuda" else 1024)
    train = load_dataset("cifar10-jpeg", "train", n=None if n >= 50_000 else n, seed=0)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"{len(train)} training images ({train.copy})")
    rows = []

    def per_epoch(history_seconds: list[float]) -> float:
        kept = history_seconds[1:] if len(history_seconds) > 1 else history_seconds
        return statistics.median(kept)

    clf = create_model("resnet18", num_classes=10, in_channels=3, mean=train.mean, std=train.std).to(device)
    cfg = from_dict(TrainConfig, dict(method="at", epochs=args.epochs, batch_size=256, lr=0.2, attack_steps=5,
                                      progress=False, compile=args.compile), "train")
    t0 = time.perf_counter()
    result = train_classifier(clf, train, cfg, device)
    s = per_epoch([h["seconds"] for h in result.history])
    rows.append(("PGD-5 AT, ResNet-18, batch 256" + (" (compiled)" if args.compile else ""), s,
                 s * 50_000 / len(train), "<= 6 s (H100 target)"))
    print(f"AT: {time.perf_counter() - t0:.1f} s in all", flush=True)

    if not args.skip_dir:
        from defenses.dir import DIR, DIRTrain

        clf.eval()
        for p in clf.parameters():
            p.requires_grad_(False)
        dir_ = DIR()
        dir_.stage_dir = tempfile.mkdtemp()
        dcfg = from_dict(DIRTrain, dict(pretrain_epochs=1, epochs=args.epochs, progress=False), "train")
        fit = dir_.to(device).fit(clf, train, device, dcfg, seed=0)
        main_s = [h["seconds"] for h in fit.history if h.get("phase") == "main"]
        pre_s = [h["seconds"] for h in fit.history if h.get("phase") == "pretrain"]
        s = per_epoch(main_s)
        rows.append(("DIR main training (Algorithm 1), batch 128", s, s * 50_000 / len(train),
                     f"paper 527 s; speed-up {527 / (s * 50_000 / len(train)):.1f}x"))
        rows.append(("DIR pre-training (Eq. 2), batch 256", pre_s[0], pre_s[0] * 50_000 / len(train), "-"))
    print()
    print("| phase | s/epoch (measured) | s/epoch @50k | reference |")
    print("|---|---:|---:|---|")
    for name, s, s50, ref in rows:
        print(f"| {name} | {s:.2f} | {s50:.1f} | {ref} |")


if __name__ == "__main__":
    main()
