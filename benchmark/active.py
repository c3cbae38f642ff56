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
   suite's all-draws rule for "not robust"). One attack runs on every sample at once
   (:class:`BinarizedModel`: each input is read out by the readout of the test image whose ball
   holds it; images whose balls could share an input go to separate runs), as fast as a cell.
5. How easy the test is (the reference's "random ASR" check): ``random_points`` points drawn
   uniformly from the whole ball, and the share the binarized model already puts in class 1.

The outcome is the attack success rate over the valid samples with its Wilson interval, and a
verdict: ``fail`` when the rate is significantly below ``threshold`` (0.95; one-sided exact binomial
test at ``alpha``), ``pass`` otherwise, ``untestable`` when no readout was valid. The reference
code prints the rate and decides nothing. Other departures, named: the features of a stochastic
row enter as separate draws, not averaged (the reference's repeated inference); the boundary point
is built with one coordinate exactly at eps rather than rescaled noise; the readout's logits keep
no offset.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from attacks.base import Attack, Threat
from benchmark.config import require, subkey
from benchmark.errors import BenchError
from benchmark.records import Typed
from benchmark.stats import wilson_interval
from defenses.base import DefendedModel

# The success rate a passing attack reaches. The reference code prints the rate and decides nothing;
# 0.95 is the threshold a reproducibility report of the paper states (the paper's own text could not
# be checked here). A perfect attack scores 1 by construction; the row fails only when its rate is
# significantly below this (one-sided exact binomial test), so a few misses on a small n do not.
THRESHOLD = 0.95
ATTACKS_FOR_IT = ("pgd", "eot-pgd", "bpda-eot", "adaptive")  # label-loss gradient attacks on the whole model
# ... that a config may name (``auto`` picks among the first). Not VNI-FGSM: its neighbours reach
# 1.5 eps beyond its iterate, outside the ball every input must lie in.
NAMED_ATTACKS = ("mi-fgsm",)
EASY = 0.5  # a pass where random points of the ball already cross this often is inconclusive


@dataclass
class ActiveSpec(Typed):
    """The test's sizes. The reference's CIFAR-10 case studies use 999 inner points, one boundary
    point, an inner gap of 0.05 and a closeness of 0.999; ``n``: test images (the first n of the
    row's evaluation subset); ``attack``: a name from the config's ``attacks`` or ``auto`` (the row's
    strongest gradient attack, :func:`benchmark.runner.active_attack`); ``threshold``: the success
    rate a passing attack reaches (a row fails when its rate is significantly below it, one-sided
    exact binomial test at ``alpha``)."""

    n: int = 64
    inner_points: int = 999
    inner_gap: float = 0.05
    closeness: float = 0.999
    feature_draws: int = 1
    rescale: bool = True
    max_iter: int = 1000  # the logistic regression's (the reference: at least 1000)
    attack: str = "auto"
    # points drawn uniformly from the whole eps-ball per sample, classified by the binarized model: the
    # share in class 1 says how easy the test is (the reference's "random ASR" check); 0: not drawn
    random_points: int = 200
    threshold: float = THRESHOLD
    alpha: float = 0.05
    seed: int = 0

    def validate(self, where: str = "active") -> None:
        for key in ("n", "inner_points", "feature_draws", "max_iter"):
            require(getattr(self, key) >= 1, subkey(where, key), f"must be >= 1, got {getattr(self, key)}")
        require(self.random_points >= 0, subkey(where, "random_points"), f"must be >= 0, got {self.random_points}")
        require(0 < self.inner_gap < 1, subkey(where, "inner_gap"), f"must be in (0, 1), got {self.inner_gap}")
        require(0 <= self.closeness < 1, subkey(where, "closeness"), f"must be in [0, 1), got {self.closeness}")
        require(0 < self.threshold <= 1, subkey(where, "threshold"), f"must be in (0, 1], got {self.threshold}")
        require(0 < self.alpha < 1, subkey(where, "alpha"), f"must be in (0, 1), got {self.alpha}")


NOT_SEPARABLE = "not linearly separable"
NOT_KEPT = "on fresh passes"
SHORT_REASONS = ((NOT_SEPARABLE, "features not separable"), (NOT_KEPT, "readout not kept on fresh draws"))


@dataclass
class SampleOutcome(Typed):
    """One test image: whether its readout was valid (and why not), whether the attack found the
    constructed adversarial example, and the readout's checks."""

    index: int
    valid: bool
    reason: str = ""
    success: bool | None = None  # None: not attacked (invalid readout)
    boundary_margin: float | None = None  # logit margin of the boundary point after the move
    checks: dict = field(default_factory=dict)


@dataclass
class ActiveResult(Typed):
    """A row's binarization test: every sample's outcome, the attack that ran (``attack``: its name
    in the config, ``params`` what it ran with) and the pass threshold it is held to."""

    attack: str
    samples: list[SampleOutcome]
    params: dict = field(default_factory=dict)
    threshold: float = THRESHOLD
    alpha: float = 0.05
    seconds: float = 0.0
    forwards: int = 0
    backwards: int = 0
    error: str | None = None  # the test itself failed to run (the row's other checks stand)

    NESTED = {"samples": (list, SampleOutcome)}

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

    @property
    def random_rate(self) -> float | None:
        """The mean share of random points of the eps-ball in class 1 over the valid samples (how
        often no attack at all would succeed; None when not drawn)."""
        rates = [s.checks["random_class_1"] for s in self.valid if "random_class_1" in s.checks]
        return sum(rates) / len(rates) if rates else None

    @property
    def p_value(self) -> float | None:
        """One-sided exact binomial p-value of "the attack's success rate is below ``threshold``"
        (None without a valid sample)."""
        if not self.valid:
            return None
        from scipy.stats import binomtest

        return float(binomtest(self.successes, len(self.valid), self.threshold, alternative="less").pvalue)

    @property
    def testable(self) -> bool:
        return bool(self.valid)

    @property
    def failed(self) -> bool:
        """The attack found significantly fewer of the constructed examples than a passing one."""
        p = self.p_value
        return p is not None and p < self.alpha

    @property
    def verdict(self) -> str:
        """``fail``; ``pass``; ``inconclusive``: a pass that means little (too few valid samples for
        any result to fail, or random points of the ball already cross at least ``EASY`` of the
        time); ``untestable``: no valid readout; ``error``: the test did not run."""
        if self.error:
            return "error"
        if not self.testable:
            return "untestable"
        if self.failed:
            return "fail"
        from scipy.stats import binom

        random = self.random_rate
        if float(binom.cdf(0, len(self.valid), self.threshold)) >= self.alpha or (random is not None and random >= EASY):
            return "inconclusive"
        return "pass"

    def reasons(self) -> dict[str, int]:
        """Why samples were invalid, in short (each sample's full reason is in its outcome), with counts."""
        out: dict[str, int] = {}
        for s in self.samples:
            if not s.valid:
                key = next((short for part, short in SHORT_REASONS if part in s.reason), s.reason)
                out[key] = out.get(key, 0) + 1
        return out

    def summary(self) -> dict:
        lo, hi = self.interval()
        return {"attack": self.attack, "n": len(self.samples), "valid": len(self.valid), "invalid": self.n_invalid,
                "successes": self.successes, "success_rate": self.success_rate, "interval": [lo, hi],
                "p_value": self.p_value, "verdict": self.verdict, "random_rate": self.random_rate, "error": self.error}


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
def row_features(defended: DefendedModel, images: torch.Tensor, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, logits) of the row's classifier on the purified ``images``, one draw
    of the defense's randomness per image; a defense with several chains gives their mean
    (``batch_size`` purified images per pass, the chains included)."""
    chains = int(getattr(defended.defense, "chains", 1) or 1)
    per_pass = max(1, batch_size // chains)
    feats, logits = [], []
    for start in range(0, len(images), per_pass):
        part = images[start:start + per_pass]
        purified = defended.purify(part.repeat_interleave(chains, dim=0) if chains > 1 else part)
        f = defended.classifier.features(purified)
        z = defended.classifier(purified)
        feats.append(f.float().view(len(part), chains, -1).mean(1))
        logits.append(z.float().view(len(part), chains, -1).mean(1))
    return torch.cat(feats), torch.cat(logits)


class BinarizedClassifier(nn.Module):
    """A classifier's penultimate features followed by a two-class linear readout per test image
    (``weight`` (m, 2, d), ``bias`` (m, 2)): image j of a batch is read out by readout ``rows[j]``,
    which :class:`BinarizedModel` sets from the inputs before they are purified."""

    def __init__(self, classifier: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())
        self.rows: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.classifier.features(x).float()
        rows = self.rows
        if rows is None or len(f) % len(rows):
            raise RuntimeError("a binarized classifier reads out only inputs its model has matched to test images")
        rows = rows.repeat_interleave(len(f) // len(rows))  # the chains of a multi-chain purifier
        return torch.einsum("bd,bkd->bk", f, self.weight[rows]) + self.bias[rows]


class BinarizedModel(DefendedModel):
    """The row's defended model with its classifier's head replaced by the readouts of several test
    images: each input is read out by the readout of the test image whose eps-ball holds it (the
    images' balls are disjoint, so an attack on all of them at once is an attack on each: whatever
    the attack subsets, repeats or reorders)."""

    def __init__(self, defended: DefendedModel, centres: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 eps: float) -> None:
        device = centres.device
        super().__init__(defended.defense, BinarizedClassifier(defended.classifier, weight.to(device),
                                                               bias.to(device)), bpda=defended.bpda)
        self.exact = defended.exact
        self.register_buffer("centres", centres.flatten(1).float())
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        near, rows = torch.cdist(x.detach().float().flatten(1), self.centres, p=float("inf")).min(1)  # L-inf
        if bool((near > self.eps + MATCH_TOLERANCE).any()):
            raise RuntimeError(f"an input lies outside every test image's eps-ball (L-inf distance "
                               f"{float(near.max()):.4g} > eps {self.eps:g})")
        self.classifier.rows = rows
        try:
            return super().forward(x)
        finally:
            self.classifier.rows = None


MATCH_TOLERANCE = 0.01  # above eps when matching inputs to test images (inputs in bf16 round to 2^-9)


def disjoint_groups(centres: torch.Tensor, eps: float) -> list[list[int]]:
    """``centres`` split (greedily, in order) into groups whose eps-balls are far apart (L-inf
    distance above 2 eps plus the matching tolerance): each group can be attacked at once."""
    flat = centres.flatten(1).float()
    apart = torch.cdist(flat, flat, p=float("inf")) > 2 * (eps + MATCH_TOLERANCE)
    groups: list[list[int]] = []
    for i in range(len(flat)):
        for g in groups:
            if bool(apart[i, g].all()):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


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
        return f"the readout misclassifies {wrong} of its {len(labels)} training rows ({NOT_SEPARABLE})"
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


def scoring_predictions(model, images: torch.Tensor, draws: int, random: bool, seed: int) -> torch.Tensor:
    """Predictions (len(images), draws) of ``images`` as the harness scores them (its judge: each draw
    a pass with the defense reseeded for it, the attack's streams untouched)."""
    from attacks.core import Judge

    labels = torch.zeros(len(images), dtype=torch.long, device=images.device)
    return Judge(model, images, labels, draws=draws, random=random, batch_seed=seed).predictions(images)


def binarization_test(defended: DefendedModel, images: torch.Tensor, attack: Attack, threat: Threat,
                      spec: ActiveSpec, *, name: str = "attack", draws: int = 1, engine=None,
                      batch_size: int | str = 500) -> ActiveResult:
    """The test on the first ``spec.n`` of ``images`` (in [0, 1], on the model's device) with
    ``attack`` under ``threat`` (L-inf); ``draws``: the scoring draws of a stochastic row. The
    readouts are fitted one image at a time; their checks and the attack run on every image at once
    (:class:`BinarizedModel`; images whose balls overlap in separate runs)."""
    from benchmark.harness import run_attack

    spec.validate()
    if threat.norm != "linf":
        raise BenchError(f"the binarization test is implemented for linf, got {threat.norm}")
    t0, passes = time.perf_counter(), {"forwards": 0, "backwards": 0}
    device = images.device
    stochastic = bool(getattr(defended, "stochastic", False))
    reps = spec.feature_draws if stochastic else 1
    fresh = draws if stochastic else 1  # the passes that score an image (one for a deterministic row)
    xs = images[: spec.n]
    samples = [SampleOutcome(i, valid=False) for i in range(len(xs))]
    edges, readouts = {}, {}
    for i, x in enumerate(xs):
        gen = torch.Generator(device=device).manual_seed(spec.seed * 1_000_003 + i)
        defended.defense.seed(spec.seed * 1_000_003 + i, device)
        inner = inner_points(x, threat.eps, spec.inner_gap, spec.inner_points, gen)
        edges[i] = boundary_point(x, threat.eps, gen)
        points = torch.cat([inner, edges[i][None]])  # one pass: identical images give identical features
        # a random row: ``reps`` copies in one batch, each image drawing its own randomness
        f, z = row_features(defended, points.repeat(reps, *[1] * (points.dim() - 1)))
        passes["forwards"] += len(points) * reps
        is_edge = torch.arange(len(f)) % len(points) == len(points) - 1
        fitted = fit_readout(f[~is_edge], f[is_edge], z[~is_edge], z[is_edge], spec)
        if isinstance(fitted, str):
            samples[i].reason = fitted
            continue
        readouts[i] = fitted
        w = fitted[0][1] - fitted[0][0]
        samples[i].boundary_margin = float((f[is_edge].to(w.device) @ w + fitted[1][1] - fitted[1][0]).min())
    fitted_ids = list(readouts)
    for group in disjoint_groups(xs[fitted_ids], threat.eps) if readouts else []:
        ids = [fitted_ids[g] for g in group]
        model = BinarizedModel(defended, xs[ids], torch.stack([readouts[i][0] for i in ids]),
                               torch.stack([readouts[i][1] for i in ids]), threat.eps)
        # The readouts' checks on fresh passes (a stochastic row: ``draws`` fresh draws of its
        # randomness, as the attack is scored): x must be class 0 in every one of them (under the
        # suite's scoring one draw in class 1 makes an image adversarial: x itself would count as
        # found) and the boundary point class 1 in most, or the adversarial example the test promises
        # does not exist for the defended model (a readout fitted on some draws that fresh draws do
        # not follow): such a sample is invalid, not a miss.
        both = torch.cat([xs[ids], torch.stack([edges[i] for i in ids])])
        votes = scoring_predictions(model, both, fresh, stochastic, spec.seed).T.cpu()  # (fresh, 2 * len(ids))
        passes["forwards"] += len(both) * fresh
        attacked = []
        for j, i in enumerate(ids):
            checks = {"x_class_0": int((votes[:, j] == 0).sum()),
                      "boundary_class_1": int((votes[:, len(ids) + j] == 1).sum()), "passes": fresh}
            samples[i].checks = checks
            if checks["x_class_0"] < fresh or 2 * checks["boundary_class_1"] <= fresh:
                samples[i].reason = (
                    f"{NOT_KEPT} the readout put x in class 0 {checks['x_class_0']} and the boundary point in "
                    f"class 1 {checks['boundary_class_1']} of {fresh} times (the constructed example does not hold)")
            else:
                attacked.append(i)
        if not attacked:
            continue
        if spec.random_points:  # how easy the test is: random points of the ball in class 1, scored as
            # the attack is (a random row: in class 1 under at least one of the ``fresh`` draws)
            gen = torch.Generator(device=device).manual_seed(spec.seed)
            for i in attacked:
                crossed = 0
                for start in range(0, spec.random_points, 1024):
                    k = min(1024, spec.random_points - start)
                    noise = (torch.rand((k, *xs.shape[1:]), generator=gen, device=device) * 2 - 1) * threat.eps
                    preds = scoring_predictions(model, (xs[i] + noise).clamp(0, 1), fresh, stochastic, spec.seed)
                    crossed += int((preds == 1).any(1).sum())
                    passes["forwards"] += k * fresh
                samples[i].checks["random_class_1"] = crossed / spec.random_points
        outcome = run_attack(attack, model, xs[attacked], torch.zeros(len(attacked), dtype=torch.long, device=device),
                             threat, batch_size=batch_size, seed=spec.seed, name=name, draws=fresh, engine=engine)
        passes["forwards"] += outcome.forwards
        passes["backwards"] += outcome.backwards
        for j, i in enumerate(attacked):
            samples[i].valid, samples[i].success = True, not bool(outcome.correct[j])
    return ActiveResult(attack=name, samples=samples, params=attack.describe(), threshold=spec.threshold,
                        alpha=spec.alpha, seconds=time.perf_counter() - t0, **passes)
