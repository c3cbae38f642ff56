"""ME-Net (Yang et al., ICML 2019): random pixel masks + low-rank matrix estimation (USVT).

Preprocessing, per image: scale to [-1,1]; concatenate the channels side by side into an
H x (C W) matrix; keep each pixel (all its channels) with probability p; take the SVD and
keep the top ``floor(rank_fraction * min(H, C W))`` singular values (25 at 32x32); divide
by the observed fraction; clip to [-1,1]; map back to [0,1]. Batched ``torch.linalg.svd``
on the input's device, never a per-image loop.

ME-Net retrains the classifier on its reconstructions, so the defense holds its own copy
of the target (``attach_classifier``) and the defended model uses it:

* ``menet``: trained naturally on ME images, p drawn per image uniformly in
  [p_low, p_high] (the official code's ``ceil`` bug always used p_high: ``ceil_bug``);
* ``menet-a``: adversarially, PGD-7 through ME with the identity as backward (BPDA), as
  the official ``train_adv.py``.

Official recipe: SGD 0.1, momentum 0.9, weight decay 1e-4, batch 256, 200 epochs (lr /10
at 100 and 150 for ME-Net, at 50/100/150 for ME-Net-A), 10 masks per image precomputed.
Here ME is recomputed on the fly with a fresh mask per image per step, augmentation is
applied before ME (the code applies it after), and the copy starts from scratch
(``init: target`` fine-tunes the target instead, for short runs).

Inference: p = 0.5 fixed, a fresh mask per image per call: stochastic, numerically
non-differentiable (the identity is the BPDA surrogate).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from benchmark import distributed
from benchmark.config import require, subkey
from benchmark.registry import DEFENSES
from benchmark.training import TrainConfig, train_classifier
from defenses.base import Defense, FitResult, TrainContext, fresh_copy, reinitialise


def usvt(x: torch.Tensor, keep: torch.Tensor, rank: int, exact: bool = False) -> torch.Tensor:
    """Reconstruct images ``x`` (B, C, H, W in [0,1]) from the pixels where ``keep`` (B, 1, H, W)
    is true by universal singular value thresholding on the channel-concatenated matrix.
    ``exact``: differentiable (through the SVD, exact almost everywhere); where the SVD's gradient is
    not finite (repeated singular values) that image's gradient is set to zero, never NaN."""
    if not exact:
        with torch.no_grad():
            return usvt(x, keep, rank, exact=True)
    b, c, h, w = x.shape
    z = (x.to(torch.promote_types(x.dtype, torch.float32)) * 2 - 1) * keep.to(x.dtype)
    mat = z.permute(0, 2, 1, 3).reshape(b, h, c * w)  # R | G | B side by side
    if mat.requires_grad:
        mat.register_hook(_zero_non_finite)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    k = min(rank, s.shape[1])
    low = (u[:, :, :k] * s[:, None, :k]) @ vh[:, :k, :]
    frac = keep.float().mean(dim=(1, 2, 3)).clamp_min(1e-6)
    low = (low / frac[:, None, None]).clamp(-1, 1)
    out = low.reshape(b, h, c, w).permute(0, 2, 1, 3)
    return ((out + 1) / 2).to(x.dtype)


def _zero_non_finite(grad: torch.Tensor) -> torch.Tensor:
    """An image whose gradient through the SVD is not finite gets a zero gradient."""
    bad = ~torch.isfinite(grad).flatten(1).all(1)
    return torch.where(bad.view(-1, *([1] * (grad.dim() - 1))), torch.zeros_like(grad), grad)


class _BPDAIdentity(torch.autograd.Function):
    """Forward: ME; backward: the identity (the official ME-Net-A training attack)."""

    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class MEClassifier(nn.Module):
    """classifier(ME(x)) with identity gradients through ME: what ME-Net trains."""

    def __init__(self, defense: MENet, classifier: nn.Module, p_range: tuple[float, float]) -> None:
        super().__init__()
        self.classifier = classifier
        self._defense = [defense]  # not a submodule: its parameters are the classifier's
        self.p_range = p_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self._defense[0]
        return self.classifier(_BPDAIdentity.apply(x, lambda z: d.reconstruct(z, self.p_range)))


@dataclass
class MENetOptions:
    """Matrix estimation at inference: keep probability of each pixel, and the share of singular
    values kept."""

    p: float = 0.5
    rank_fraction: float = 0.8

    def validate(self, where: str) -> None:
        for key in ("p", "rank_fraction"):
            require(0 < getattr(self, key) <= 1, subkey(where, key), f"must be in (0, 1], got {getattr(self, key)}")


@dataclass
class MENetTrain(TrainConfig):
    method: Literal["natural", "at"] = "natural"
    epochs: int = 200
    batch_size: int = 256
    lr: float = 0.1
    weight_decay: float = 1e-4
    schedule: Literal["onecycle", "step", "constant"] = "step"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # epochs 100 and 150 of 200
    attack_steps: int = 7
    init: Literal["scratch", "target"] = "scratch"
    p_low: float = 0.4
    p_high: float = 0.6
    ceil_bug: bool = False  # the official code's bug: every training mask uses p_high
    eval_n: int | None = None

    def validate(self, where: str = "train") -> None:
        super().validate(where)
        require(self.method in ("natural", "at"), subkey(where, "method"), "must be 'natural' or 'at' for ME-Net")
        require(0 < self.p_low <= self.p_high <= 1, subkey(where, "p_low"), "need 0 < p_low <= p_high <= 1")
        require(self.init in ("scratch", "target"), subkey(where, "init"), "must be 'scratch' or 'target'")


@DEFENSES.register("menet", paper="Yang et al., ICML 2019",
                   description="ME-Net: random pixel masks + USVT; classifier retrained on ME images (naturally)")
class MENet(Defense):
    stochastic = True
    differentiable = False  # SVD under no_grad: BPDA with the identity by default
    exact_gradient = True  # purify_exact: through the SVD, with the draw's mask
    trainable = True
    data_parallel = True
    TrainConfig = MENetTrain
    data_shape_options = ()
    default_method = "natural"

    Options = MENetOptions

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = self.read_options(options)
        self.p, self.rank_fraction = self.options.p, self.options.rank_fraction

    def attach_classifier(self, classifier: nn.Module) -> None:
        self.own_classifier = fresh_copy(classifier)

    def reconstruct(self, x: torch.Tensor, p: float | tuple[float, float], exact: bool = False) -> torch.Tensor:
        b, _, h, w = x.shape
        gen = self._gen(x.device)
        if isinstance(p, tuple):  # per-image keep probability in [p_low, p_high]
            lo, hi = p
            prob = lo + (hi - lo) * torch.rand(b, 1, 1, 1, device=x.device, generator=gen)
        else:
            prob = torch.full((b, 1, 1, 1), float(p), device=x.device)
        keep = torch.rand(b, 1, h, w, device=x.device, generator=gen) < prob
        rank = max(1, int(self.rank_fraction * min(h, x.shape[1] * w)))
        return usvt(x, keep, rank, exact=exact)

    def purify(self, x: torch.Tensor, masks=None) -> torch.Tensor:
        return self.reconstruct(x, self.p)

    def purify_exact(self, x: torch.Tensor, masks=None) -> torch.Tensor:
        return self.reconstruct(x, self.p, exact=True)

    def fit(self, classifier, train, context: TrainContext, config: MENetTrain | None = None) -> FitResult:
        device, seed = context.device, context.seed
        cfg = config or MENetTrain(method=self.default_method)
        if self.own_classifier is None:
            self.attach_classifier(classifier)
        clf = self.own_classifier
        if cfg.init == "scratch":
            reinitialise(clf)
        for q in clf.parameters():
            q.requires_grad_(True)
        self.seed(seed, device)
        p_range = (cfg.p_high, cfg.p_high) if cfg.ceil_bug else (cfg.p_low, cfg.p_high)
        wrapped = MEClassifier(self, clf, p_range).to(device)
        t0 = time.perf_counter()
        # bf16 autocast and channels_last off: the SVD runs in fp32 and the wrapper is not a plain CNN
        result = train_classifier(wrapped, train, replace(cfg, bf16=False, channels_last=False), device,
                                  desc=f"ME-Net ({cfg.method})", checkpoint=context.checkpoint,
                                  on_epoch=context.on_epoch, gens={"menet": self.generator},
                                  ddp=distributed.active())
        for q in clf.parameters():
            q.requires_grad_(False)
        clf.eval()
        return FitResult(seconds=time.perf_counter() - t0, seconds_per_epoch=result.seconds_per_epoch,
                         epochs=cfg.epochs, history=result.history)


@dataclass
class MENetATrain(MENetTrain):
    method: Literal["natural", "at"] = "at"
    milestones: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # epochs 50/100/150 of 200


@DEFENSES.register("menet-a", paper="Yang et al., ICML 2019",
                   description="ME-Net-A: ME-Net whose classifier is adversarially trained (BPDA-PGD-7 through ME)")
class MENetA(MENet):
    TrainConfig = MENetATrain
    default_method = "at"
