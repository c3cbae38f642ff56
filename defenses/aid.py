"""AID-Purifier (Hwang et al., 2021): a light discriminator on the frozen target's
intermediate features scores "cleanness"; purification takes a few signed-gradient steps
that raise the score, inside the eps ball around the input.

Discriminator (the official ``discriminator_model.py``, adapted to the target): each tap
(a feature map of the target) is globally average-pooled, then ``bcd`` 1x1 conv (on
pooled features: linear) layers to 1024 channels with BN and ReLU; the taps are
concatenated and ``acd`` halving 1x1 conv layers (BN, ReLU) follow; a linear layer gives
one logit (a sigmoid gives the score). CIFAR-10: bcd 1, acd 3; SVHN: bcd 0, acd 2. The
official taps on WRN-34-10 are conv1 and block2 (SVHN: block3); on ResNet-18 they are
mapped by resolution to the stem (``bn1``) and ``layer2`` (SVHN: ``layer3``); other
architectures name their taps (``taps``).

Training (``train_function.py``): PGD-10 with random start against the target alone
(CIFAR-10: eps 0.031, step 0.004; SVHN 0.047 / 0.008); AVmixup with gamma 1.5 (SVHN 2.0):
vertex = clip(x + gamma (x_adv - x)), lambda ~ U(0,1), input lambda x + (1 - lambda) vertex,
BCE target lambda. SGD 0.01, momentum 0.9, weight decay 2e-4, batch 128, one epoch.

Purification: ``steps`` (10) steps x <- Pi_{x0, eps}(x + alpha sign grad sum D(x)) with
alpha = eps / 4. Differentiable, but an exact attack needs second-order gradients through
the loop: adaptive attacks use BPDA (identity) by default (``prefers_bpda``);
``attack_gradient: unrolled`` keeps the graph through the steps instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from attacks.pgd import pgd_linf, project_linf
from benchmark.config import require, subkey
from benchmark.registry import DEFENSES
from benchmark.trainer import Trainer
from defenses.base import Defense, FitResult, TrainContext
from defenses.unroll import unroll


def _dense(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True))


class FeatureDiscriminator(nn.Module):
    def __init__(self, tap_channels: list[int], bcd: int = 1, acd: int = 3, width: int = 1024) -> None:
        super().__init__()
        self.branches = nn.ModuleList()
        total = 0
        for c in tap_channels:
            layers, cin = [], c
            for _ in range(bcd):
                layers.append(_dense(cin, width))
                cin = width
            self.branches.append(nn.Sequential(*layers))
            total += cin
        layers, cin = [], total
        for _ in range(acd):
            layers.append(_dense(cin, cin // 2))
            cin //= 2
        self.after = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        pooled = [b(f.float().mean(dim=(2, 3))) for b, f in zip(self.branches, feats)]
        return self.head(self.after(torch.cat(pooled, dim=1))).squeeze(1)  # a logit


@dataclass
class AIDOptions:
    """The discriminator (its taps on the target, default per architecture; bcd/acd conv layers
    before/after the join; width) and the purification (eps, signed-gradient steps); the attack's
    gradient through the loop: BPDA or unrolled."""

    taps: list[str] | None = None  # target layers the discriminator reads (None: per architecture)
    bcd: int = 1  # conv layers on each tap before the join
    acd: int = 3  # conv layers after the join
    width: int = 1024  # channels of the joined features
    eps: float = 8 / 255  # purification budget around the input
    steps: int = 10  # signed-gradient purification steps
    attack_gradient: Literal["bpda", "unrolled"] = "bpda"  # the attack's gradient through the loop


@dataclass
class AIDTrain:
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 2e-4
    eps: float = 0.031
    step_size: float = 0.004
    attack_steps: int = 10
    gamma: float = 1.5  # AVmixup scale (SVHN 2.0)
    progress: bool = True

    def validate(self, where: str) -> None:
        for key in ("epochs", "batch_size", "attack_steps"):
            require(getattr(self, key) >= 1, subkey(where, key), f"must be >= 1, got {getattr(self, key)}")
        require(self.lr > 0 and 0 < self.eps <= 1 and 0 < self.step_size <= 1, where, "lr, eps, step_size must be > 0")
        require(self.gamma >= 1, subkey(where, "gamma"), f"must be >= 1, got {self.gamma}")


DEFAULT_TAPS = {"ResNet": ["bn1", "layer2"], "WideResNet": ["conv1", "block2"], "SmallCNN": ["body.2", "body.9"]}


@DEFENSES.register("aid", paper="Hwang et al., 2021",
                   description="AID-Purifier: feature discriminator of the target; signed-gradient purification")
class AIDPurifier(Defense):
    trainable = True
    prefers_bpda = True
    exact_gradient = True  # purify_exact: the loop back-propagated in checkpointed segments
    TrainConfig = AIDTrain
    data_shape_options = ()
    inference_options = ("eps", "steps", "attack_gradient")

    Options = AIDOptions

    def __init__(self, **options: Any) -> None:
        super().__init__()
        o = self.options = self.read_options(options)
        self.taps, self.bcd, self.acd, self.width = o.taps, o.bcd, o.acd, o.width
        self.eps, self.steps, self.unrolled = o.eps, o.steps, o.attack_gradient == "unrolled"
        self.prefers_bpda = not self.unrolled
        self.discriminator: FeatureDiscriminator | None = None
        self._target: list[nn.Module] = []  # the frozen target, not a submodule (it is not ours)

    def attach_classifier(self, classifier: nn.Module) -> None:
        """Build the discriminator for this target's tap shapes (the target stays shared)."""
        self._target = [classifier]
        if self.taps is None:
            self.taps = DEFAULT_TAPS.get(type(classifier.net).__name__)
            if self.taps is None:
                raise ValueError(f"AID-Purifier has no default taps for {type(classifier.net).__name__}; "
                                 "give options.taps (two layer names)")
        if self.discriminator is None:
            dev = next(classifier.parameters()).device
            probe = torch.zeros(2, classifier.mean.shape[1], 32, 32, device=dev)
            with torch.no_grad():
                chans = [f.shape[1] for f in classifier.feature_maps(probe, self.taps)]
            self.discriminator = FeatureDiscriminator(chans, self.bcd, self.acd, self.width).to(dev)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(self._target[0].feature_maps(x, self.taps))

    def _step(self, z: torch.Tensor, x0: torch.Tensor, t: int, generator, create_graph: bool) -> torch.Tensor:
        """One signed-gradient step towards "natural" for the discriminator, projected around x0."""
        s = torch.sigmoid(self.score(z)).sum()
        (g,) = torch.autograd.grad(s, z, create_graph=create_graph)
        return project_linf(z + self.eps / 4 * g.sign(), x0, self.eps)

    def purify(self, x: torch.Tensor, masks=None) -> torch.Tensor:
        if not self._target:
            raise RuntimeError("AID-Purifier needs attach_classifier(target) before use")
        if self.unrolled and torch.is_grad_enabled() and x.requires_grad:
            return self.purify_exact(x)
        x = x.detach()
        return unroll(self._step, x, x, self.steps)  # the plain loop: no graph

    def purify_exact(self, x: torch.Tensor, masks=None) -> torch.Tensor:
        """The loop back-propagated exactly (through the start point and the projection's centre; the
        sign's derivative is zero), in checkpointed segments of about sqrt(steps) steps."""
        if not self._target:
            raise RuntimeError("AID-Purifier needs attach_classifier(target) before use")
        return unroll(self._step, x, x, self.steps)

    def fit(self, classifier, train, context: TrainContext, config: AIDTrain | None = None) -> FitResult:
        device, seed = context.device, context.seed
        cfg = config or AIDTrain()
        torch.manual_seed(seed)
        self.attach_classifier(classifier)
        disc = self.discriminator.to(device)
        opt = torch.optim.SGD(disc.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(seed)
        agen = torch.Generator(device=device).manual_seed(seed + 1)
        data = train.to(device)
        t_start = time.perf_counter()

        def step(batch) -> dict:
            x, y = batch
            classifier.eval()
            x_adv = pgd_linf(classifier, x, y, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.attack_steps,
                             generator=agen)
            vertex = (x + cfg.gamma * (x_adv - x)).clamp(0, 1)  # AVmixup
            lam = torch.rand(len(x), device=device, generator=agen)
            mixed = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * vertex
            disc.train()
            with torch.no_grad():
                feats = classifier.feature_maps(mixed, self.taps)
            loss = F.binary_cross_entropy_with_logits(disc(feats), lam)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss}

        trainer = Trainer(self, "AID-Purifier", context, cfg.epochs, optimizers={"sgd": opt},
                          gens={"shuffle": gen, "attack": agen}, progress=cfg.progress, started=t_start,
                          steps_per_epoch=-(-len(data) // cfg.batch_size))
        return trainer.fit(lambda epoch: data.batches(cfg.batch_size, shuffle=True, generator=gen), step)
