"""Attack throughput: our PGD-20 (with and without the engine's options) against torchattacks' PGD
and pyautoattack's APGD-CE, same model, same images, same device, same run.

    python benchmarks/attack_throughput.py [--n N] [--steps S] [--repeats R] [--through none,dir]

Model: the naturally trained ResNet-18 that ships with pyautoattack (the suite's
``autoattack-resnet18-natural``), on the CIFAR-10 JPEG copy (``.gpu/data`` or
``../shared/data/cifar10-jpeg``); ``--through dir`` puts an (untrained, full-size) DIR in front
of it: only its cost matters there. Prints one table: seconds (median of the repeats after a
warm-up), images x steps per second, the ratio to torchattacks, the robust accuracy of each
(fp32 re-scoring), and the achieved TFLOP/s from a FLOP count of one attack step
(``torch.utils.flop_counter``). Defaults are CPU-sized; on CUDA use ``--n 10000``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from attacks.base import Threat
from attacks.engine import EngineOptions
from benchmark.checkpoint import load_pretrained
from benchmark.data import load_dataset
from benchmark.harness import run_attack
from benchmark.registry import ATTACKS
from defenses.base import DefendedModel, NoDefense


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int):
    fn()  # warm-up (cuDNN autotuning, compilation)
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def step_flops(model, x, y) -> float:
    """FLOPs of one attack step (forward + input gradient) on ``x``."""
    from torch.utils.flop_counter import FlopCounterMode

    xs = x.detach().clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        loss = F.cross_entropy(model(xs).float(), y, reduction="sum")
        loss.backward()  # parameters are frozen: only the input gradient is computed
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=None, help="default: all n at once (auto on CUDA)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--through", default="none", help="comma list of none, dir")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (CUDA)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    data = load_dataset("cifar10-jpeg", "test").subset(args.n, seed=0).to(device)
    x, y = data.as_float(), data.labels
    eps, alpha = 8 / 255, 2 / 255
    threat = Threat("linf", eps)
    bs = args.batch_size or len(x)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"n = {len(x)} ({data.copy}); PGD-{args.steps}, eps 8/255, step 2/255; batch {bs}")
    def measure(through: str) -> list[tuple]:
        rows = []
        classifier, _ = load_pretrained("autoattack-resnet18-natural", device)
        if through == "dir":
            from defenses.dir import DIR

            defense = DIR().to(device)
        else:
            defense = NoDefense()
        model = DefendedModel(defense, classifier.eval()).to(device)
        flops = step_flops(model, x[: min(len(x), 64)], y[: min(len(x), 64)]) / min(len(x), 64)
        work = len(x) * args.steps

        def ours(engine=None, m=model):
            attack = ATTACKS.get("pgd")(steps=args.steps, step_size=alpha)
            return run_attack(attack, m, x, y, threat, batch_size=bs, seed=0, engine=engine).accuracy

        variants = [("ours fp32", lambda: ours())]
        if device.type == "cuda":
            fast = EngineOptions(precision="bf16", channels_last=True)
            variants.append(("ours bf16 + channels_last", lambda: ours(fast)))
            if args.compile:
                import copy

                compiled = DefendedModel(defense, copy.deepcopy(classifier)).to(device)
                opts = EngineOptions(precision="bf16", channels_last=True, compile=True)
                variants.append(("ours bf16 + channels_last + compile", lambda: ours(opts, compiled)))
        else:
            variants.append(("ours channels_last", lambda: ours(EngineOptions(channels_last=True))))
        try:
            import torchattacks

            def ta():
                atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=args.steps, random_start=True)
                correct = 0
                for i in range(0, len(x), bs):
                    adv = atk(x[i:i + bs], y[i:i + bs])
                    with torch.no_grad():
                        correct += int((model(adv).argmax(1) == y[i:i + bs]).sum())
                return correct / len(x)

            variants.append(("torchattacks PGD", ta))
        except ImportError:
            print("torchattacks not installed: its row is missing")

        def apgd():
            from pyautoattack.autopgd_base import APGDAttack

            atk = APGDAttack(model, norm="Linf", eps=eps, n_iter=args.steps, n_restarts=1, loss="ce",
                             device=device, seed=0)
            correct = 0
            for i in range(0, len(x), bs):
                adv = atk.perturb(x[i:i + bs], y[i:i + bs])
                with torch.no_grad():
                    correct += int((model(adv).argmax(1) == y[i:i + bs]).sum())
            return correct / len(x)

        variants.append(("pyautoattack APGD-CE", apgd))
        results = {}
        for name, fn in variants:
            seconds, acc = timed(fn, device, args.repeats)
            results[name] = (seconds, acc)
        ref = results.get("torchattacks PGD", (None,))[0]
        for name, (seconds, acc) in results.items():
            rows.append((through, name, seconds, work / seconds, (ref / seconds) if ref else None, 100 * acc,
                                 flops * work / seconds / 1e12))
        return rows

    rows = [row for through in args.through.split(",") for row in measure(through)]
    print()
    print("| through | attack | seconds | images x steps / s | speed-up vs torchattacks | robust acc % | TFLOP/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for through, name, seconds, rate, ratio, acc, tflops in rows:
        r = f"{ratio:.2f}x" if ratio else "-"
        print(f"| {through} | {name} | {seconds:.3f} | {rate:,.0f} | {r} | {acc:.2f} | {tflops:.3f} |")
    print("\nTFLOP/s: FLOPs of one step (forward + input gradient, counted by torch.utils.flop_counter) x steps x n"
          " / seconds; APGD also runs a few extra forwards, so its figure is a lower bound.")


if __name__ == "__main__":
    main()
