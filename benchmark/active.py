"""An evaluation that tests its own attack: the decision-boundary binarization test.

Zimmermann, Brendel, Tramèr and Carlini, *Increasing Confidence in Adversarial Robustness
Evaluations* (NeurIPS 2022; reference implementation ``active_tests/decision_boundary_binarization.py``
of google-research/active-adversarial-tests). Around a test image ``x`` it builds a two-class problem
on the defended model's own features in which an adversarial example inside the threat ball exists
by construction, then runs the row's attack on it. An attack that misses the example it is
guaranteed to exist is too weak for that defense, whatever the accuracy table says.

Per test image (L-inf, radius eps):

1. ``inner_points`` images drawn uniformly from the cube of radius ``(1 - inner_gap) * eps``
   around ``x`` (clipped to [0, 1]), plus ``x`` itself: class 0; one *boundary point* at L-inf
   distance exactly eps: class 1. The reference draws uniform noise and rescales it onto the
   sphere through the clipping; here one coordinate (the noise's largest) is set to exactly eps in
   the direction that stays inside [0, 1], the others keep their uniform noise within eps.
2. Their features: the row's classifier's penultimate features of the *purified* images (the
   defended model's own representation). A defense that purifies along several chains (EBM) gives
   the chains' mean; a stochastic defense gives ``feature_draws`` independent draws per point, each
   a training row of its own (the reference's repeated inference, not an average).
3. A linear readout fitted on them (scikit-learn's unpenalised logistic regression, as the
   reference's ``sklearn`` path): valid only if it classifies every training row correctly and, on
   fresh passes of the binarized model (for a stochastic row, the row's scoring draws), puts ``x``
   in class 0 and the boundary point in class 1 in most of them (a departure: the reference only
   records such validation; without it, a readout fitted on some draws of a strongly random
   defense promises an example that fresh draws do not honour: measured on the smoke ME-Net, the
   boundary point was class 1 on a fresh pass for 0 of 16 samples). A sample that fails either is
   counted (``invalid``, with the reason) and skipped, as the reference skips unfittable ones.
   Its decision boundary is then moved towards the boundary point (``closeness``: the boundary
   point keeps ``1 - closeness`` of its logit margin) and its two logits rescaled to the range of
   the original classifier's logits on the same points (the reference's ``adaptive`` rescaling,
   without its offset, which adds the same number to both logits and changes no prediction).
4. The binarized model: the row's defense, its classifier's feature extractor, the readout as the
   head. The row's attack runs on it from ``x`` (label 0), with the row's BPDA or exact-gradient
   setting and its EOT; the attack *succeeds* on a sample if the image it returns is classified 1
   under the suite's scoring (for a stochastic row: by at least one of the scoring draws, the
   suite's all-draws rule for "not robust").

The outcome is the attack success rate over the valid samples with its Wilson interval. The
reference prints the rate and sets no threshold; this module reports the rate and its interval,
and the caller decides what counts as a failed test.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from attacks.base import Attack, Threat
from benchmark.config import require, subkey
from benchmark.errors import BenchError
from benchmark.stats import wilson_interval
from defenses.base import DefendedModel


@dataclass
class ActiveSpec:
    """The test's sizes. The reference's CIFAR-10 case studies use 999 inner points, one boundary
    point, an inner gap of 0.05 and a closeness of 0.999; ``n``: test images."""

    n: int = 64
    inner_points: int = 999
    inner_gap: float = 0.05
    closeness: float = 0.999
    feature_draws: int = 1
    rescale: bool = True
    max_iter: int = 1000  # the logistic regression's (the reference: at least 1000)
    seed: int = 0

    def validate(self, where: str = "active") -> None:
        for key in ("n", "inner_points", "feature_draws", "max_iter"):
            require(getattr(self, key) >= 1, subkey(where, key), f"must be >= 1, got {getattr(self, key)}")
        require(0 < self.inner_gap < 1, subkey(where, "inner_gap"), f"must be in (0, 1), got {self.inner_gap}")
        require(0 <= self.closeness < 1, subkey(where, "closeness"), f"must be in [0, 1), got {self.closeness}")


@dataclass
class SampleOutcome:
    """One test image: whether its readout was valid (and why not), whether the attack found the
    constructed adversarial example, and the readout's checks."""

    index: int
    valid: bool
    reason: str = ""
    success: bool | None = None  # None: not attacked (invalid readout)
    boundary_margin: float | None = None  # logit margin of the boundary point after the move
    checks: dict = field(default_factory=dict)


@dataclass
class ActiveResult:
    attack: str
    samples: list[SampleOutcome]

    @property
    def valid(self) -> list[SampleOutcome]:
        return [s for s in self.samples if s.valid]

    @property
    def n_invalid(self) -> int:
        return len(self.samples) - len(self.valid)

    @property
    def successes(self) -> int:
        return sum(bool(s.success) for s in self.valid)

    @property
    def success_rate(self) -> float | None:
        return self.successes / len(self.valid) if self.valid else None

    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.successes, len(self.valid))

    def summary(self) -> dict:
        lo, hi = self.interval()
        return {"attack": self.attack, "n": len(self.samples), "valid": len(self.valid), "invalid": self.n_invalid,
                "successes": self.successes, "success_rate": self.success_rate, "interval": [lo, hi]}


# ----------------------------------------------------------------------------- the binary problem
def inner_points(x: torch.Tensor, eps: float, gap: float, k: int, gen: torch.Generator) -> torch.Tensor:
    """``x`` and ``k`` images drawn uniformly from the L-inf cube of radius ``(1 - gap) * eps``
    around it, clipped to [0, 1]: (k + 1, *x.shape), ``x`` first."""
    noise = torch.rand((k, *x.shape), generator=gen, device=x.device) * 2 - 1
    return torch.cat([x[None], (x + noise * (1 - gap) * eps).clamp(0, 1)])


def boundary_point(x: torch.Tensor, eps: float, gen: torch.Generator) -> torch.Tensor:
    """An image at L-inf distance exactly ``eps`` from ``x`` inside [0, 1]: uniform noise within
    eps, its largest coordinate set to eps in a direction that stays inside [0, 1]."""
    if not 0 < eps <= 0.5:
        raise BenchError(f"the binarization test needs 0 < eps <= 0.5 (L-inf), got {eps}")
    flat = x.flatten()
    noise = (torch.rand(flat.shape, generator=gen, device=x.device) * 2 - 1) * eps
    j = int(noise.abs().argmax())
    sign = 1.0 if float(noise[j]) >= 0 else -1.0
    if not 0.0 <= float(flat[j]) + sign * eps <= 1.0:
        sign = -sign  # eps <= 0.5: one of the two directions fits
    point = (flat + noise).clamp(0, 1)
    point[j] = flat[j] + sign * eps
    return point.view_as(x)


@torch.no_grad()
def row_features(defended: DefendedModel, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, logits) of the row's classifier on the purified ``images``, one draw
    of the defense's randomness; a defense with several chains gives their mean."""
    chains = int(getattr(defended.defense, "chains", 1) or 1)
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        part = images[start:start + batch_size]
        purified = defended.purify(part.repeat_interleave(chains, dim=0) if chains > 1 else part)
        f = defended.classifier.features(purified)
        z = defended.classifier(purified)
        feats.append(f.float().view(len(part), chains, -1).mean(1))
        logits.append(z.float().view(len(part), chains, -1).mean(1))
    return torch.cat(feats), torch.cat(logits)


class BinarizedClassifier(nn.Module):
    """A classifier's penultimate features followed by a two-class linear readout."""

    def __init__(self, classifier: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.classifier = classifier
        self.readout = nn.Linear(weight.shape[1], 2)
        with torch.no_grad():
            self.readout.weight.copy_(weight)
            self.readout.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.classifier.features(x).to(self.readout.weight.dtype))


def fit_readout(inner: torch.Tensor, boundary: torch.Tensor, inner_logits: torch.Tensor,
                boundary_logits: torch.Tensor, spec: ActiveSpec) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The readout's (weight (2, d), bias (2,)) separating ``inner`` features (class 0) from
    ``boundary`` ones (class 1), its boundary moved and its logits rescaled; or why it is not valid."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    feats = torch.cat([inner, boundary]).double().cpu().numpy()
    labels = np.r_[np.zeros(len(inner), dtype=int), np.ones(len(boundary), dtype=int)]
    # Fitted on standardised features (the features of images this close differ in their last
    # digits; the optimiser needs them on one scale), then folded back into a readout of the raw ones.
    # A coordinate that varies by less than float noise (relative to the features' scale) carries
    # nothing: it is left out rather than blown up by the standardisation.
    mean, std = feats.mean(0), feats.std(0)
    std[std <= 1e-6 * max(float(np.abs(feats).max()), 1e-12)] = np.inf
    with warnings.catch_warnings():  # separable data: the unpenalised optimum is at infinity
        warnings.simplefilter("ignore", ConvergenceWarning)
        # C this large: unpenalised (the reference's penalty None, spelled so that every scikit-learn takes it)
        model = LogisticRegression(C=1e12, max_iter=spec.max_iter).fit((feats - mean) / std, labels)
    w = torch.as_tensor(model.coef_[0] / std, dtype=torch.float64)
    b = float(model.intercept_[0] - (model.coef_[0] * mean / std).sum())
    margin = torch.as_tensor(feats, dtype=torch.float64) @ w + b  # logit of class 1 minus class 0
    wrong = int(((margin > 0).numpy().astype(int) != labels).sum())
    if wrong:
        return f"the readout misclassifies {wrong} of its {len(labels)} training rows (not linearly separable)"
    b -= spec.closeness * float(margin[len(inner):].min())  # the boundary point keeps 1 - closeness of its margin
    weight, bias = torch.stack([-w / 2, w / 2]), torch.tensor([-b / 2, b / 2], dtype=torch.float64)
    if spec.rescale:  # the two logits spread like the original classifier's on the same points
        binary = torch.as_tensor(feats, dtype=torch.float64) @ weight.T + bias
        original = torch.cat([inner_logits, boundary_logits]).double().cpu()
        span = float(binary.max() - binary.min())
        if span > 0:
            scale = float(original.max() - original.min()) / span
            weight, bias = weight * scale, bias * scale
    return weight.float(), bias.float()


def binarized_model(defended: DefendedModel, weight: torch.Tensor, bias: torch.Tensor) -> DefendedModel:
    """The row's defended model with its classifier's head replaced by the readout; the same BPDA
    and exact-gradient settings."""
    device = next(defended.classifier.parameters()).device
    model = DefendedModel(defended.defense, BinarizedClassifier(defended.classifier, weight.to(device),
                                                                bias.to(device)), bpda=defended.bpda)
    model.exact = defended.exact
    return model


def binarization_test(defended: DefendedModel, images: torch.Tensor, attack: Attack, threat: Threat,
                      spec: ActiveSpec, *, name: str = "attack", draws: int = 1) -> ActiveResult:
    """The test on each of ``images`` (in [0, 1], on the model's device) with ``attack`` under
    ``threat`` (L-inf); ``draws``: the scoring draws of a stochastic row."""
    from benchmark.harness import run_attack

    spec.validate()
    if threat.norm != "linf":
        raise BenchError(f"the binarization test is implemented for linf, got {threat.norm}")
    device = images.device
    stochastic = bool(getattr(defended, "stochastic", False))
    samples = []
    for i, x in enumerate(images[: spec.n]):
        gen = torch.Generator(device=device).manual_seed(spec.seed * 1_000_003 + i)
        defended.defense.seed(spec.seed * 1_000_003 + i, device)
        inner = inner_points(x, threat.eps, spec.inner_gap, spec.inner_points, gen)
        edge = boundary_point(x, threat.eps, gen)[None]
        reps = spec.feature_draws if stochastic else 1
        points = torch.cat([inner, edge])  # one pass: identical images give identical features
        f, z = (torch.cat(parts) for parts in zip(*(row_features(defended, points) for _ in range(reps))))
        is_edge = torch.arange(len(f)) % len(points) == len(points) - 1
        fitted = fit_readout(f[~is_edge], f[is_edge], z[~is_edge], z[is_edge], spec)
        if isinstance(fitted, str):
            samples.append(SampleOutcome(i, valid=False, reason=fitted))
            continue
        weight, bias = fitted
        model = binarized_model(defended, weight, bias)
        # The readout's checks on fresh passes (a stochastic row: ``draws`` fresh draws of its
        # randomness): x must be class 0 and the boundary point class 1 in most of them, or the
        # adversarial example the test promises does not exist for the defended model (a readout
        # fitted on some draws that fresh draws do not follow): such a sample is invalid, not a miss.
        fresh = draws if stochastic else 1
        with torch.no_grad():
            votes = torch.stack([model(torch.cat([x[None], edge])).argmax(1) for _ in range(fresh)]).cpu()
            margin = float((f[is_edge].to(weight.device) @ (weight[1] - weight[0]) + bias[1] - bias[0]).min())
        checks = {"x_class_0": int((votes[:, 0] == 0).sum()), "boundary_class_1": int((votes[:, 1] == 1).sum()),
                  "passes": fresh}
        if 2 * checks["x_class_0"] <= fresh or 2 * checks["boundary_class_1"] <= fresh:
            samples.append(SampleOutcome(i, valid=False, boundary_margin=margin, checks=checks, reason=(
                f"on fresh passes the readout put x in class 0 {checks['x_class_0']} and the boundary point in "
                f"class 1 {checks['boundary_class_1']} of {fresh} times (the constructed example does not hold)")))
            continue
        outcome = run_attack(attack, model, x[None], torch.zeros(1, dtype=torch.long, device=device), threat,
                             batch_size=1, seed=spec.seed + i, name=name, draws=fresh)
        samples.append(SampleOutcome(i, valid=True, success=not bool(outcome.correct[0]), boundary_margin=margin,
                                     checks=checks))
    return ActiveResult(attack=name, samples=samples)
