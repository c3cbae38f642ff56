"""The one place that runs an attack and keeps it honest.

For every batch: the attack returns ``x_adv`` and possibly candidates (a best iterate,
the parts of a composite); the harness checks that every image lies in the threat ball
(``|x_adv - x|_inf <= eps + 1e-6``) and in [0,1], then re-scores each with fresh forward
passes of the defended model. A stochastic defense is scored under ``draws`` independent
draws of its randomness (draw r seeded from the batch and r, never from the attack's streams,
so sharded and single runs agree and every cell of a batch shares its scoring draws): per
sample, how many draws classify it correctly, whether the plurality vote of the draws is the
true label, and the first draw alone, each the worst over the sample's images. A sample is
counted robust (``correct``) only if every draw classifies every image of it correctly: an
attacker may resubmit. Composite attacks decide with the same scoring
(:class:`attacks.core.Judge`). It counts forward and backward image-passes, times the cell
and records peak GPU memory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from attacks.base import Attack, Threat
from attacks.core import Judge, Verdict, as_result, judging
from attacks.engine import AttackView, EngineOptions, auto_batch_size, prepare_model
from benchmark import distributed, logs
from benchmark.errors import BenchError
from benchmark.records import GradientCheck

BALL_TOLERANCE = 1e-6
# In every cell's identity: bump when how cells are scored changes (2: scoring draws seeded apart from the
# attack's streams, every image an attack returns scored, composites decide with the scoring draws;
# 3: a composite's parts on survivors draw as for the whole batch)
SCORING_VERSION = 3
GRADIENT_CHECK_N = 256  # images of the first batch whose input gradient is checked for masking


class ThreatModelViolation(BenchError):
    """An attack returned images outside the threat ball or outside [0,1]."""


class PassCounter:
    """Counts image-passes, forward and backward, through the defended model and through its
    classifier alone (DIR's representation attack), with module hooks: a pass is counted once, at
    the outermost of the two (the classifier inside a defended pass is not counted again). Calls of
    the defense alone (the representation attack's one purification) and of other networks (SSP's
    feature extractor) are not passes of either and are not counted."""

    def __init__(self, defended: nn.Module) -> None:
        self.forwards = 0
        self.backwards = 0
        self._depth = 0
        modules = [defended] + ([defended.classifier] if isinstance(getattr(defended, "classifier", None),
                                                                     nn.Module) else [])
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._enter))
            self._handles.append(m.register_forward_hook(self._leave, always_call=True))

    def _enter(self, module, args) -> None:
        self._depth += 1

    def _leave(self, module, args, out) -> None:
        self._depth -= 1
        if self._depth or out is None:  # out is None when the pass raised (always_call)
            return
        n = int(args[0].shape[0])
        self.forwards += n
        if isinstance(out, torch.Tensor) and out.requires_grad:
            def count(grad: torch.Tensor) -> None:
                self.backwards += n

            out.register_hook(count)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> PassCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # the hooks never outlive the cell, even when an attack fails


def _merge_info(total: dict, part: dict) -> dict:
    """An attack's per-batch report summed over batches (numbers, and lists of numbers elementwise)."""
    for key, value in part.items():
        if key not in total:
            total[key] = list(value) if isinstance(value, list) else value
        elif isinstance(value, list):
            total[key] = [a + b for a, b in zip(total[key], value)]
        elif isinstance(value, (int, float)):
            total[key] += value
    return total


@dataclass
class AttackOutcome:
    correct: torch.Tensor  # bool (n,), on the CPU, in data order: correct under every draw
    seconds: float
    forwards: int
    backwards: int
    peak_memory_bytes: int | None
    extra: dict = field(default_factory=dict)
    draws: int = 1  # draws of the defense's randomness each adversarial image was scored under
    draw_counts: torch.Tensor | None = None  # int (n,): how many of the draws classified it correctly
    majority: torch.Tensor | None = None  # bool (n,): the plurality vote of the draws is the true label
    single: torch.Tensor | None = None  # bool (n,): the first draw alone
    score_forwards: int = 0  # image-passes spent on scoring (draws x n); included in ``forwards``
    random_score: bool = False  # whether the scoring drew randomness (a stochastic defense, not held fixed)
    diagnostics: dict = field(default_factory=dict)  # name -> bool (n,): correct under another scoring of the images

    PER_SAMPLE = ("correct", "draw_counts", "majority", "single")

    @property
    def n(self) -> int:
        return int(self.correct.numel())

    @property
    def n_correct(self) -> int:
        return int(self.correct.sum())

    @property
    def accuracy(self) -> float:
        return self.n_correct / self.n if self.n else float("nan")


def check_adversarial(x_adv: torch.Tensor, x: torch.Tensor, threat: Threat, attack: str) -> None:
    if x_adv.shape != x.shape:
        raise ThreatModelViolation(f"attack {attack!r} returned shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}")
    if not torch.isfinite(x_adv).all():
        raise ThreatModelViolation(f"attack {attack!r} returned non-finite pixels")
    dist = float((x_adv.float() - x.float()).abs().flatten(1).amax(1).max()) if len(x) else 0.0
    if dist > threat.eps + BALL_TOLERANCE:
        raise ThreatModelViolation(
            f"attack {attack!r} left the threat ball: max |x_adv - x|_inf = {dist:.6f} > eps {threat.eps:.6f} (+1e-6)"
        )
    lo, hi = float(x_adv.min()), float(x_adv.max())
    if lo < 0.0 or hi > 1.0:
        raise ThreatModelViolation(f"attack {attack!r} returned pixels outside [0,1]: [{lo:.6f}, {hi:.6f}]")


def gradient_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> GradientCheck:
    """One of the gradient-masking checks (Carlini et al. 2019): the input gradient of the loss
    that the attacks follow, at the clean images of the first batch. A defense whose gradient is
    zero for most images, or not finite, makes every gradient attack look weak: ``masked`` flags it
    (tables and the adaptive report show the flag). Not counted in the cell's passes or time."""
    from attacks.pgd import ce_sum, input_gradient

    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        grad, _ = input_gradient(model, x, y, ce_sum)
    per_image = grad.detach().flatten(1).abs().amax(1)
    finite = bool(torch.isfinite(grad).all())
    zero = float((per_image == 0).float().mean()) if finite else float("nan")
    return GradientCheck(n=int(len(x)), zero_gradient_fraction=zero, finite=finite, masked=(not finite) or zero >= 0.5)


MAX_DRAWS = 35  # per-sample draw counts are stored as one base-36 digit


class _Tally:
    """Per-sample scores of a cell, filled batch by batch."""

    def __init__(self, n: int, counter: PassCounter) -> None:
        self.counter = counter  # the cell's pass counter (scoring passes are counted apart)
        self.counts = torch.zeros(n, dtype=torch.int64)  # correct draws per sample
        self.majority = torch.zeros(n, dtype=torch.bool)
        self.single = torch.zeros(n, dtype=torch.bool)  # the first draw alone
        self.drawn, self.random, self.info, self.score_forwards = 1, False, {}, 0
        self.diagnostics: dict[str, torch.Tensor] = {}  # name -> per-sample correctness under that scoring

    def add(self, start: int, verdict: Verdict) -> None:
        rows = slice(start, start + len(verdict.counts))
        self.counts[rows], self.single[rows], self.majority[rows] = (verdict.counts.cpu(), verdict.single.cpu(),
                                                                     verdict.majority.cpu())


def _attack_batch(attack: Attack, model: nn.Module, view: AttackView, x: torch.Tensor, y: torch.Tensor,
                  threat: Threat, batch_seed: int, name: str, draws: int, tally: _Tally, start: int) -> None:
    """Attack one batch from generators seeded by ``batch_seed`` (the defense's derived from it), check
    every image it returned and score them with fresh passes of the defended model into ``tally``:
    per sample, the worst of its images under each score (:class:`attacks.core.Verdict`)."""
    stochastic = bool(getattr(model, "stochastic", False))
    judge = Judge(model, x, y, draws=draws, random=stochastic, batch_seed=batch_seed)
    gen = torch.Generator(device=x.device)
    judge.restart(gen)
    with judging(judge):
        result = as_result(attack(view, x, y, threat, gen))
    centre = x if result.center is None else result.center
    for img in result.images:
        check_adversarial(img.detach(), centre, threat, name)
    _merge_info(tally.info, result.info)
    tally.random = result.random_score if result.random_score is not None else stochastic
    tally.drawn = draws if tally.random else 1
    before = tally.counter.forwards  # re-score from the images with fresh passes of the defended model
    verdict = judge.verdict([img.detach() for img in result.images], score=result.score, draws=tally.drawn)
    for key, score in result.diagnostics.items():  # other scorings of the same images (e.g. fixed masks)
        other = judge.verdict([img.detach() for img in result.images], score=score, draws=1)
        tally.diagnostics.setdefault(key, torch.zeros(len(tally.counts), dtype=torch.bool))[
            start:start + len(y)] = other.robust.cpu()
    tally.score_forwards += tally.counter.forwards - before
    tally.add(start, verdict)


def run_attack(
    attack: Attack,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    threat: Threat,
    *,
    batch_size: int | str,
    seed: int = 0,
    name: str = "attack",
    progress: bool = False,
    engine: EngineOptions | None = None,
    sharded: bool = False,
    draws: int = 1,
) -> AttackOutcome:
    """Attack ``model`` on float images in [0,1] (already on the model's device), batch by batch.

    The attack sees the model through the engine's options (``attacks.engine``); the reported
    accuracy always comes from a plain fp32 pass over the returned images. ``sharded``: under
    torchrun, each rank attacks its share of the batches and every rank gets the joined outcome.
    ``draws``: scoring passes per batch when the attack's scoring is random (a stochastic defense);
    deterministic scoring always takes one."""
    device = images.device
    engine = engine or EngineOptions()
    prepare_model(model, engine)
    view = AttackView(model, engine, device)
    if batch_size == "auto":
        replicas = engine.eot_batch if getattr(getattr(model, "defense", None), "stochastic", False) else 1
        batch_size = auto_batch_size(model, images, labels, len(images), replicas=replicas)
    if not 1 <= draws <= MAX_DRAWS:
        raise BenchError(f"draws must be in [1, {MAX_DRAWS}], got {draws}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    counter = PassCounter(model)
    tally = _Tally(len(images), counter)
    starts = list(range(0, len(images), batch_size))
    if sharded:
        starts = distributed.shard(starts)
    # Every batch draws from generators seeded by (seed, its first row): the attack's, the defense's
    # and torch's global one (restored afterwards). A batch's result then does not depend on the
    # batches before it, so a run sharded over ranks equals a single-process run.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), counter:
        for i, start in enumerate(tqdm(starts, desc=name, disable=not progress, leave=False, dynamic_ncols=True)):
            x, y = images[start : start + batch_size], labels[start : start + batch_size]
            _attack_batch(attack, model, view, x, y, threat, (seed * 1_000_003 + start) % (2**62), name, draws,
                          tally, start)
            logs.step("batch", i + 1, len(starts))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    check = None
    if attack.uses_gradients and (not sharded or distributed.is_main()):  # rank 0 holds the first batch
        k = min(batch_size, GRADIENT_CHECK_N)
        check = gradient_check(AttackView(model, engine, device), images[:k], labels[:k])
    extra = {**({"gradient_check": check} if check else {}), "batch_size": batch_size,
             **({"engine": asdict(engine)} if not engine.is_default else {}),
             **({"attack_info": tally.info} if tally.info else {})}
    outcome = AttackOutcome(tally.counts == tally.drawn, seconds, counter.forwards, counter.backwards, peak,
                            extra=extra, draws=tally.drawn, draw_counts=tally.counts, majority=tally.majority,
                            single=tally.single, score_forwards=tally.score_forwards, random_score=tally.random,
                            diagnostics=tally.diagnostics)
    if sharded:
        outcome = _gather(outcome, starts, batch_size, len(images))
    return outcome


def _gather(local: AttackOutcome, starts: list[int], batch_size: int, n: int) -> AttackOutcome:
    """Every rank's share of a sharded cell, joined (on every rank): per-sample results in data order,
    passes summed, the slowest rank's time and the largest peak memory."""
    rows = [(s, min(s + batch_size, n)) for s in starts]
    fields = AttackOutcome.PER_SAMPLE
    parts = distributed.gather({"rows": rows, **{f: [getattr(local, f)[a:b].tolist() for a, b in rows] for f in fields},
                                "seconds": local.seconds, "forwards": local.forwards, "backwards": local.backwards,
                                "score_forwards": local.score_forwards, "peak": local.peak_memory_bytes,
                                "extra": local.extra, "draws": local.draws, "random": local.random_score,
                                "diagnostics": {k: [v[a:b].tolist() for a, b in rows] for k, v in local.diagnostics.items()}})
    joined = {f: torch.zeros(n, dtype=getattr(local, f).dtype) for f in fields}
    covered = torch.zeros(n, dtype=torch.bool)
    for part in parts:
        for i, (a, b) in enumerate(part["rows"]):
            for f in fields:
                joined[f][a:b] = torch.tensor(part[f][i], dtype=joined[f].dtype)
            covered[a:b] = True
    if not bool(covered.all()):
        raise BenchError("a sharded cell lost rows: the ranks' shares do not cover the evaluation set")
    diagnostics = {k: torch.zeros(n, dtype=torch.bool) for part in parts for k in part["diagnostics"]}
    for part in parts:
        for k, chunks in part["diagnostics"].items():
            for (a, b), chunk in zip(part["rows"], chunks):
                diagnostics[k][a:b] = torch.tensor(chunk, dtype=torch.bool)
    peaks = [p["peak"] for p in parts if p["peak"] is not None]
    extra = dict(parts[0]["extra"], ranks=len(parts))
    info: dict = {}
    for part in parts:  # an attack's report summed over every rank's batches
        _merge_info(info, part["extra"].get("attack_info") or {})
    extra.pop("attack_info", None)
    if info:
        extra["attack_info"] = info
    return AttackOutcome(seconds=max(p["seconds"] for p in parts), forwards=sum(p["forwards"] for p in parts),
                         backwards=sum(p["backwards"] for p in parts), peak_memory_bytes=max(peaks) if peaks else None,
                         extra=extra, draws=max(p["draws"] for p in parts),
                         random_score=any(p["random"] for p in parts), score_forwards=sum(p["score_forwards"] for p in parts),
                         diagnostics=diagnostics, **joined)
