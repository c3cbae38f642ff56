"""The one iterative L-inf core that every gradient attack of the suite is built on.

An iterative attack is three choices around one loop:

* the **objective**: the loss (cross-entropy, or any ``loss(logits, y)`` summed over the
  batch) of a model, and how its input gradient is estimated: one pass, or the mean over
  ``eot`` passes that each draw fresh randomness of a stochastic defense (expectation over
  transformation). BPDA, exact gradients through a purifier and fixed masks or randomness
  are switches of the defended model (``DefendedModel.gradients``, ``fixed_masks``,
  ``fixed_randomness``), not of the loop;
* the **step rule**: the signed gradient (PGD), the signed momentum of L1-normalised
  gradients (MI-FGSM), or momentum with a Nesterov look-ahead and variance tuning (VNI-FGSM);
* the **ball**: its centre (the clean image, or DIR's restored image for the representation
  attack), its radius and the start (the centre, or uniform inside the ball).

:func:`linf_attack` runs ``steps`` of ``x <- proj(x + step_size * rule(x))`` and returns the last
iterate (the training-time convention); :func:`linf_search` runs the same loop and also keeps, per
sample, the best iterate it evaluated (the highest fooling rate over the passes its gradients took:
one pass, or the ``eot`` draws of a stochastic defense), so that a sample misclassified at some
step and not at the last still counts as broken. An attack returns an :class:`AttackResult`
(its images, and candidates the harness scores beside them) or a plain tensor ("scored by fresh
passes of the defended model, centred on the clean input").

Composite attacks (restarts, ``worst-of``, BPDA-then-exact, AutoAttack) decide with the row's
scoring rule, never with one fresh pass of a random defense: the harness puts a :class:`Judge` for
each batch in context (:func:`judging`), which scores images under the same draws as the final
scoring, and :func:`run_parts` runs the parts of a composite with it (see there).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Project onto the L-inf ball of radius ``eps`` around ``x`` and then onto [0,1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def batch_noise(shape, like: torch.Tensor, generator: torch.Generator | None = None,
                normal: bool = False) -> torch.Tensor:
    """Uniform [0,1) (or standard normal) noise of ``shape`` (first dimension: the images being
    attacked), drawn as for the whole batch the harness attacks and sliced to these images' rows
    when a composite attacks only some of them (its survivors): a sample then gets the same noise,
    and the generator ends in the same state, as when the part attacks the whole batch alone."""
    draw = torch.randn if normal else torch.rand
    judge = _JUDGE.get()
    rows = getattr(judge, "idx", None)
    if rows is not None and len(rows) == shape[0]:
        full = draw((judge.parent.n, *shape[1:]), device=like.device, dtype=like.dtype, generator=generator)
        return full[rows]
    return draw(tuple(shape), device=like.device, dtype=like.dtype, generator=generator)


def uniform_start(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    noise = batch_noise(x.shape, x, generator)
    return (x + (2.0 * noise - 1.0) * eps).clamp_(0.0, 1.0)


def ce_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


def _true_and_other(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the true class's logit and the largest other logit."""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
    return true, other


def margin_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Carlini-Wagner margin, max_{i != y} z_i - z_y, summed over the batch (positive: fooled)."""
    true, other = _true_and_other(logits, y)
    return (other - true).sum()


def dlr_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The difference-of-logits ratio of Croce & Hein (2020), -(z_y - max_{i != y} z_i) /
    (z_pi1 - z_pi3), summed over the batch: the margin made invariant to the logits' scale (at
    least three classes)."""
    if logits.shape[1] < 3:
        raise ValueError("the DLR loss needs at least 3 classes")
    top = logits.sort(dim=1).values
    true, other = _true_and_other(logits, y)
    return (-(true - other) / (top[:, -1] - top[:, -3] + 1e-12)).sum()


LOSSES: dict[str, LossFn] = {"ce": ce_sum, "dlr": dlr_sum, "margin": margin_sum}


def _wrong(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """Per sample, whether the logits misclassify it; None when ``y`` are not class labels (a
    feature-space or KL objective)."""
    if logits.dim() != 2 or y.dim() != 1 or y.dtype not in (torch.int64, torch.int32) or len(y) != len(logits):
        return None
    return logits.argmax(1) != y


def input_gradient(model: Callable, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of ``loss_fn(model(x), y)`` (summed over the batch) w.r.t. ``x``; also the logits."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits.float(), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


def summed_gradients(model: Callable, inputs: list[torch.Tensor], y: torch.Tensor, loss_fn: LossFn,
                     wrong: list | None = None, logits_out: list | None = None) -> torch.Tensor:
    """Sum of the input gradients at each of ``inputs`` (same shape as each other). The engine's
    ``eot_batch`` (read from ``model``) sets how many of them share one forward pass: the inputs
    are concatenated, so a stochastic defense draws independent randomness for each copy.
    ``wrong``: a list that receives, per pass, how many of the copies misclassified each sample;
    ``logits_out``: one that receives, per pass, the logits of its copies, (copies, n, classes)."""
    per_pass = max(1, int(getattr(model, "eot_batch", 1) or 1))
    total = torch.zeros_like(inputs[0])
    for start in range(0, len(inputs), per_pass):
        chunk = inputs[start:start + per_pass]
        if len(chunk) == 1:
            grad, logits = input_gradient(model, chunk[0], y, loss_fn)
            total += grad
            labels = y
        else:
            labels = y.repeat(len(chunk))
            grad, logits = input_gradient(model, torch.cat(chunk), labels, loss_fn)
            total += grad.view(len(chunk), *inputs[0].shape).sum(0)
        if wrong is not None:
            miss = _wrong(logits, labels)
            if miss is not None:
                wrong.append(miss.view(len(chunk), -1).sum(0))
        if logits_out is not None:
            logits_out.append(logits.view(len(chunk), len(y), -1))
    return total


def eot_gradient(model: Callable, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, samples: int) -> torch.Tensor:
    """Expectation over transformation: the mean input gradient over ``samples`` forward passes
    (each draws fresh randomness from a stochastic defense)."""
    if samples == 1:
        return input_gradient(model, x, y, loss_fn)[0]
    return summed_gradients(model, [x] * samples, y, loss_fn) / samples


# ----------------------------------------------------------------------------- the objective
@dataclass
class Objective:
    """What the attack ascends: ``loss(model(x), y)``, its gradient estimated over ``eot`` passes.
    Each :meth:`gradient` also notes, in ``seen``, the point it was taken at and the fraction of its
    passes that misclassified each sample there (a free estimate of the point's fooling rate; None
    when ``y`` are not class labels)."""

    model: Callable
    y: torch.Tensor
    loss: LossFn = ce_sum
    eot: int = 1
    seen: tuple | None = None

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        wrong: list = []
        grad = summed_gradients(self.model, [x] * self.eot, self.y, self.loss, wrong)
        self.seen = (x, torch.stack(wrong).sum(0).float() / self.eot) if wrong else None
        return grad / self.eot if self.eot > 1 else grad

    def summed(self, points: list[torch.Tensor]) -> torch.Tensor:
        return summed_gradients(self.model, points, self.y, self.loss)


# ----------------------------------------------------------------------------- step rules
class SignStep:
    """PGD: the sign of the gradient."""

    def direction(self, objective: Objective, x: torch.Tensor) -> torch.Tensor:
        return objective.gradient(x).sign()


def mean_normalize(g: torch.Tensor) -> torch.Tensor:
    """``g`` divided by its per-sample mean absolute value: the L1 norm over the number of pixels,
    as the reference implementations of MI-FGSM and VNI-FGSM normalise (``reduce_mean(abs(g))``).
    For the sign of MI's momentum the two are the same; VNI's look-ahead of ``step_size * decay * g``
    needs this scale (with the L1 sum it shrinks by the number of pixels and vanishes)."""
    return g / g.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))


@dataclass
class Momentum:
    """MI-FGSM (Dong et al. 2018): g <- decay g + grad / mean|grad|; the step follows sign(g)."""

    decay: float = 1.0
    g: torch.Tensor | None = None

    def direction(self, objective: Objective, x: torch.Tensor) -> torch.Tensor:
        grad = objective.gradient(x)
        self.g = mean_normalize(grad) if self.g is None else self.decay * self.g + mean_normalize(grad)
        return self.g.sign()


@dataclass
class VarianceTuned:
    """VNI-FGSM (Wang & He 2021): momentum with a Nesterov look-ahead of ``step_size * decay * g``,
    the gradient tuned by the variance v of the gradients at ``neighbors`` uniform points within
    ``radius`` of the current iterate (v from the previous step)."""

    decay: float
    step_size: float
    neighbors: int
    radius: float
    generator: torch.Generator | None = None
    g: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def direction(self, objective: Objective, x: torch.Tensor) -> torch.Tensor:
        if self.g is None:
            self.g, self.v = torch.zeros_like(x), torch.zeros_like(x)
        grad = objective.gradient(x + self.step_size * self.decay * self.g)  # Nesterov look-ahead
        self.g = self.decay * self.g + mean_normalize(grad + self.v)
        # gradient variance around x_t: the draws in a fixed order, the passes batched by the engine
        around = [x + (batch_noise(x.shape, x, self.generator) * 2 - 1) * self.radius
                  for _ in range(self.neighbors)]
        self.v = objective.summed(around) / self.neighbors - grad
        return self.g.sign()


# ----------------------------------------------------------------------------- the loop
@dataclass
class Search:
    """What :func:`linf_search` found: the last iterate and, per sample, the evaluated iterate with
    the highest estimated fooling rate (``best``, ``rate``; None when no gradient was taken at an
    iterate itself, e.g. VNI's look-ahead, or the objective is not a classification)."""

    last: torch.Tensor
    best: torch.Tensor | None = None
    rate: torch.Tensor | None = None

    def result(self, **kwargs) -> AttackResult:
        """The last iterate, with the best one as a candidate where some iterate fooled a pass."""
        extra = [self.best] if self.best is not None and bool((self.rate > 0).any()) else []
        return AttackResult(self.last, candidates=extra, **kwargs)


def linf_search(objective: Objective, center: torch.Tensor, *, eps: float, step_size: float, steps: int,
                start: torch.Tensor | None = None, rule=None) -> Search:
    """``steps`` of ``x <- proj_{B(center, eps) & [0,1]}(x + step_size * rule.direction(x))`` from
    ``start`` (default: the centre). Every iterate the objective took its gradient at comes with the
    fraction of those passes that misclassified each sample: per sample, the iterate with the
    highest such fraction is kept (ties: the later). No pass is added for it."""
    rule = rule or SignStep()
    x = center.clone() if start is None else start
    best = rate = None
    for _ in range(steps):
        direction = rule.direction(objective, x)
        seen = objective.seen
        if seen is not None and seen[0] is x:
            if best is None:
                best, rate = x.detach().clone(), seen[1]
            else:
                better = seen[1] >= rate
                best[better], rate = x.detach()[better], torch.where(better, seen[1], rate)
        x = project_linf(x.detach() + step_size * direction, center, eps)
    return Search(x.detach(), best, rate)


def linf_attack(objective: Objective, center: torch.Tensor, *, eps: float, step_size: float, steps: int,
                start: torch.Tensor | None = None, rule=None) -> torch.Tensor:
    """:func:`linf_search`'s loop, returning the last iterate only (detached)."""
    return linf_search(objective, center, eps=eps, step_size=step_size, steps=steps, start=start, rule=rule).last


# ----------------------------------------------------------------------------- what an attack returns
@dataclass
class AttackResult:
    """Adversarial images and how the harness checks and scores them.

    ``candidates``: more images of the same batch that the attack produced (a best iterate, each
    part of a composite): the harness checks and scores each, and a sample counts as correct only
    under the per-sample worst of ``x_adv`` and its candidates, under every score (correct under
    all draws for each image; the lowest count of correct draws; a correct vote for each image).
    ``center``: the centre of the threat ball the images must lie in (default: the clean input).
    ``score``: ``score(model, x_adv) -> logits`` that the accuracy is computed from (default: a fresh
    pass of the defended model). ``random_score``: whether that scoring draws randomness (default:
    whether the defended model is stochastic). ``info``: what the attack reports (stored in the
    record, e.g. the survivors of each member of a worst-of). ``diagnostics``: other scorings of the
    same images, reported beside the cell (name -> ``score``; e.g. the masks the attacker fixed)."""

    x_adv: torch.Tensor
    candidates: list[torch.Tensor] = field(default_factory=list)
    center: torch.Tensor | None = None
    score: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    random_score: bool | None = None
    info: dict = field(default_factory=dict)
    diagnostics: dict[str, Callable[[Any, torch.Tensor], torch.Tensor]] = field(default_factory=dict)

    @property
    def images(self) -> list[torch.Tensor]:
        return [self.x_adv, *self.candidates]


def as_result(out) -> AttackResult:
    return out if isinstance(out, AttackResult) else AttackResult(out)


# ----------------------------------------------------------------------------- deciding as the harness scores
_GOLDEN = 0x9E3779B97F4A7C15


def draw_seed(batch_seed: int, draw: int) -> int:
    """The defense's seed for scoring draw ``draw`` of a batch: independent of the attack's streams,
    the same for every cell of the batch (so paired comparisons share their scoring randomness)."""
    return (batch_seed + (draw + 1) * _GOLDEN) % (2**62)


def defense_seed(batch_seed: int) -> int:
    """The seed of the defense's randomness while a batch is attacked: derived from the attack's
    seed, never equal to it (the attack's random start and the defense's noise are independent)."""
    return (batch_seed * 6364136223846793005 + 1442695040888963407) % (2**62)


def vote_correct(preds: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per sample, whether the plurality vote of the predictions (n, draws) is the true label (a tie
    with another class is not)."""
    classes = int(max(int(preds.max()), int(y.max())) + 1)
    votes = F.one_hot(preds, classes).sum(1)
    own = votes.gather(1, y.view(-1, 1)).squeeze(1)
    others = votes.scatter(1, y.view(-1, 1), -1).amax(1)
    return own > others


@dataclass
class Verdict:
    """Per sample of a batch, how images scored under the row's draws: ``counts`` correct draws
    (the lowest over the images), ``majority`` and ``single`` (the first draw) correct for every
    image, out of ``draws``."""

    counts: torch.Tensor
    majority: torch.Tensor
    single: torch.Tensor
    draws: int

    @property
    def robust(self) -> torch.Tensor:
        """Correct under every draw of every image (the headline score)."""
        return self.counts == self.draws

    @property
    def broken(self) -> torch.Tensor:
        """Wrong under every draw: no further image can lower any score of the sample."""
        return self.counts == 0

    def subset(self, idx: torch.Tensor) -> Verdict:
        return Verdict(self.counts[idx], self.majority[idx], self.single[idx], self.draws)

    @staticmethod
    def of(preds: torch.Tensor, y: torch.Tensor) -> Verdict:
        hits = preds == y.view(-1, 1)
        return Verdict(hits.sum(1), vote_correct(preds, y), hits[:, 0], preds.shape[1])

    def worst(self, other: Verdict) -> Verdict:
        """The per-sample worst of two verdicts over the same samples and draws."""
        return Verdict(torch.minimum(self.counts, other.counts), self.majority & other.majority,
                       self.single & other.single, self.draws)


class Judge:
    """Scores images of one batch as the harness scores them: ``draws`` passes of the defended model
    (fp32, without the engine's options), draw r with the defense reseeded to
    :func:`draw_seed` (batch_seed, r), so that the same images get the same verdict whenever they
    are scored. A composite attack decides with it, so that a sample is called broken only when
    the scoring will call it broken. Scoring has no side effect on the attack's randomness: the
    defense's generator and torch's are restored afterwards.

    ``restart(generator)`` puts every stream back where the batch started (the attack's generator,
    torch's global one and the defense's), so that a part of a composite computes what it computes
    alone. :meth:`restricted` gives the judge of a subset of the batch (a composite's survivors):
    its images are scored in their places in the batch, where the defense draws the same numbers
    for them."""

    def __init__(self, model, x: torch.Tensor, y: torch.Tensor, *, draws: int = 1, random: bool = False,
                 batch_seed: int = 0) -> None:
        self.model, self.x, self.y = model, x, y
        self.random = bool(random)
        self.draws = draws if self.random else 1
        self.batch_seed = batch_seed
        self.defense = getattr(model, "defense", None)

    @property
    def n(self) -> int:
        return len(self.x)

    @property
    def exact(self) -> bool:
        """One pass decides: the scoring draws no randomness."""
        return not self.random

    def _seed_defense(self, seed: int) -> None:
        if self.defense is not None and hasattr(self.defense, "seed"):
            self.defense.seed(seed, self.x.device)

    def restart(self, generator: torch.Generator | None) -> None:
        if generator is not None:
            generator.manual_seed(self.batch_seed)
        torch.manual_seed(self.batch_seed)
        self._seed_defense(defense_seed(self.batch_seed))

    def predictions(self, images: torch.Tensor, idx: torch.Tensor | None = None, *, score=None,
                    draws: int | None = None) -> torch.Tensor:
        """Predictions (len(images), draws) of ``images`` placed at rows ``idx`` of the batch
        (default: all rows), each draw a pass over the whole batch. ``score(model, x) -> logits``:
        another scoring (default: a pass of the defended model); ``draws``: override (1 for a
        scoring that draws no randomness)."""
        draws = self.draws if draws is None else draws
        batch = images if idx is None else self.x.clone().index_copy_(0, idx, images.to(self.x.dtype))
        gen = getattr(self.defense, "generator", None)
        saved = gen.get_state() if gen is not None else None
        preds = []
        with torch.no_grad(), torch.random.fork_rng(devices=[self.x.device] if self.x.device.type == "cuda" else []):
            for r in range(draws):
                self._seed_defense(draw_seed(self.batch_seed, r))
                logits = score(self.model, batch) if score is not None else self.model(batch)
                preds.append(logits.argmax(1) if idx is None else logits.argmax(1)[idx])
        if self.defense is not None and hasattr(self.defense, "seed"):
            self.defense.generator = gen  # as before scoring (None included: never a scoring draw's stream)
            if gen is not None:
                gen.set_state(saved)
        return torch.stack(preds, dim=1)

    def verdict(self, images: list[torch.Tensor], idx: torch.Tensor | None = None, *, score=None,
                draws: int | None = None) -> Verdict:
        """The per-sample worst verdict over ``images`` (each at rows ``idx``)."""
        y = self.y if idx is None else self.y[idx]
        out = None
        for img in images:
            v = Verdict.of(self.predictions(img, idx, score=score, draws=draws), y)
            out = v if out is None else out.worst(v)
        return out

    def restricted(self, idx: torch.Tensor) -> Judge:
        return _SubJudge(self, idx)


class _SubJudge(Judge):
    """The judge of rows ``idx`` of a parent judge's batch."""

    def __init__(self, parent: Judge, idx: torch.Tensor) -> None:
        self.parent, self.idx = parent, idx
        self.model, self.x, self.y = parent.model, parent.x[idx], parent.y[idx]
        self.random, self.draws, self.batch_seed, self.defense = (parent.random, parent.draws, parent.batch_seed,
                                                                   parent.defense)

    def restart(self, generator) -> None:
        self.parent.restart(generator)

    def predictions(self, images, idx=None, *, score=None, draws=None):
        rows = self.idx if idx is None else self.idx[idx]
        return self.parent.predictions(images, rows, score=score, draws=draws)

    def restricted(self, idx: torch.Tensor) -> Judge:
        return _SubJudge(self.parent, self.idx[idx])


_JUDGE: ContextVar[Judge | None] = ContextVar("purifybench_judge", default=None)


@contextmanager
def judging(judge: Judge):
    """Attacks called in the block decide with ``judge`` (:func:`judge_for`)."""
    token = _JUDGE.set(judge)
    try:
        yield judge
    finally:
        _JUDGE.reset(token)


FALLBACK_DRAWS = 4  # an attack called outside the harness on a stochastic model decides on this many draws


class _FallbackJudge(Judge):
    """The judge of an attack called outside the harness: its scoring draws seeded from torch's
    initial seed; :meth:`restart` puts the caller's generator, torch's global one and the
    defense's back where they were when the composite began (not the harness's batch seed)."""

    def __init__(self, model, x, y, generator, **kwargs) -> None:
        super().__init__(model, x, y, **kwargs)
        self.generator, self.gen_state = generator, generator.get_state() if generator is not None else None
        self.global_state = torch.get_rng_state()
        gen = getattr(self.defense, "generator", None)
        self.defense_gen = gen
        self.defense_state = gen.get_state() if gen is not None else None

    def restart(self, generator) -> None:
        if generator is not None and generator is self.generator:
            generator.set_state(self.gen_state)
        torch.set_rng_state(self.global_state)
        if self.defense is not None and hasattr(self.defense, "seed"):
            self.defense.generator = self.defense_gen
            if self.defense_gen is not None:
                self.defense_gen.set_state(self.defense_state)


def judge_for(model, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> Judge:
    """The judge of the batch ``x`` being attacked: the harness's (or a composite's restriction of
    it); outside the harness, one over the defended model behind ``model`` (one pass for a
    deterministic model, :data:`FALLBACK_DRAWS` draws for a stochastic one, seeded from torch's
    initial seed), whose restarts return to the streams' states at this call."""
    judge = _JUDGE.get()
    if judge is not None and judge.n == len(x) and torch.equal(judge.y, y):
        return judge
    plain = getattr(model, "defended", model)
    random = bool(getattr(model, "stochastic", False))
    return _FallbackJudge(plain, x, y, generator, draws=FALLBACK_DRAWS if random else 1, random=random,
                          batch_seed=int(torch.initial_seed()) % (2**62))


def run_parts(parts: list[Callable], model, x: torch.Tensor, y: torch.Tensor, generator, *,
              fresh: bool = True) -> AttackResult:
    """A composite attack: ``parts`` (each ``part(x, y) -> x_adv or AttackResult``) in order, the
    per-sample worst case over all their images (each part's images are candidates of the result).

    Where the scoring is exact (one pass decides: a deterministic row), a part only sees the samples
    every earlier part left correct (AutoAttack's early exit); its random draws come from
    :func:`batch_noise`, so each of those samples gets what it gets when the part attacks the whole
    batch. A part whose draws depend on the batch it is given (``part.whole_batch``: pyautoattack's
    attacks draw from torch's generator in the batch's shape) attacks every sample. Where it draws randomness, one
    misclassifying pass says nothing about the scoring draws, and no image can be called the
    winner for every score at once (all draws, the mean over draws, the vote): every part attacks
    every sample, and the harness keeps the per-sample worst of all the images under each score,
    so the composite is never above any of its parts under any of them. ``fresh``: each part starts
    from the batch's starting randomness (:meth:`Judge.restart`), so that it computes what it
    computes alone (``worst-of``, BPDA-then-exact); restarts of one attack leave it running.

    ``info["survivors"]``: after each part, the samples still correct under every draw of every
    image so far (for exact scoring, the samples the next part attacks)."""
    if not parts:
        raise ValueError("a composite attack needs at least one part")
    if len(parts) == 1:
        return as_result(parts[0](x, y))
    judge = judge_for(model, x, y, generator)
    n = len(x)
    images: list[torch.Tensor] = []
    todo = torch.arange(n, device=x.device)
    survivors: list[int] = []
    verdict = None
    info: dict = {}
    for part in parts:
        if len(todo) == 0:
            survivors.append(0)
            continue
        if fresh:
            judge.restart(generator)
        rows = todo
        if getattr(part, "whole_batch", False):  # draws that depend on the batch (pyautoattack's): all rows
            rows = torch.arange(n, device=x.device)
        sub = judge if len(rows) == n else judge.restricted(rows)
        with judging(sub):
            res = as_result(part(x[rows], y[rows]))
        if res.center is not None or res.score is not None:
            raise TypeError("a part of a composite attack must be scored by the defended model around the clean input")
        for k, v in res.info.items():
            info.setdefault(k, v)
        new = []  # each image of the part over the whole batch (rows it did not attack: broken, the clean image)
        for img in res.images:
            full = x.clone()
            full[rows] = img.detach()
            new.append(full)
        images += new
        v = judge.verdict(new)
        verdict = v if verdict is None else verdict.worst(v)
        if judge.exact:
            todo = todo[verdict.robust[todo]]
        survivors.append(int(verdict.robust.sum()))
    return AttackResult(images[0], candidates=images[1:], info={**info, "survivors": survivors})

