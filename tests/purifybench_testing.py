"""Test-only components: a small trainable denoiser and deliberately broken attacks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Attack
from attacks.pgd import pgd_linf
from benchmark.errors import BenchError
from benchmark.registry import DEFENSES
from defenses.base import Defense, FitResult


def menet_matrix(name: str, n: int, batch_size: int, checks_n: int) -> dict:
    """A small run config (digits, an AT target, none and ME-Net, clean/PGD/EOT-PGD) for the tests that
    compare one process with several (torchrun, cluster workers)."""
    return {
        "name": name, "profile": "smoke", "seed": 0, "device": "cpu",
        "datasets": [{"name": "digits", "n_train": 512, "options": {"size": 16}}],
        "threat": {"eps": 0.1, "step_size": 0.025},
        "eval": {"n": n, "batch_size": batch_size,
                 "checks": {"n": checks_n, "steps": 2, "more_steps": 4, "eps_multipliers": [4.0],
                            "square_queries": 20, "eot": 1, "repeats": 2}},
        "targets": [{"name": "at", "arch": "small-cnn",
                     "train": {"method": "at", "epochs": 1, "batch_size": 64, "lr": 0.05, "augment": False,
                               "eps": 0.1, "step_size": 0.025, "attack_steps": 1, "progress": False}}],
        "defenses": [{"name": "none"},
                     {"name": "ME-Net", "defense": "menet",
                      "train": {"epochs": 1, "batch_size": 64, "lr": 0.01, "init": "target", "augment": False,
                                "eps": 0.1, "step_size": 0.025}}],
        "attacks": [{"name": "clean"}, {"name": "pgd", "params": {"steps": 3, "step_size": 0.025}},
                    {"name": "eot-pgd", "params": {"steps": 2, "step_size": 0.025, "eot": 2}}],
    }


@dataclass
class TinyTrain:
    epochs: int = 1
    lr: float = 1e-3
    eps: float = 0.1


class TinyDenoiser(Defense):
    """A residual two-layer conv denoiser trained with MSE on PGD pairs (only for tests)."""

    trainable = True
    TrainConfig = TinyTrain

    def __init__(self, width: int = 8, channels: int = 1) -> None:
        super().__init__()
        self._config = {"width": width, "channels": channels}
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, channels, 3, padding=1))

    def purify(self, x, masks=None):
        return (x + self.body(x)).clamp(0, 1)

    def fit(self, classifier, train, context, config=None):
        cfg = config or TinyTrain()
        torch.manual_seed(context.seed)
        opt = torch.optim.Adam(self.parameters(), lr=cfg.lr)
        self.train()
        for _ in range(cfg.epochs):
            for x, y in train.to(context.device).batches(128, shuffle=True):
                x_adv = pgd_linf(classifier, x, y, eps=cfg.eps, step_size=cfg.eps / 4, steps=2)
                loss = F.mse_loss(self.purify(x_adv), x)
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.eval()
        return FitResult(seconds=0.0, epochs=cfg.epochs)


SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


class Quantize(Defense):
    """Rounds pixels to 4 levels: numerically non-differentiable (zero gradient)."""

    differentiable = False

    def purify(self, x, masks=None):
        return torch.round(x * 3) / 3


class DivergingDenoiser(TinyDenoiser):
    """Its training always fails the way a diverged training does (only for tests)."""

    def fit(self, classifier, train, context, config=None):
        raise BenchError("test-diverging training diverged in epoch 1 (loss nan)")


class OldSignature(TinyDenoiser):
    """A plugin written before the training context: ``fit(classifier, train, device, config, seed)``."""

    def fit(self, classifier, train, device, config=None, seed=0):
        raise AssertionError("never called: the config is refused first")


class Exploding(Defense):
    """Its purification raises an unexpected error, as a device-only bug would (only for tests)."""

    def purify(self, x, masks=None):
        raise RuntimeError("boom: an unexpected error in purify\nsecond line of the message")


if "test-denoiser" not in DEFENSES:
    DEFENSES.add("test-denoiser", TinyDenoiser, description="test-only trainable denoiser")
if "test-diverging" not in DEFENSES:
    DEFENSES.add("test-diverging", DivergingDenoiser, description="test-only: training always diverges")
if "test-old-fit" not in DEFENSES:
    DEFENSES.add("test-old-fit", OldSignature, description="test-only: the fit signature before TrainContext")
if "test-exploding" not in DEFENSES:
    DEFENSES.add("test-exploding", Exploding, description="test-only: purification always raises")


class LeavesTheBall(Attack):
    def run(self, model, x, y, threat, generator):
        return (x + 2 * threat.eps).clamp(0, 1)


class LeavesTheRange(Attack):
    def run(self, model, x, y, threat, generator):
        return x + threat.eps  # inside the ball, but above 1 for bright pixels


class NoisePurifier(Defense):
    """Adds Gaussian noise (std ``sigma``) and clips: a defense whose only "robustness" is input
    noise (only for tests: the review's probe of composite attacks and early exits)."""

    stochastic = True

    def __init__(self, sigma: float = 0.15) -> None:
        super().__init__()
        self.sigma = sigma

    def purify(self, x, masks=None):
        noise = torch.randn(x.shape, generator=self._gen(x.device), device=x.device)
        return (x + self.sigma * noise).clamp(0, 1)


class MaskedNoise(NoisePurifier):
    """NoisePurifier whose noise is a mask an attacker can draw and fix (``uses_masks``)."""

    uses_masks = True

    def sample_masks(self, x):
        return torch.randn(x.shape, generator=self._gen(x.device), device=x.device)

    def purify(self, x, masks=None):
        noise = self.sample_masks(x) if masks is None else masks
        return (x + self.sigma * noise).clamp(0, 1)


class SecretlyRandom(NoisePurifier):
    """Random at inference but declares ``stochastic = False``: the plugin mistake the determinism
    check exists for (only for tests)."""

    stochastic = False
if "test-secretly-random" not in DEFENSES:
    DEFENSES.add("test-secretly-random", SecretlyRandom,
                 description="test-only: random at inference, declares stochastic = False")
