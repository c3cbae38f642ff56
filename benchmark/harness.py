"""The one place that runs an attack and keeps it honest.

For every batch: the attack returns ``x_adv``; the harness checks that it lies in
the threat ball (``|x_adv - x|_inf <= eps + 1e-6``) and in [0,1], then re-scores
it with a fresh forward pass of the defended model (a stochastic defense draws
fresh randomness). It counts forward and backward image-passes, times the cell
and records peak GPU memory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from attacks.base import Attack, Threat
from attacks.engine import AttackView, EngineOptions, auto_batch_size, prepare_model
from benchmark import distributed
from benchmark.errors import BenchError

BALL_TOLERANCE = 1e-6
GRADIENT_CHECK_N = 256  # images of the first batch whose input gradient is checked for masking


class ThreatModelViolation(BenchError):
    """An attack returned images outside the threat ball or outside [0,1]."""


class CountingModel(nn.Module):
    """Counts image-passes forward and backward through ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forwards = 0
        self.backwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])
        self.forwards += n
        out = self.model(x)
        if out.requires_grad:
            def count(grad: torch.Tensor) -> None:
                self.backwards += n

            out.register_hook(count)
        return out

    def count(self, forwards: int = 0, backwards: int = 0) -> None:
        """Book passes an attack made around this wrapper (e.g. through the classifier alone)."""
        self.forwards += forwards
        self.backwards += backwards

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


@dataclass
class AttackOutcome:
    correct: torch.Tensor  # bool (n,), on the CPU, in data order
    seconds: float
    forwards: int
    backwards: int
    peak_memory_bytes: int | None
    extra: dict = field(default_factory=dict)

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


def gradient_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
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
    return {"n": int(len(x)), "zero_gradient_fraction": zero, "finite": finite,
            "masked": (not finite) or zero >= 0.5}


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
) -> AttackOutcome:
    """Attack ``model`` on float images in [0,1] (already on the model's device), batch by batch.

    The attack sees the model through the engine's options (``attacks.engine``); the reported
    accuracy always comes from a plain fp32 pass over the returned images. ``sharded``: under
    torchrun, each rank attacks its share of the batches and every rank gets the joined outcome."""
    device = images.device
    engine = engine or EngineOptions()
    prepare_model(model, engine)
    counter = CountingModel(model)
    view = AttackView(counter, engine, device)
    if batch_size == "auto":
        replicas = engine.eot_batch if getattr(getattr(model, "defense", None), "stochastic", False) else 1
        batch_size = auto_batch_size(model, images, labels, len(images), replicas=replicas)
    defense = getattr(model, "defense", None)
    gen = torch.Generator(device=device)
    correct = torch.zeros(len(images), dtype=torch.bool)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    starts = list(range(0, len(images), batch_size))
    if sharded:
        starts = distributed.shard(starts)
    # Every batch draws from generators seeded by (seed, its first row): the attack's, the defense's
    # and torch's global one (restored afterwards). A batch's result then does not depend on the
    # batches before it, so a run sharded over ranks equals a single-process run.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for start in tqdm(starts, desc=name, disable=not progress, leave=False, dynamic_ncols=True):
            batch_seed = (seed * 1_000_003 + start) % (2**62)
            gen.manual_seed(batch_seed)
            torch.manual_seed(batch_seed)
            if defense is not None and hasattr(defense, "seed"):
                defense.seed(batch_seed, device)
            x = images[start : start + batch_size]
            y = labels[start : start + batch_size]
            x_adv = attack(view, x, y, threat, gen).detach()
            check_adversarial(x_adv, attack.reference(x), threat, name)
            with torch.no_grad():  # re-score from x_adv with a fresh pass of the defended model
                pred = attack.score(counter, x_adv).argmax(1)
            correct[start : start + len(x)] = (pred == y).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    check = None
    if attack.uses_gradients and (not sharded or distributed.is_main()):  # rank 0 holds the first batch
        k = min(batch_size, GRADIENT_CHECK_N)
        check = gradient_check(AttackView(model, engine, device), images[:k], labels[:k])
    extra = {**({"gradient_check": check} if check else {}), "batch_size": batch_size,
             **({"engine": asdict(engine)} if not engine.is_default else {})}
    outcome = AttackOutcome(correct, seconds, counter.forwards, counter.backwards, peak, extra=extra)
    if sharded:
        outcome = _gather(outcome, starts, batch_size, len(images))
    return outcome


def _gather(local: AttackOutcome, starts: list[int], batch_size: int, n: int) -> AttackOutcome:
    """Every rank's share of a sharded cell, joined (on every rank): per-sample results in data order,
    passes summed, the slowest rank's time and the largest peak memory."""
    rows = [(s, min(s + batch_size, n)) for s in starts]
    parts = distributed.gather({"rows": rows, "bits": [local.correct[a:b].tolist() for a, b in rows],
                                "seconds": local.seconds, "forwards": local.forwards, "backwards": local.backwards,
                                "peak": local.peak_memory_bytes, "extra": local.extra})
    correct = torch.zeros(n, dtype=torch.bool)
    covered = torch.zeros(n, dtype=torch.bool)
    for part in parts:
        for (a, b), bits in zip(part["rows"], part["bits"]):
            correct[a:b] = torch.tensor(bits, dtype=torch.bool)
            covered[a:b] = True
    if not bool(covered.all()):
        raise BenchError("a sharded cell lost rows: the ranks' shares do not cover the evaluation set")
    peaks = [p["peak"] for p in parts if p["peak"] is not None]
    extra = dict(parts[0]["extra"], ranks=len(parts))
    return AttackOutcome(correct, max(p["seconds"] for p in parts), sum(p["forwards"] for p in parts),
                         sum(p["backwards"] for p in parts), max(peaks) if peaks else None, extra=extra)
