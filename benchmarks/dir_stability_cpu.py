"""Does DIR's main training stay finite and keep the classifier working? A CPU-scale check.

Full-size DIR (the paper's ViT) against the naturally trained ResNet-18 that ships with
pyautoattack (the DIR paper's Table 4 setting uses a natural target), on a subset of the
CIFAR-10 JPEG copy. Prints, per phase, the loss and the clean accuracy of target(DIR(x)) on
held-out images next to the target alone. Not a robustness result: too few images and epochs.

    python benchmarks/dir_stability_cpu.py [N_TRAIN] [PRETRAIN_EPOCHS] [MAIN_EPOCHS] [KEY=VALUE ...]
"""

from __future__ import annotations

import sys
import time

import torch

from benchmark.checkpoint import load_pretrained
from benchmark.config import from_dict
from benchmark.data import load_dataset
from defenses.dir import DIR, DIRTrain


def main() -> None:
    n_train = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    pre = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    main_epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    extra = dict(a.split("=", 1) for a in sys.argv[4:])
    extra = {k: (float(v) if k in ("alpha", "lr", "grad_clip") else v) for k, v in extra.items()}
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clf, _ = load_pretrained("autoattack-resnet18-natural", device)
    train = load_dataset("cifar10-jpeg", "train", n=n_train, seed=0)
    test = load_dataset("cifar10-jpeg", "test", n=200, seed=0).to(device)
    cfg = from_dict(DIRTrain, {"pretrain_epochs": pre, "epochs": main_epochs, "batch_size": 64,
                               "pretrain_batch_size": 64, "augment": False, "progress": False, **extra}, "dir")
    d = DIR().to(device)
    d.seed(0, device)

    def clean_acc() -> float:
        with torch.no_grad():
            return float((clf(d.purify(test.as_float())).argmax(1) == test.labels).float().mean())

    with torch.no_grad():
        base = float((clf(test.as_float()).argmax(1) == test.labels).float().mean())
    print(f"target alone: clean {base:.3f} on {len(test)} test images; DIR config {cfg}", flush=True)
    t0 = time.perf_counter()
    use_bf16 = device.type == "cuda"
    for h in d.pretrain(clf, train.to(device), cfg, device, use_bf16, 0):
        print(f"pretrain epoch {h['epoch']}: mse {h['loss']:.4f}, {h['seconds']:.0f} s", flush=True)
    print(f"after pre-training: clean {clean_acc():.3f}", flush=True)
    for h in d.main_train(clf, train.to(device), cfg, device, use_bf16, 0):
        print(f"main epoch {h['epoch']}: loss {h['loss']:.4f}, robust train acc {h['robust_train_acc']:.3f}, "
              f"{h['seconds']:.0f} s", flush=True)
    print(f"after main training: clean {clean_acc():.3f}; total {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
