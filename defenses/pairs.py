"""Training data shared by the denoising baselines (APE-GAN, HGD, NRP, JATP): their adversarial pairs.

The seed paper trains the baselines on adversarial examples crafted against the
adversarially trained target *alone* with PGD-5 (eps 8/255, step 2/255). These
"static" pairs are made once per (dataset, target, attack settings, seed) and
cached in the runner's stage folder, so every baseline of a run reuses them. Two
other sources are options (``pairs`` in each baseline's train options):

* ``per-epoch``: PGD against the target alone, regenerated at every epoch;
* ``full``: PGD against the defense being trained + the target, per batch (the
  "adversarially trained" variants of the seed paper's Figure 6b; JATP always
  trains this way).

Adversarial images are stored as uint8: the clean images are multiples of 1/255, so
rounding to the 1/255 grid (and, for an eps off the grid, clipping back into the ball)
keeps every pixel inside the ball; for eps = 8/255 nothing is clipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from attacks.pgd import LossFn, ce_sum, pgd_linf
from benchmark import distributed
from benchmark.artifacts import StageStore, stage
from benchmark.config import require, subkey
from benchmark.data import ImageData, augment
from benchmark.errors import BenchError
from defenses.base import TrainOptions

PAIRS_VERSION = 1


@dataclass
class PairTrain(TrainOptions):
    """Options every baseline shares: epochs, batches, the adversarial training pairs."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-4
    pairs: Literal["static", "per-epoch", "full"] = "static"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    attack_steps: int = 5

    def validate(self, where: str) -> None:
        self.require_positive(where, "epochs", "batch_size", "attack_steps")
        require(self.lr > 0, subkey(where, "lr"), f"must be > 0, got {self.lr}")
        require(0 < self.eps <= 1, subkey(where, "eps"), f"must be in (0, 1], got {self.eps}")
        require(0 < self.step_size <= 1, subkey(where, "step_size"), f"must be in (0, 1], got {self.step_size}")
        allowed = ("static", "per-epoch", "full")
        require(self.pairs in allowed, subkey(where, "pairs"), f"must be one of {allowed}, got {self.pairs!r}")


@dataclass
class StepPairTrain(PairTrain):
    """HGD's recipe (100 epochs of Adam at 1e-3, lr x0.1 at 60% and 90%), which JATP's
    reconstruction follows."""

    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 2e-4
    milestones: list[float] = field(default_factory=lambda: [0.6, 0.9])


def step_schedule(opt: torch.optim.Optimizer, total_steps: int, milestones=(0.6, 0.9)):
    """lr x0.1 at each milestone fraction of training (HGD's schedule shape)."""
    bounds = [int(m * total_steps) for m in milestones]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 ** sum(s >= b for b in bounds))


# ----------------------------------------------------------------------------- crafting
@torch.no_grad()
def _to_uint8(x_adv: torch.Tensor, clean: torch.Tensor, eps: float) -> torch.Tensor:
    """Round to the 1/255 grid without leaving the ball (eps off the grid loses < 1/255)."""
    m = math.floor(eps * 255 + 1e-6)
    k = clean.to(device=x_adv.device, dtype=torch.int16)
    q = (x_adv.float() * 255).round_().to(torch.int16)
    return torch.min(torch.max(q, k - m), k + m).clamp_(0, 255).to(torch.uint8)


def craft_against_target(classifier: nn.Module, data: ImageData, cfg: PairTrain, device: torch.device,
                         seed: int, batch_size: int = 512) -> torch.Tensor:
    """PGD against the target alone on every training image; uint8, same order as ``data``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty_like(data.images, device="cpu")
    bf16 = cfg.use_bf16(device)
    classifier.eval()
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        x = data.as_float(idx.to(data.images.device)).to(device)
        y = data.labels[idx.to(data.labels.device)].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            adv = pgd_linf(classifier, x, y, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.attack_steps,
                           generator=gen)
        out[idx] = _to_uint8(adv, data.images[idx.to(data.images.device)], cfg.eps).cpu()
    clean = data.images.cpu().to(torch.int16)
    assert (out.to(torch.int16) - clean).abs().max() <= math.floor(cfg.eps * 255 + 1e-6), "pairs left the ball"
    return out


class _Stored(nn.Module):
    def __init__(self, adv: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("adv", adv)


def static_pairs(classifier: nn.Module, data: ImageData, cfg: PairTrain, device: torch.device, seed: int,
                 stages: StageStore | None) -> torch.Tensor:
    """The static PGD pairs, made once per run and cached as a stage (shared by every baseline)."""
    key = {"v": PAIRS_VERSION, "n": len(data), "seed": seed, "eps": cfg.eps, "step": cfg.step_size,
           "steps": cfg.attack_steps, "bf16": cfg.use_bf16(device),
           "labels": int(data.labels.sum()), "first": data.images[:8].sum().item()}
    holder = _Stored(torch.empty_like(data.images, device="cpu"))

    def build() -> dict:
        holder.adv.copy_(craft_against_target(classifier, data, cfg, device, seed))
        return {"defense": "static-pairs", "options": {"eps": cfg.eps, "step_size": cfg.step_size,
                                                       "steps": cfg.attack_steps, "n": len(data), "seed": seed}}

    stage(stages, f"pairs-pgd{cfg.attack_steps}", key, holder, build, "adversarial pairs")
    return holder.adv


def joint_augment(x: torch.Tensor, x_adv: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random crop and flip for an image and its adversarial partner."""
    both = augment(torch.cat([x, x_adv], dim=1), generator=generator)
    c = x.shape[1]
    return both[:, :c], both[:, c:]


class PairSource:
    """Batches ``(x, x_adv, y)`` for one epoch after another, from the configured source.

    For ``full`` pairs the source attacks ``classifier(defense.purify(.))`` with the defense
    switched to eval mode while crafting. A defense that crafts differently (JATP) passes
    ``attack_forward`` (what PGD differentiates), ``attack_reference(x, y)`` (what the loss
    compares the output with; the label by default) and ``attack_loss``.
    """

    def __init__(self, classifier: nn.Module, data: ImageData, cfg: PairTrain, device: torch.device, seed: int,
                 stages: StageStore | None = None, defense: nn.Module | None = None,
                 attack_forward: Callable | None = None, attack_reference: Callable | None = None,
                 attack_loss: LossFn = ce_sum, mode: str | None = None) -> None:
        self.classifier, self.cfg, self.device, self.seed = classifier, cfg, device, seed
        self.data = data.to(device)
        self.mode = mode or cfg.pairs
        self.defense = defense
        self.attack_forward = attack_forward
        self.attack_reference = attack_reference or (lambda x, y: y)
        self.attack_loss = attack_loss
        self.order_gen = torch.Generator().manual_seed(seed)
        self.aug_gen = torch.Generator(device=device).manual_seed(seed + 7)
        self.attack_gen = torch.Generator(device=device).manual_seed(seed + 11)
        self.adv: torch.Tensor | None = None
        if self.mode == "static":
            self.adv = static_pairs(classifier, data, cfg, device, seed, stages).to(device)
        elif self.mode == "full" and defense is None:
            raise BenchError("pairs 'full' needs the defense being trained")

    def generators(self) -> dict[str, torch.Generator]:
        """Every generator the source draws from (saved with a training's per-epoch state)."""
        return {"pairs.order": self.order_gen, "pairs.augment": self.aug_gen, "pairs.attack": self.attack_gen}

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        cfg, n = self.cfg, len(self.data)
        if self.mode == "per-epoch":
            self.adv = craft_against_target(self.classifier, self.data, cfg, self.device, self.seed + 1000 * epoch)
            self.adv = self.adv.to(self.device)
        order = torch.randperm(n, generator=self.order_gen).to(self.device)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            idx = idx[distributed.rank_slice(len(idx))]  # under torchrun each rank its part of the batch
            x, y = self.data.as_float(idx), self.data.labels[idx]
            if self.mode == "full":
                if cfg.augment:
                    x = augment(x, generator=self.aug_gen)
                x_adv = self.craft_full(x, y)
            else:
                x_adv = self.adv[idx].float().div_(255)
                if cfg.augment:
                    x, x_adv = joint_augment(x, x_adv, self.aug_gen)
            yield x, x_adv, y

    def craft_full(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD against the defense being trained + the target (eval mode, weights untouched)."""
        defense, clf = self.defense, self.classifier
        forward = self.attack_forward or (lambda z: clf(defense.purify(z)))
        was = defense.training
        defense.eval()
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.use_bf16(self.device)):
                with torch.no_grad():
                    ref = self.attack_reference(x, y)
                adv = pgd_linf(forward, x, ref, eps=self.cfg.eps, step_size=self.cfg.step_size,
                               steps=self.cfg.attack_steps, loss_fn=self.attack_loss, generator=self.attack_gen)
        finally:
            defense.train(was)
        return adv.detach()


# ----------------------------------------------------------------------------- the start of a training, losses
def pair_source(defense: nn.Module, classifier: nn.Module, train: ImageData, context, cfg: PairTrain,
                **crafting) -> PairSource:
    """How every pair-based training starts: the global seed, the pairs (``crafting``: as
    :class:`PairSource`), and under torchrun every rank from rank 0's initial weights."""
    torch.manual_seed(context.seed)
    source = PairSource(classifier, train, cfg, context.device, context.seed, context.stages, defense=defense,
                        **crafting)
    distributed.broadcast_module(defense)
    return source


def feature_distance(a: torch.Tensor, b: torch.Tensor, kind: Literal["l1", "mse", "cosine"]) -> torch.Tensor:
    """Per-sample distance between feature tensors (flattened)."""
    a, b = a.float().flatten(1), b.float().flatten(1)
    if kind == "l1":
        return (a - b).abs().mean(1)
    if kind == "mse":
        return (a - b).pow(2).mean(1)
    return 1 - F.cosine_similarity(a, b, dim=1)
