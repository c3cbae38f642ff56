"""FLOPs of one attack pass (forward + input gradient) of one image through each defended model of
the paper configs, and the per-image pass cost they imply on a GPU.

``run --plan`` needs each defended model's per-image pass cost (``pass_us`` in
``benchmark/costs.yaml``). Only the target alone was timed at a size that fills an H100 (23 us per
CIFAR image, PGD-20 on 10,000 images); the CUDA smoke's 64-image cells give each defense's latency
floor, not its throughput. This script counts the matmul and convolution FLOPs of one pass through
each defended model as the paper configs build it, on 32x32 colour images (untrained weights: the count does not depend on
them), and scales the target's measured figure by the ratio: a defense's pass is taken to run at
the target's FLOP rate. That rate differs between networks (a ViT's attention, a small purifier's
poor occupancy), so these are derived estimates, better than a guess, worse than a measurement.
For the EBM the unit is one Langevin step of one chain (the plan multiplies by steps and chains).
ME-Net's purification is a matrix completion on the CPU side of the pass; its figure stays measured.

    python benchmarks/pass_flops.py            # prints the table (CPU, about a minute)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import count_flops  # noqa: E402

from benchmark.experiment import build_defense, load_config  # noqa: E402
from benchmark.models import create_model  # noqa: E402
from defenses.base import DefendedModel  # noqa: E402

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
TARGET_US = 23.0  # costs.yaml pass_us.none: measured on an H200 (PGD-20 on 10,000 CIFAR images, fp32)


def pass_flops(model: torch.nn.Module, n: int = 2) -> float:
    """Per-image FLOPs of one forward + input-gradient pass of ``n`` CIFAR-size images."""
    x = torch.rand(n, 3, 32, 32, requires_grad=True)

    def one_pass():
        return torch.autograd.grad(model(x).sum(), x)[0]

    return count_flops(one_pass)[0] / n


def defended(spec, target: torch.nn.Module, **options) -> DefendedModel:
    if options:
        spec = dataclasses.replace(spec, options={**spec.options, **options})
    defense = build_defense(spec, data_shape=(3, 32))
    if hasattr(defense, "attach_classifier"):  # AID-Purifier's taps on this target
        defense.attach_classifier(target)
    defense.eval()
    return DefendedModel.for_defense(defense, target)


def rows():
    """(registered name, the first row of the paper configs that uses it; CIFAR-10's first)."""
    seen = {}
    for path in sorted(PAPER.glob("*.yaml")):
        for spec in load_config(path).defenses:
            seen.setdefault(spec.registered, spec)
    return seen


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    torch.manual_seed(0)
    target = create_model("resnet18").eval()
    for p in target.parameters():
        p.requires_grad_(False)
    base = pass_flops(target)
    print(f"target alone (resnet18): {base / 1e6:.1f} MFLOPs per image and pass -> {TARGET_US:.0f} us (measured)")
    print("| defense | MFLOPs per image and pass | x target | derived pass_us (us) |")
    print("|---|---:|---:|---:|")
    for name, spec in rows().items():
        if name in ("none", "menet", "menet-a"):
            continue
        if name == "ebm":  # one Langevin step of one chain: two steps minus one
            flops = pass_flops(defended(spec, target, steps=2, chains=1)) - \
                pass_flops(defended(spec, target, steps=1, chains=1))
        else:
            flops = pass_flops(defended(spec, target))
        print(f"| {name} | {flops / 1e6:.1f} | {flops / base:.3g} | {TARGET_US * flops / base:.3g} |")


if __name__ == "__main__":
    main()
