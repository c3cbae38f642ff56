"""Gradient-masking checks, run per row (dataset, target, defense) of the matrix.

The checklist of Carlini et al. (2019, "On evaluating adversarial robustness"),
automated in the spirit of AutoAttack's ``checks.py``, on the first ``n``
examples of the row's evaluation subset and on the defended model exactly as the
row's attacks see it (BPDA where the defense declares it). Every comparison is
between attacks on the *same* images, so each is a paired test: the exact McNemar
test on the per-sample results (:class:`Paired`, 5% two-sided), the test the tables'
bold uses, not a tolerance for two independent samples. A stochastic row's per-sample
results are "correct under every scoring draw", and every cell of a batch is scored
under the same draws. The flags:

* ``degenerate``: the row does not classify: its clean accuracy is within the 95%
  interval of chance, or all its predictions are one class, or it is below a third of
  the way from chance to the target's own clean accuracy on the same images (a
  collapsed training; every other number of such a row is meaningless);
* ``zero-grad``: zero or non-finite input gradients at the clean images;
* ``steps``: PGD with more steps left significantly more images robust than PGD with
  few (masking); ``unconverged``: significantly fewer (the row's few-step attacks are
  not converged: more steps are much stronger);
* ``eps``: robust accuracy rose significantly between two eps of a short sweep, or did
  not fall to within 10 points of chance at the largest eps;
* ``fgsm``: one FGSM step beat PGD (a sign of a gradient that misleads iterative steps);
* ``noise``: uniform random sign noise of size eps beat PGD (the gradient is worse
  than no gradient);
* ``square``: a gradient-free attack (Square, from pyautoattack) beat the white-box
  attacks (the per-sample worst case of the two PGD runs above);
* ``transfer``: PGD crafted on the classifier alone (and, for a BPDA row whose
  surrogate is not the identity, on classifier(surrogate(x))) and evaluated on the
  defended model beat the white-box attacks: the white-box gradient is broken;
* ``eot`` (stochastic defenses): EOT-PGD with twice the row's own EOT samples (the
  largest E among its attacks) was significantly stronger than with E: the row's EOT
  attacks are not converged. The spread over repeated PGD evaluations is recorded;
* ``active`` (when ``checks.active`` is set): the row's attack failed the binarization test of
  Zimmermann et al. (NeurIPS 2022; :mod:`benchmark.active`): on two-class problems built on the
  row's own features, where an adversarial example inside the ball exists by construction, it found
  significantly fewer than a passing attack does;
* ``randomness`` (stochastic defenses, a diagnostic, not a masking failure): PGD with
  the defense's randomness frozen for the attack and the scoring (the "deterministic
  white-box" protocol) left significantly fewer images robust than against the random
  defense: the row's robustness rests on its randomness, and its EOT attacks are the
  numbers to read.

A row declared deterministic is checked to be so before anything is attacked
(:func:`check_determinism`): two passes over the same images must agree, or the row is
refused. Every attack goes through the checking harness. The result is one
checksummed JSON file per row, ``checks/<row>.json``; the results tables show its
flags as a column (``no flag (n=...)`` when none was raised: the checks found nothing
on those n images, which is not a proof of robustness).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attacks.base import Attack, Threat
from attacks.pgd import pgd_linf
from benchmark.active import ActiveResult, ActiveSpec, binarization_test
from benchmark.config import require, subkey
from benchmark.errors import BenchError
from benchmark.harness import gradient_check, run_attack
from benchmark.records import (
    GradientCheck,
    RecordError,
    Typed,
    bit_string,
    read_verified,
    write_record,
)
from benchmark.registry import ATTACKS
from benchmark.stats import mcnemar, wilson_interval

log = logging.getLogger("purifybench")

CHECKS_VERSION = 2  # in a row's checks identity: bump when what the checks compute changes
SCHEMA = "purifybench-checks/4"  # 4: the binarization test (active); 3: paired tests, degenerate, ...
# readable (a /3 file has no binarization test); a run recomputes them (their row hash differs too)
OLD_SCHEMAS: tuple[str, ...] = ("purifybench-checks/3",)
ALPHA = 0.05  # significance level of every paired comparison
FLAGS = ("degenerate", "zero-grad", "steps", "unconverged", "eps", "fgsm", "noise", "square", "transfer", "eot",
         "active", "randomness")
LEGEND = ("Checks: gradient-masking checks on the first examples of the subset (Carlini et al. 2019; each a paired "
          "exact McNemar test at 5% on the same images; checks.md has the figures): no flag (n=...) = none raised "
          "on those n images (not a proof of robustness); degenerate = the row does not classify (clean accuracy "
          "at chance, one predicted class, or far below the target's: every number of the row is meaningless); "
          "zero-grad = zero or non-finite input gradients; steps = more PGD steps left more images robust; "
          "unconverged = more PGD steps were much stronger; eps = accuracy did not fall towards chance as eps grew; "
          "fgsm = one FGSM step beat PGD; noise = random noise beat PGD; square = the gradient-free Square attack "
          "beat the white-box attacks; transfer = PGD crafted on the classifier alone (or the BPDA surrogate) beat "
          "the white-box attacks; eot = twice the row's EOT samples was stronger; active = the row's attack missed "
          "significantly often the adversarial examples the binarization test builds (Zimmermann et al. 2022): it "
          "is too weak for this defense; randomness = robustness that "
          "rests on the defense's randomness (PGD with it frozen was much stronger; a diagnostic); n/a = not run.")


@dataclass
class ChecksSpec(Typed):
    enabled: bool = True
    n: int = 100  # examples: the first n of each row's evaluation subset
    steps: int = 10  # PGD steps of the base run (step size 2.5 eps / steps)
    more_steps: int = 50  # ... and of the longer run that must not do worse
    eps_multipliers: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])  # the sweep, times eps (capped at 1)
    square_queries: int = 1000
    eot: int | str = "auto"  # stochastic defenses: EOT-PGD with E and 2E samples; auto: the row's own E
    repeats: int = 3  # stochastic defenses: PGD evaluations whose spread is recorded
    transfer: bool = True  # PGD transferred from the classifier alone (and the BPDA surrogate)
    fixed_randomness: bool = True  # stochastic defenses: PGD with the randomness frozen
    active: ActiveSpec | None = None  # the binarization test of the row's attack (benchmark/active.py); off: null

    NESTED = {"active": ActiveSpec}

    def validate(self, where: str) -> None:
        require(self.n >= 1, subkey(where, "n"), f"must be >= 1, got {self.n}")
        require(self.steps >= 1, subkey(where, "steps"), f"must be >= 1, got {self.steps}")
        require(self.more_steps > self.steps, subkey(where, "more_steps"),
                f"must be larger than steps ({self.steps}), got {self.more_steps}")
        require(len(self.eps_multipliers) >= 1 and all(m > 1 for m in self.eps_multipliers),
                subkey(where, "eps_multipliers"), f"must list numbers > 1, got {self.eps_multipliers}")
        require(self.square_queries >= 1, subkey(where, "square_queries"), "must be >= 1")
        require(self.eot == "auto" or (isinstance(self.eot, int) and self.eot >= 1), subkey(where, "eot"),
                f"must be auto (the row's own EOT samples) or an integer >= 1, got {self.eot!r}")
        require(self.repeats >= 1, subkey(where, "repeats"), f"must be >= 1, got {self.repeats}")
        if self.active is not None:
            self.active.validate(subkey(where, "active"))


DEFAULT_EOT = 4  # eot: auto on a row none of whose attacks takes EOT samples


# -- what a row's checks found (typed: these cross files) -------------------------------------
@dataclass
class Paired(Typed):
    """Two attacks on the same images: their accuracies, how many samples only one of them left
    correct, and the exact McNemar test's two-sided p-value."""

    names: list[str]
    accuracy: list[float]
    only: list[int]
    p_value: float

    @classmethod
    def of(cls, a: str, bits_a, b: str, bits_b) -> Paired:
        sa, sb = bit_string(bits_a), bit_string(bits_b)
        m = mcnemar(sa, sb)
        return cls(names=[a, b], accuracy=[sa.count("1") / len(sa), sb.count("1") / len(sb)],
                   only=[m["only_a"], m["only_b"]], p_value=m["p_value"])

    def first_higher(self) -> bool:
        """The first left significantly more samples correct than the second."""
        return self.p_value < ALPHA and self.only[0] > self.only[1]

    def second_higher(self) -> bool:
        return self.p_value < ALPHA and self.only[1] > self.only[0]


@dataclass
class DegenerateCheck(Typed):
    """Does the row classify at all: its clean accuracy, the target's on the same images, chance, how
    many classes it predicts, and why it is degenerate (empty: it is not)."""

    clean: float
    target_clean: float | None
    chance: float
    classes_predicted: int
    reasons: list[str]

    @property
    def failed(self) -> bool:
        return bool(self.reasons)


@dataclass
class StepsCheck(Typed):
    steps: list[int]  # [few, more]
    comparison: Paired  # PGD with few steps vs with more
    failed: bool  # more steps left significantly more robust (masking)
    unconverged: bool  # more steps were significantly stronger

    NESTED = {"comparison": Paired}


@dataclass
class EpsCheck(Typed):
    eps: list[float]  # the threat's eps, then each multiple (capped at 1)
    accuracy: list[float]
    chance: float
    rises: list[Paired]  # each eps against the next
    failed: bool

    NESTED = {"rises": (list, Paired)}


@dataclass
class BaselineCheck(Typed):
    """An attack that must not beat PGD (FGSM, random noise) or the white-box attacks (Square)."""

    comparison: Paired  # [the baseline, the white-box reference]
    failed: bool

    NESTED = {"comparison": Paired}


@dataclass
class SquareCheck(BaselineCheck):
    queries: int = 0


@dataclass
class TransferCheck(Typed):
    comparisons: dict[str, Paired]  # per source ("classifier", "surrogate"): [transfer, white-box]
    failed: bool

    NESTED = {"comparisons": (dict, Paired)}


@dataclass
class FixedRandomness(Typed):
    """PGD against the stochastic defense, and with its randomness frozen (a diagnostic)."""

    comparison: Paired  # [stochastic, fixed]
    flagged: bool  # freezing the randomness left significantly fewer robust

    NESTED = {"comparison": Paired}


@dataclass
class EotCheck(Typed):
    repeats: list[float]  # PGD evaluations with different seeds
    spread: float
    std: float
    samples: list[int]  # [E, 2E]
    comparison: Paired  # EOT-PGD with E vs 2E samples
    failed: bool

    NESTED = {"comparison": Paired}


@dataclass
class CheckResults(Typed):
    """Every check of one row. ``transfer``, ``fixed`` and ``eot`` are ``None`` when not run."""

    n: int
    stochastic: bool
    degenerate: DegenerateCheck
    gradient: GradientCheck
    steps: StepsCheck
    eps: EpsCheck
    fgsm: BaselineCheck
    noise: BaselineCheck
    square: SquareCheck
    transfer: TransferCheck | None = None
    fixed: FixedRandomness | None = None
    eot: EotCheck | None = None
    active: ActiveResult | None = None
    seconds: float = 0.0
    forwards: int = 0
    backwards: int = 0

    NESTED = {"degenerate": DegenerateCheck, "gradient": GradientCheck, "steps": StepsCheck, "eps": EpsCheck,
              "fgsm": BaselineCheck, "noise": BaselineCheck, "square": SquareCheck, "transfer": TransferCheck,
              "fixed": FixedRandomness, "eot": EotCheck, "active": ActiveResult}

    @property
    def flags(self) -> list[str]:
        """The failed checks, in the order of :data:`FLAGS`."""
        failed = {"degenerate": self.degenerate.failed, "zero-grad": self.gradient.masked,
                  "steps": self.steps.failed, "unconverged": self.steps.unconverged, "eps": self.eps.failed,
                  "fgsm": self.fgsm.failed, "noise": self.noise.failed, "square": self.square.failed,
                  "transfer": self.transfer is not None and self.transfer.failed,
                  "eot": self.eot is not None and self.eot.failed,
                  "active": self.active is not None and self.active.failed,
                  "randomness": self.fixed is not None and self.fixed.flagged}
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


class RandomNoise(Attack):
    """Uniform random sign noise of size eps (one draw per image): the baseline PGD must beat."""

    uses_gradients = False

    def run(self, model, x, y, threat: Threat, generator):
        signs = torch.randint(0, 2, x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        return (x + threat.eps * signs).clamp(0.0, 1.0)


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
               seed: int = 0, batch_size: int | str = 500, engine=None, draws: int = 1, eot: int | None = None,
               target=None, active: tuple[str, Attack] | None = None,
               active_images: torch.Tensor | None = None) -> CheckResults:
    """Every check on images ``x`` (float in [0,1], on the model's device); ``.flags`` names the failed.
    ``draws``: the row's scoring draws (a stochastic row's per-sample results are "correct under
    every draw"); ``eot``: the row's own EOT samples (for ``spec.eot: auto``); ``target``: the
    target classifier whose clean accuracy the row's is compared with (degenerate); ``active``: the
    attack (its config name, built) the binarization test holds to account when ``spec.active`` is
    set, on ``active_images`` (default ``x``)."""
    m = len(x)
    stochastic = bool(getattr(model, "stochastic", False))
    t0 = time.perf_counter()
    passes = {"forwards": 0, "backwards": 0}

    def attack(a, eps=threat.eps, s=seed):
        out = run_attack(a, model, x, y, Threat(threat.norm, eps), batch_size=batch_size, seed=s, engine=engine,
                         draws=draws)
        passes["forwards"] += out.forwards
        passes["backwards"] += out.backwards
        return out

    grad = gradient_check(model, x, y)
    clean = attack(ATTACKS.get("clean")())
    degenerate = degenerate_check(model, x, y, clean.correct, target)

    few, more = attack(_pgd(spec.steps, threat.eps)), attack(_pgd(spec.more_steps, threat.eps))
    pair = Paired.of(f"PGD-{spec.steps}", few.correct, f"PGD-{spec.more_steps}", more.correct)
    steps = StepsCheck(steps=[spec.steps, spec.more_steps], comparison=pair, failed=pair.second_higher(),
                       unconverged=pair.first_higher())

    whitebox = few.correct & more.correct
    sweep_eps, sweep = [threat.eps], [few.correct]
    for k in spec.eps_multipliers:
        eps_k = min(1.0, threat.eps * k)
        sweep_eps.append(eps_k)
        sweep.append(attack(_pgd(spec.steps, eps_k), eps=eps_k).correct)
    chance = degenerate.chance
    rises = [Paired.of(f"eps {a:g}", sweep[i], f"eps {b:g}", sweep[i + 1])
             for i, (a, b) in enumerate(zip(sweep_eps, sweep_eps[1:]))]
    accuracy = [float(c.float().mean()) for c in sweep]
    eps = EpsCheck(eps=sweep_eps, accuracy=accuracy, chance=chance, rises=rises,
                   failed=accuracy[-1] > chance + 0.1 or any(r.second_higher() for r in rises))

    fgsm_out = attack(ATTACKS.get("pgd")(where="checks", steps=1, step_size=min(1.0, threat.eps), random_start=False))
    fgsm = BaselineCheck(comparison=(c := Paired.of("FGSM", fgsm_out.correct, f"PGD-{spec.steps}", few.correct)),
                         failed=c.second_higher())
    noise_out = attack(RandomNoise())
    noise = BaselineCheck(comparison=(c := Paired.of("noise", noise_out.correct, f"PGD-{spec.steps}", few.correct)),
                          failed=c.second_higher())

    sq = attack(ATTACKS.get("square")(where="checks", n_queries=spec.square_queries, seed=seed))
    pair = Paired.of("Square", sq.correct, "white-box", whitebox)
    square = SquareCheck(comparison=pair, failed=pair.second_higher(), queries=spec.square_queries)

    transfer = None
    sources = transfer_sources(model) if spec.transfer else {}
    if sources:
        step_size = min(1.0, 2.5 * threat.eps / spec.steps)
        pairs = {name: Paired.of(f"transfer ({name})", attack(Transfer(src, spec.steps, step_size)).correct,
                                 "white-box", whitebox) for name, src in sources.items()}
        transfer = TransferCheck(comparisons=pairs, failed=any(p.second_higher() for p in pairs.values()))

    fixed = None
    if stochastic and spec.fixed_randomness and hasattr(model, "fixed_randomness"):
        with model.fixed_randomness(seed):
            frozen = attack(_pgd(spec.steps, threat.eps))
        pair = Paired.of(f"PGD-{spec.steps}", few.correct, "randomness fixed", frozen.correct)
        fixed = FixedRandomness(comparison=pair, flagged=pair.first_higher())

    eot_check = None
    if stochastic:
        repeats = [few.accuracy] + [attack(_pgd(spec.steps, threat.eps), s=seed + r).accuracy
                                    for r in range(1, spec.repeats)]
        e = spec.eot if spec.eot != "auto" else (eot or DEFAULT_EOT)
        e1 = attack(_pgd(spec.steps, threat.eps, eot=e))
        e2 = attack(_pgd(spec.steps, threat.eps, eot=2 * e))
        pair = Paired.of(f"EOT {e}", e1.correct, f"EOT {2 * e}", e2.correct)
        eot_check = EotCheck(repeats=repeats, spread=max(repeats) - min(repeats),
                             std=float(torch.tensor(repeats).std()) if len(repeats) > 1 else 0.0,
                             samples=[e, 2 * e], comparison=pair, failed=pair.first_higher())
    binarized = None
    if spec.active is not None and active is not None:
        name, a = active
        try:
            binarized = binarization_test(model, x if active_images is None else active_images, a, threat,
                                          spec.active, name=name, draws=draws, engine=engine, batch_size=batch_size)
        except (BenchError, RuntimeError, TypeError, ValueError) as exc:  # the other checks of the row stand
            log.warning("the binarization test of %s did not run: %s", name, exc, exc_info=True)
            binarized = ActiveResult(attack=name, samples=[], params=a.describe(), threshold=spec.active.threshold,
                                     alpha=spec.active.alpha, error=f"{type(exc).__name__}: {exc}")
        passes["forwards"] += binarized.forwards
        passes["backwards"] += binarized.backwards
    return CheckResults(n=m, stochastic=stochastic, degenerate=degenerate, gradient=grad, steps=steps, eps=eps,
                        fgsm=fgsm, noise=noise, square=square, transfer=transfer, fixed=fixed, eot=eot_check,
                        active=binarized, seconds=time.perf_counter() - t0, **passes)


def degenerate_check(model, x: torch.Tensor, y: torch.Tensor, correct: torch.Tensor, target=None) -> DegenerateCheck:
    """Does the row classify: ``correct`` its clean per-sample results (under every scoring draw),
    ``target`` the target classifier (its clean accuracy on the same images is the reference)."""
    with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        logits = model(x)
        target_correct = (target(x).argmax(1) == y).cpu() if target is not None else None
    classes = int(logits.shape[1])
    chance = 1.0 / classes
    predicted = int(logits.argmax(1).unique().numel())
    n, k = len(correct), int(correct.sum())
    lo, hi = wilson_interval(k, n)
    reasons = []
    if lo <= chance <= hi:
        reasons.append(f"clean accuracy {100 * k / n:.1f}% is within chance ({100 * chance:.0f}%)")
    if predicted == 1 and n > 1:
        reasons.append("every prediction is one class")
    target_clean = None
    if target_correct is not None:
        target_clean = float(target_correct.float().mean())
        floor = chance + (target_clean - chance) / 3
        pair = Paired.of("row", correct.cpu(), "target", target_correct)
        if k / n < floor and pair.second_higher():
            reasons.append(f"clean accuracy {100 * k / n:.1f}% is far below the target's {100 * target_clean:.1f}%")
    return DegenerateCheck(clean=k / n, target_clean=target_clean, chance=chance, classes_predicted=predicted,
                           reasons=reasons)


def check_determinism(model, x: torch.Tensor, name: str) -> None:
    """A row whose defense declares ``stochastic = False`` must be deterministic: two passes over the
    same images (with every random stream moved on between them) must give the same logits up to
    float noise. Otherwise it would be scored on one draw and attacked without EOT: refused, in one
    line that says what to declare."""
    if bool(getattr(model, "stochastic", False)):
        return
    with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        first = model(x).float()
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,))) + 1)
        second = model(x).float()
    scale = 1.0 + float(first.abs().max())
    diff = float((first - second).abs().max())
    changed = int((first.argmax(1) != second.argmax(1)).sum())
    if diff > 1e-3 * scale:  # (an argmax flip within float noise is a near-tie, not randomness)
        raise BenchError(f"defense {name!r} declares stochastic = False, but two passes over the same {len(x)} "
                         f"images disagree ({changed} predictions differ, logits by up to {diff:.3g}): it draws "
                         "randomness at inference; declare stochastic = True (its cells are then attacked with "
                         "EOT and scored under several draws) or make its purification deterministic")


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


class RowChecks(dict):
    """A run's checks files by row, with ``excluded``: one line per file left out and why."""

    def __init__(self, items=(), excluded: list[str] | None = None) -> None:
        super().__init__(items)
        self.excluded = excluded or []


def load_checks(run_dir: Path) -> RowChecks:
    """Every valid checks file of a run, keyed by its row (dataset, target, defense). With a plan that
    lists the rows' checks hashes, only files of the current plan: a file computed under another
    plan is stale, one that fails to verify corrupt; both are left out and named in ``excluded``."""
    run_dir = Path(run_dir)
    plan_path = run_dir / "plan.json"
    hashes = {}
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        hashes = {r["row"]: r["checks_hash"] for r in plan.get("rows", [])}
    out, excluded = {}, []
    for p in sorted((run_dir / "checks").glob("*.json")):
        try:
            rec = read_checks(p)
        except RecordError as exc:
            excluded.append(f"{'corrupt' if 'checksum' in str(exc) else 'unreadable'}: {exc}; left out (a run of the "
                            "config recomputes it)")
            continue
        if p.stem in hashes and rec.row_hash != hashes[p.stem]:
            excluded.append(f"stale: checks file {p} was computed under another plan; left out (a run of the config "
                            "recomputes it)")
            continue
        out[rec.row] = rec
    return RowChecks(out, excluded)


def flag_text(check: ChecksRecord | None, cell_masked: bool = False) -> str:
    """The table's Checks cell: failed checks by name, ``no flag (n=...)`` (none raised on those n
    images: not a proof of robustness), or ``n/a`` when not run."""
    flags = list(check.flags) if check else []
    if cell_masked and "zero-grad" not in flags:  # a cell's own gradient check (every gradient attack runs one)
        flags.insert(0, "zero-grad")
    if flags:
        return ", ".join(f for f in FLAGS if f in flags)
    return f"no flag (n={check.results.n})" if check else "n/a"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _pair(p: Paired) -> str:
    """Two accuracies and the paired test's p-value: '62.5 / 50.0 (p 0.03)'."""
    return f"{_pct(p.accuracy[0])} / {_pct(p.accuracy[1])} (p {p.p_value:.2g})"


def checks_markdown(checks: dict[RowKey, ChecksRecord]) -> str:
    """The figures behind the flags, one line per row."""
    out = ["# Gradient-masking checks\n", LEGEND, "",
           "Columns (accuracy in %, on the row's first n evaluation images; a stochastic row's: correct under every "
           "scoring draw; each pair with the exact McNemar p-value of the paired comparison):", "",
           "- **Clean / target**: the row's clean accuracy and the target classifier's alone.",
           "- **Zero grad**: share of images with a zero input gradient.",
           "- **PGD few / more**: PGD with the base and the larger number of steps (`checks.steps`, `more_steps`).",
           "- **eps sweep**: PGD at eps times each multiplier of the config's `checks.eps_multipliers` (default "
           "x2, x4, x8; a smoke config shortens it), which must fall towards chance.",
           "- **FGSM / PGD**, **Noise / PGD**: one FGSM step, and random sign noise, against PGD.",
           "- **Square / white-box**: the gradient-free Square attack against the per-sample worst case of both PGD "
           "runs.",
           "- **Transfer / white-box**: PGD crafted on the classifier alone (or the BPDA surrogate) against the same.",
           "- **EOT E / 2E**: EOT-PGD with the row's own E (the largest among its attacks) and with twice it.",
           "- **Spread**: the largest minus the smallest accuracy over repeated PGD runs with other seeds (how much "
           "one evaluation of this random row varies).",
           "- **Random / fixed**: PGD against the random defense, and with its randomness frozen for attack and "
           "scoring (a deterministic white-box attacker).",
           "",
           "| Dataset | Target | Defense | n | Flags | Clean / target | Zero grad | PGD few / more | eps sweep "
           "| FGSM / PGD | Noise / PGD | Square / white-box | Transfer / white-box | EOT E / 2E | Spread "
           "| Random / fixed |",
           "|---|---|---|---:|---|---|---:|---|---|---|---|---|---|---|---:|---|"]
    for row, rec in checks.items():
        r = rec.results
        eot, transfer, fixed, deg = r.eot, r.transfer, r.fixed, r.degenerate
        out.append(" | ".join([
            f"| {row.dataset}", row.target, row.defense, str(r.n), flag_text(rec),
            _pct(deg.clean) + (f" / {_pct(deg.target_clean)}" if deg.target_clean is not None else ""),
            _pct(r.gradient.zero_gradient_fraction) if r.gradient.finite else "non-finite",
            _pair(r.steps.comparison),
            " > ".join(_pct(a) for a in r.eps.accuracy) + f" (eps x1..x{r.eps.eps[-1] / r.eps.eps[0]:g})",
            _pair(r.fgsm.comparison), _pair(r.noise.comparison), _pair(r.square.comparison),
            "; ".join(f"{_pair(p)} ({k})" for k, p in transfer.comparisons.items()) if transfer else "-",
            f"{_pair(eot.comparison)}, E = {eot.samples[0]}" if eot else "-",
            _pct(eot.spread) if eot else "-",
            _pair(fixed.comparison) if fixed else "-",
        ]) + " |")
    notes = [f"- {row.defense}: degenerate: {'; '.join(rec.results.degenerate.reasons)}"
             for row, rec in checks.items() if rec.results.degenerate.failed]
    if notes:
        out += ["", *notes]
    active = active_markdown(checks)
    if active:
        out += ["", "## The binarization test", "", active]
    return "\n".join(out) + "\n"


ACTIVE_LEGEND = (
    "The binarization test (Zimmermann, Brendel, Tramèr and Carlini, NeurIPS 2022) per row: around each of the "
    "first n test images it replaces the classifier's head by a linear readout of the row's own features of "
    "purified images that puts the image and points near it in class 0 and one point at distance exactly eps in "
    "class 1, so an adversarial example inside the threat ball exists by construction; then it runs the row's "
    "attack from the image. **Success**: the share of samples with a valid readout where the attack found one "
    "(95% Wilson interval); a perfect attack finds them all. **Result**: `fail` when that share is significantly "
    "below {threshold:.0%} (one-sided exact binomial test, p < {alpha:g}): the attack is too weak for this defense "
    "and the row's accuracies overstate its robustness; `pass` otherwise (no proof that the attack is strong "
    "enough on the real task); `inconclusive`: a pass that means little (too few valid readouts for any result to "
    "fail, or random points of the ball already cross half the time or more); `untestable` when no readout was valid (the row's features do not separate the "
    "boundary point from the ball around the image, or a random row's fresh draws do not keep the readout's "
    "classes: the test cannot be set up for it, which says nothing for or against the attack). **Random**: the "
    "share (%) of points drawn uniformly from the eps-ball that the binarized model already puts in class 1 (the "
    "reference's check of how easy the test is: near 0 a pass means something, near 100 nothing). **Invalid** "
    "readouts are counted with their reasons, never hidden.")


def active_markdown(checks: dict[RowKey, ChecksRecord]) -> str:
    """One line per row with a binarization test (empty when none had it)."""
    tested = {row: rec.results.active for row, rec in checks.items() if rec.results.active is not None}
    if not tested:
        return ""
    first = next(iter(tested.values()))
    out = [ACTIVE_LEGEND.format(threshold=first.threshold, alpha=first.alpha), "",
           "| Dataset | Target | Defense | Attack | Samples | Valid readouts | Success (95% CI) | p | Result "
           "| Random | Invalid readouts, why |",
           "|---|---|---|---|---:|---:|---|---:|---|---:|---|"]
    for row, r in tested.items():
        lo, hi = r.interval()
        success = (f"{r.successes}/{len(r.valid)} = {_pct(r.success_rate)} [{_pct(lo)}, {_pct(hi)}]"
                   if r.testable else "-")
        why = r.error or "; ".join(f"{k} ({c})" for k, c in r.reasons().items()) or "-"
        out.append(" | ".join([f"| {row.dataset}", row.target, row.defense, r.attack, str(len(r.samples)),
                               str(len(r.valid)), success, f"{r.p_value:.2g}" if r.testable else "-", r.verdict,
                               _pct(r.random_rate) if r.random_rate is not None else "-", why]) + " |")
    return "\n".join(out) + "\n"
