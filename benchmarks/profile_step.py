"""Where the time goes: torch.profiler over the suite's own hot loops, summarised by kind of work.

    python benchmarks/profile_step.py [--n N] [--steps S] [--work pgd-none,pgd-dir,at] [--top K]

Workloads (each run once as a warm-up, then once under the profiler):

* ``pgd-none``: our PGD (``benchmark.harness.run_attack``, the path every cell takes, threat-ball
  check and fp32 re-scoring included) through ResNet-18 with no defense;
* ``pgd-dir``: the same through a full-size DIR in front of ResNet-18;
* ``at``: PGD-5 adversarial training steps of ResNet-18 (``benchmark.training.train_step_loss``,
  backward and SGD step), one batch of ``--n`` per step.

On CUDA the engine's fast options are on (bf16 autocast, channels_last), as in the throughput and
training benchmarks; on a CPU, fp32. For each workload the script prints the share of device time
(CUDA kernels on a GPU, operator self time on a CPU) per kind of work (convolution, matmul and
attention, normalisation, elementwise and activation, reductions and loss, copies and layout,
optimizer) and the ``--top`` operators, then one line of achieved TFLOP/s: the FLOPs of the same work counted by
``torch.utils.flop_counter`` (forward and backward) over the profiled device time. The weights are random: the cost of a pass does not depend on them.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from bench_common import add_data_args, count_flops, describe, load_images, pick_device, sync
from torch.profiler import ProfilerActivity, profile

from attacks.base import Threat
from attacks.engine import EngineOptions
from benchmark.config import from_dict
from benchmark.harness import run_attack
from benchmark.models import create_model
from benchmark.registry import ATTACKS
from benchmark.training import TrainConfig, train_step_loss
from defenses.base import DefendedModel, NoDefense

KINDS = [  # first match wins; matched against the operator or kernel name, lower case
    ("convolution", r"conv|cudnn|implicit_gemm|winograd|wgrad|dgrad|fprop|nchw|nhwc"),
    ("matmul / attention", r"\bmm\b|addmm|bmm|matmul|linear|gemm|sdpa|attention|flash|cutlass|sm90|sm80"),
    ("normalisation", r"batch_norm|layer_norm|native_norm|bn_|welford|norm_"),
    ("optimizer", r"sgd|adam|foreach|multi_tensor|_fused_"),
    ("reductions / loss", r"reduce|sum|mean|amax|max|min|argmax|softmax|nll|cross_entropy|log_softmax|kl_div"),
    ("copies / layout", r"copy|contiguous|clone|cat|stack|index|gather|scatter|to_copy|memcpy|memset|fill|transpose|permute"),
    ("elementwise / activation", r"add|mul|sub|div|relu|gelu|clamp|sign|where|elementwise|vectorized|pow|exp|sqrt|abs"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def summarise(prof, device: torch.device, top: int) -> tuple[list, list, float]:
    """(kind shares, top operators, total device seconds) of a finished profile."""
    events = prof.key_averages()
    if device.type == "cuda":  # the kernels themselves: device time, no double counting
        rows = [(e.key, e.self_device_time_total / 1e6) for e in events
                if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
        if not rows:  # older profilers book kernels under their launching operator
            rows = [(e.key, e.self_device_time_total / 1e6) for e in events if e.self_device_time_total > 0]
    else:
        rows = [(e.key, e.self_cpu_time_total / 1e6) for e in events if e.self_cpu_time_total > 0]
    total = sum(s for _, s in rows) or float("nan")
    by_kind: dict[str, float] = defaultdict(float)
    for name, s in rows:
        by_kind[kind_of(name)] += s
    kinds = sorted(by_kind.items(), key=lambda kv: -kv[1])
    ops = sorted(rows, key=lambda kv: -kv[1])[:top]
    return kinds, ops, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=None, help="images per batch (default: 512 on CUDA, 32 on a CPU)")
    ap.add_argument("--steps", type=int, default=5, help="PGD steps per attack run (and AT's attack steps stay 5)")
    ap.add_argument("--work", default="pgd-none,pgd-dir,at", help="comma list of pgd-none, pgd-dir, at")
    ap.add_argument("--top", type=int, default=8)
    add_data_args(ap)
    args = ap.parse_args()
    works = args.work.split(",")
    unknown = sorted(set(works) - {"pgd-none", "pgd-dir", "at"})
    if unknown:
        raise SystemExit(f"--work: unknown {unknown}; allowed: pgd-none, pgd-dir, at")
    device = pick_device()
    cuda = device.type == "cuda"
    n = args.n or (512 if cuda else 32)
    data = load_images(args, "test", n, size=(3, 32, 32)).to(device)
    x, y = data.as_float(), data.labels
    engine = EngineOptions(precision="bf16", channels_last=True) if cuda else EngineOptions()
    print(f"{describe(device)}; {len(x)} images ({data.copy}); "
          f"{'bf16 + channels_last' if cuda else 'fp32'}; time = {'CUDA kernel' if cuda else 'operator self CPU'} time")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def classifier():
        torch.manual_seed(0)
        return create_model("resnet18", num_classes=10, mean=data.mean, std=data.std).to(device).eval()

    def workload(name: str):
        if name in ("pgd-none", "pgd-dir"):
            if name == "pgd-dir":
                from defenses.dir import DIR

                defense = DIR().to(device).eval()
            else:
                defense = NoDefense()
            model = DefendedModel(defense, classifier()).to(device)
            attack = ATTACKS.get("pgd")(steps=args.steps, step_size=2 / 255)
            label = f"PGD-{args.steps} through {'DIR + ' if name == 'pgd-dir' else ''}ResNet-18, batch {len(x)}"
            return label, lambda: run_attack(attack, model, x, y, Threat("linf", 8 / 255), batch_size=len(x),
                                             seed=0, engine=engine)
        model = classifier()
        if cuda:
            model.to(memory_format=torch.channels_last)
        cfg = from_dict(TrainConfig, dict(method="at", epochs=1, batch_size=len(x), lr=0.1, attack_steps=5,
                                          progress=False), "train")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

        def step():
            xb = x.contiguous(memory_format=torch.channels_last) if cuda else x
            loss, _ = train_step_loss(model, xb, y, cfg, autocast)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return f"PGD-5 AT training step of ResNet-18, batch {len(x)}", step

    for name in works:
        label, fn = workload(name)
        fn()  # warm-up
        sync(device)
        flops, _ = count_flops(fn)  # forward and backward FLOPs of the same work
        sync(device)
        with profile(activities=activities) as prof:
            fn()
            sync(device)
        kinds, ops, total = summarise(prof, device, args.top)
        print(f"\n### {name}: {label}\n")
        print(f"device time profiled: {total:.3f} s; FLOPs counted: {flops / 1e12:.3f} T; "
              f"achieved {flops / total / 1e12:.2f} TFLOP/s")
        print("\n| kind of work | seconds | share |\n|---|---:|---:|")
        for kind, s in kinds:
            print(f"| {kind} | {s:.4f} | {100 * s / total:.1f}% |")
        print(f"\n| top operators{' (kernels)' if cuda else ''} | seconds | share |\n|---|---:|---:|")
        for op, s in ops:
            short = op if len(op) <= 70 else op[:67] + "..."
            print(f"| `{short}` | {s:.4f} | {100 * s / total:.1f}% |")


if __name__ == "__main__":
    main()
