"""Gradient-masking checks, run per row (dataset, target, defense) of the matrix.

The checklist of Carlini et al. (2019, "On evaluating adversarial robustness"),
automated in the spirit of AutoAttack's ``checks.py``, on the first ``n``
examples of the row's evaluation subset and on the defended model exactly as the
row's attacks see it (BPDA where the defense declares it):

* ``zero-grad``: zero or non-finite input gradients at the clean images;
* ``steps``: PGD with more steps must not leave more images robust than PGD with few;
* ``eps``: robust accuracy must fall as eps grows (a short sweep), towards chance
  at the largest eps;
* ``square``: a gradient-free attack (Square, from pyautoattack) must not beat the
  white-box attacks (the per-sample worst case of the two PGD runs above);
* ``eot`` (stochastic defenses): doubling the EOT samples must not lower robust
  accuracy further (if it does, the EOT attacks of the row are not converged). The
  spread of robust accuracy over repeated evaluations is recorded alongside;
* ``transfer``: PGD crafted on the classifier alone (and, for a BPDA row whose
  surrogate is not the identity, on classifier(surrogate(x))) and evaluated on the
  defended model must not beat the white-box attacks: if it does, the white-box
  gradient is broken;
* fixed randomness (stochastic defenses, recorded, not flagged): the same PGD with the
  defense's randomness frozen for the attack and the scoring (the "deterministic
  white-box" protocol), next to the stochastic result, so that a reader sees how much
  of a row's robustness is randomness.

Differences are flagged only beyond sampling noise (:func:`tolerance`). Every
attack goes through the checking harness. The result is one checksummed JSON file
per row, ``checks/<row>.json``; the results tables show its flags as a column.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attacks.base import Attack, Threat
from attacks.pgd import pgd_linf
from benchmark.config import require, subkey
from benchmark.harness import gradient_check, run_attack
from benchmark.records import GradientCheck, RecordError, Typed, read_verified, write_record
from benchmark.registry import ATTACKS

log = logging.getLogger("purifybench")

SCHEMA = "purifybench-checks/2"  # 2: typed; the flags are derived from the checks
OLD_SCHEMAS = ("purifybench-checks/1",)  # the same fields: read, and said so
FLAGS = ("zero-grad", "steps", "eps", "square", "eot", "transfer")
LEGEND = ("Checks: gradient-masking checks on the first examples of the subset (Carlini et al. 2019; "
          "checks.md has the figures): ok = none failed; zero-grad = zero or non-finite input gradients; "
          "steps = more PGD steps left more images robust; eps = accuracy did not fall towards chance as eps grew; "
          "square = the gradient-free Square attack beat the white-box attacks; eot = more EOT samples lowered "
          "accuracy further; transfer = PGD crafted on the classifier alone (or the BPDA surrogate) beat the "
          "white-box attacks; n/a = not run.")


@dataclass
class ChecksSpec(Typed):
    enabled: bool = True
    n: int = 100  # examples: the first n of each row's evaluation subset
    steps: int = 10  # PGD steps of the base run (step size 2.5 eps / steps)
    more_steps: int = 50  # ... and of the longer run that must not do worse
    eps_multipliers: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])  # the sweep, times eps (capped at 1)
    square_queries: int = 1000
    eot: int = 4  # stochastic defenses: EOT-PGD with eot and with 2 * eot samples
    repeats: int = 3  # stochastic defenses: PGD evaluations whose spread is recorded
    transfer: bool = True  # PGD transferred from the classifier alone (and the BPDA surrogate)
    fixed_randomness: bool = True  # stochastic defenses: PGD with the randomness frozen

    def validate(self, where: str) -> None:
        require(self.n >= 1, subkey(where, "n"), f"must be >= 1, got {self.n}")
        require(self.steps >= 1, subkey(where, "steps"), f"must be >= 1, got {self.steps}")
        require(self.more_steps > self.steps, subkey(where, "more_steps"),
                f"must be larger than steps ({self.steps}), got {self.more_steps}")
        require(len(self.eps_multipliers) >= 1 and all(m > 1 for m in self.eps_multipliers),
                subkey(where, "eps_multipliers"), f"must list numbers > 1, got {self.eps_multipliers}")
        require(self.square_queries >= 1, subkey(where, "square_queries"), "must be >= 1")
        require(self.eot >= 1, subkey(where, "eot"), f"must be >= 1, got {self.eot}")
        require(self.repeats >= 1, subkey(where, "repeats"), f"must be >= 1, got {self.repeats}")


def tolerance(p1: float, p2: float, m: int, stochastic: bool) -> float:
    """How far two accuracies on the same m images may differ by chance: two images (random starts
    of PGD move a few borderline images), plus, for a stochastic defense, 1.96 standard errors of the
    difference of two independent re-scorings."""
    tol = max(0.02, 2.0 / m)
    if stochastic:
        tol += 1.96 * math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / m)
    return tol


# -- what a row's checks found (typed: these cross files) -------------------------------------
@dataclass
class StepsCheck(Typed):
    clean: float  # clean accuracy of the checked examples
    steps: list[int]  # [few, more]
    accuracy: list[float]  # PGD with few and with more steps
    tolerance: float
    failed: bool


@dataclass
class EpsCheck(Typed):
    eps: list[float]  # the threat's eps, then each multiple (capped at 1)
    accuracy: list[float]
    chance: float
    tolerance: float
    failed: bool


@dataclass
class SquareCheck(Typed):
    queries: int
    accuracy: float
    whitebox_accuracy: float  # per-sample worst case of the two PGD runs
    beaten_only_by_square: int
    tolerance: float
    failed: bool


@dataclass
class TransferCheck(Typed):
    accuracy: dict[str, float]  # per source: "classifier", and "surrogate" for a BPDA row
    whitebox_accuracy: float
    tolerance: float
    failed: bool


@dataclass
class FixedRandomness(Typed):
    """Recorded, not flagged: PGD against the stochastic defense, and with its randomness frozen."""

    pgd: float
    fixed_pgd: float
    from_randomness: float


@dataclass
class EotCheck(Typed):
    repeats: list[float]  # PGD evaluations with different seeds
    spread: float
    std: float
    samples: list[int]  # [E, 2E]
    accuracy: list[float]  # EOT-PGD with E and with 2E samples
    tolerance: float
    failed: bool


@dataclass
class CheckResults(Typed):
    """Every check of one row. ``transfer``, ``fixed`` and ``eot`` are ``None`` when not run."""

    n: int
    stochastic: bool
    gradient: GradientCheck
    steps: StepsCheck
    eps: EpsCheck
    square: SquareCheck
    transfer: TransferCheck | None = None
    fixed: FixedRandomness | None = None
    eot: EotCheck | None = None
    seconds: float = 0.0
    forwards: int = 0
    backwards: int = 0

    NESTED = {"gradient": GradientCheck, "steps": StepsCheck, "eps": EpsCheck, "square": SquareCheck,
              "transfer": TransferCheck, "fixed": FixedRandomness, "eot": EotCheck}

    @property
    def flags(self) -> list[str]:
        """The failed checks, in the order of :data:`FLAGS`."""
        failed = {"zero-grad": self.gradient.masked, "steps": self.steps.failed, "eps": self.eps.failed,
                  "square": self.square.failed, "eot": self.eot is not None and self.eot.failed,
                  "transfer": self.transfer is not None and self.transfer.failed}
        return [f for f in FLAGS if failed[f]]


@dataclass(frozen=True)
class RowKey(Typed):
    dataset: str
    target: str
    defense: str


@dataclass
class ChecksRecord(Typed):
    """One row's ``checks/<row>.json``. ``flags`` and ``passed`` are written for readers of the file;
    reading checks that they agree with ``results``."""

    row: RowKey
    row_hash: str
    results: CheckResults
    spec: ChecksSpec
    threat: dict
    dataset_copy: str | None = None
    profile: str | None = None
    bpda: bool = False
    sample_indices: list[int] | None = None
    created: str | None = None
    schema: str = SCHEMA
    checksum: str | None = None

    NESTED = {"row": RowKey, "results": CheckResults, "spec": ChecksSpec}

    @property
    def flags(self) -> list[str]:
        return self.results.flags

    @property
    def old_schema(self) -> bool:
        return self.schema in OLD_SCHEMAS

    @classmethod
    def from_json(cls, data, where: str = "checks:"):
        stated = None
        if isinstance(data, dict):
            stated = (data.get("flags"), data.get("passed"))
            data = {k: v for k, v in data.items() if k not in ("flags", "passed")}
        rec = super().from_json(data, where)
        if stated != (None, None) and stated != (rec.flags, not rec.flags):
            raise RecordError(f"{where} flags {stated[0]!r} disagree with the results (which give {rec.flags!r})")
        return rec

    def to_json(self) -> dict:
        return {**super().to_json(), "flags": self.flags, "passed": not self.flags}

class Transfer(Attack):
    """PGD crafted on ``source`` (the classifier alone, or classifier(surrogate(x))), evaluated by the
    harness on the defended model: a transfer attack that needs no gradient of the defense."""

    def __init__(self, source, steps: int, step_size: float) -> None:
        super().__init__()
        self.source, self.steps, self.step_size = source, steps, step_size

    def run(self, model, x, y, threat: Threat, generator):
        return pgd_linf(self.source, x, y, eps=threat.eps, step_size=self.step_size, steps=self.steps,
                        generator=generator)


def transfer_sources(model) -> dict:
    """The models a transfer check crafts on: the defended model's classifier alone, and for a BPDA
    row whose surrogate is not the identity, the classifier behind that surrogate."""
    from defenses.base import DefendedModel, Defense

    if not isinstance(model, DefendedModel):
        return {}
    out = {"classifier": model.classifier}
    defense = model.defense
    if model.bpda and type(defense).bpda_surrogate is not Defense.bpda_surrogate:
        out["surrogate"] = lambda z: model.classifier(defense.bpda_surrogate(z))
    return out


def _pgd(steps: int, eps: float, eot: int = 1):
    step_size = min(1.0, 2.5 * eps / steps)
    if eot == 1:
        return ATTACKS.get("pgd")(where="checks", steps=steps, step_size=step_size)
    return ATTACKS.get("eot-pgd")(where="checks", steps=steps, step_size=step_size, eot=eot)


def run_checks(model, x: torch.Tensor, y: torch.Tensor, threat: Threat, spec: ChecksSpec, *,
               seed: int = 0, batch_size: int | str = 500, engine=None) -> CheckResults:
    """Every check on images ``x`` (float in [0,1], on the model's device); ``.flags`` names the failed."""
    m = len(x)
    stochastic = bool(getattr(model, "stochastic", False))
    t0 = time.perf_counter()
    passes = {"forwards": 0, "backwards": 0}

    def attack(a, eps=threat.eps, s=seed):
        out = run_attack(a, model, x, y, Threat(threat.norm, eps), batch_size=batch_size, seed=s, engine=engine)
        passes["forwards"] += out.forwards
        passes["backwards"] += out.backwards
        return out

    grad = gradient_check(model, x, y)

    clean = attack(ATTACKS.get("clean")())
    few, more = attack(_pgd(spec.steps, threat.eps)), attack(_pgd(spec.more_steps, threat.eps))
    tol = tolerance(few.accuracy, more.accuracy, m, stochastic)
    steps = StepsCheck(clean=clean.accuracy, steps=[spec.steps, spec.more_steps],
                       accuracy=[few.accuracy, more.accuracy], tolerance=tol, failed=more.accuracy > few.accuracy + tol)

    whitebox = few.correct & more.correct
    wb_acc = float(whitebox.float().mean())
    sweep_eps, sweep_acc = [threat.eps], [few.accuracy]
    for k in spec.eps_multipliers:
        eps_k = min(1.0, threat.eps * k)
        sweep_eps.append(eps_k)
        sweep_acc.append(attack(_pgd(spec.steps, eps_k), eps=eps_k).accuracy)
    with torch.no_grad():
        classes = int(model(x[:1]).shape[1])
    chance = 1.0 / classes
    rises = [b - a for a, b in zip(sweep_acc, sweep_acc[1:])]
    eps_tol = tolerance(sweep_acc[0], sweep_acc[-1], m, stochastic)
    eps = EpsCheck(eps=sweep_eps, accuracy=sweep_acc, chance=chance, tolerance=eps_tol,
                   failed=sweep_acc[-1] > chance + 0.1 or any(r > eps_tol for r in rises))

    sq = attack(ATTACKS.get("square")(where="checks", n_queries=spec.square_queries, seed=seed))
    sq_tol = tolerance(sq.accuracy, wb_acc, m, stochastic)
    square = SquareCheck(queries=spec.square_queries, accuracy=sq.accuracy, whitebox_accuracy=wb_acc,
                         beaten_only_by_square=int((whitebox & ~sq.correct).sum()), tolerance=sq_tol,
                         failed=sq.accuracy < wb_acc - sq_tol)

    transfer = None
    sources = transfer_sources(model) if spec.transfer else {}
    if sources:
        step_size = min(1.0, 2.5 * threat.eps / spec.steps)
        accs = {name: attack(Transfer(src, spec.steps, step_size)).accuracy for name, src in sources.items()}
        lowest = min(accs.values())
        tr_tol = tolerance(lowest, wb_acc, m, stochastic)
        transfer = TransferCheck(accuracy=accs, whitebox_accuracy=wb_acc, tolerance=tr_tol,
                                 failed=lowest < wb_acc - tr_tol)

    fixed = None
    if stochastic and spec.fixed_randomness and hasattr(model, "fixed_randomness"):
        with model.fixed_randomness(seed):
            fixed_acc = attack(_pgd(spec.steps, threat.eps)).accuracy
        fixed = FixedRandomness(pgd=few.accuracy, fixed_pgd=fixed_acc, from_randomness=few.accuracy - fixed_acc)

    eot = None
    if stochastic:
        repeats = [few.accuracy] + [attack(_pgd(spec.steps, threat.eps), s=seed + r).accuracy
                                    for r in range(1, spec.repeats)]
        e1 = attack(_pgd(spec.steps, threat.eps, eot=spec.eot)).accuracy
        e2 = attack(_pgd(spec.steps, threat.eps, eot=2 * spec.eot)).accuracy
        eot_tol = tolerance(e1, e2, m, stochastic)
        eot = EotCheck(repeats=repeats, spread=max(repeats) - min(repeats),
                       std=float(torch.tensor(repeats).std()) if len(repeats) > 1 else 0.0,
                       samples=[spec.eot, 2 * spec.eot], accuracy=[e1, e2], tolerance=eot_tol, failed=e2 < e1 - eot_tol)
    return CheckResults(n=m, stochastic=stochastic, gradient=grad, steps=steps, eps=eps, square=square,
                        transfer=transfer, fixed=fixed, eot=eot, seconds=time.perf_counter() - t0, **passes)


# -- the per-row file --------------------------------------------------------------------------
def write_checks(path: Path, record: ChecksRecord) -> Path:
    return write_record(path, record, schema=SCHEMA)


_WARNED: set[str] = set()  # old checks files already said so in this process


def read_checks(path: Path) -> ChecksRecord:
    """Parse and verify a checks file; :class:`RecordError` (one line) if it cannot be trusted. A
    schema-1 file (the same fields, untyped) is read, and the log says so once per file."""
    data = read_verified(path, "checks file", (SCHEMA, *OLD_SCHEMAS))
    rec = ChecksRecord.from_json(data, where=f"checks file {path}:")
    if rec.old_schema and str(path) not in _WARNED:
        _WARNED.add(str(path))
        log.warning("checks file %s is %s (written before typed checks files); read as %s", path, rec.schema, SCHEMA)
    return rec


def valid_checks(path: Path, row_hash: str | None = None) -> ChecksRecord | None:
    """The checks file at ``path`` if it parses, verifies its checksum and (optionally) matches the row."""
    if not Path(path).is_file():
        return None
    try:
        record = read_checks(path)
    except RecordError as exc:
        log.debug("%s", exc)
        return None
    if row_hash is not None and record.row_hash != row_hash:
        return None
    return record


def load_checks(run_dir: Path) -> dict[RowKey, ChecksRecord]:
    """Every valid checks file of a run, keyed by its row (dataset, target, defense)."""
    out = {}
    for p in sorted((Path(run_dir) / "checks").glob("*.json")):
        rec = valid_checks(p)
        if rec is not None:
            out[rec.row] = rec
    return out


def flag_text(check: ChecksRecord | None, cell_masked: bool = False) -> str:
    """The table's Checks cell: failed checks by name, ``ok``, or ``n/a`` when not run."""
    flags = list(check.flags) if check else []
    if cell_masked and "zero-grad" not in flags:  # a cell's own gradient check (every gradient attack runs one)
        flags.insert(0, "zero-grad")
    if flags:
        return ", ".join(f for f in FLAGS if f in flags)
    return "ok" if check else "n/a"


def checks_markdown(checks: dict[RowKey, ChecksRecord]) -> str:
    """The figures behind the flags, one line per row."""
    out = ["# Gradient-masking checks\n", LEGEND, "",
           "| Dataset | Target | Defense | n | Flags | Zero grad | PGD few / more | eps sweep | Square / white-box "
           "| Transfer / white-box | EOT E / 2E | Spread | PGD stochastic / fixed randomness |",
           "|---|---|---|---:|---|---:|---|---|---|---|---|---:|---|"]

    def pct(v):
        return f"{100 * v:.1f}"

    for row, rec in checks.items():
        r = rec.results
        eot, transfer, fixed = r.eot, r.transfer, r.fixed
        out.append(" | ".join([
            f"| {row.dataset}", row.target, row.defense, str(r.n), flag_text(rec),
            pct(r.gradient.zero_gradient_fraction) if r.gradient.finite else "non-finite",
            " / ".join(pct(a) for a in r.steps.accuracy),
            " > ".join(f"{pct(a)}" for a in r.eps.accuracy) + f" (eps x1..x{r.eps.eps[-1] / r.eps.eps[0]:g})",
            f"{pct(r.square.accuracy)} / {pct(r.square.whitebox_accuracy)}",
            (" / ".join(f"{pct(a)} ({k})" for k, a in transfer.accuracy.items())
             + f" / {pct(transfer.whitebox_accuracy)}") if transfer else "-",
            " / ".join(pct(a) for a in eot.accuracy) if eot else "-",
            pct(eot.spread) if eot else "-",
            f"{pct(fixed.pgd)} / {pct(fixed.fixed_pgd)}" if fixed else "-",
        ]) + " |")
    return "\n".join(out) + "\n"
