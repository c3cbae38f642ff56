"""``run CONFIG --plan``: what a run would compute and train, and what it would cost on one H100,
without loading data, training, attacking or writing anything.

The estimate multiplies counts the config fixes (epochs, training images, evaluation images, attack
steps, EOT samples, scoring draws) by the per-unit figures of ``benchmark/costs.yaml``, each of which
says whether it was measured (and where) or is a guess; a stage whose estimate uses a guess is marked.
It is for sizing a job (does this part fit a 10-minute slot?), not a promise: small batches, compile
and a different GPU move the real figure. On a CPU each stage's estimate is scaled by a factor
measured on the default smoke run (``cpu_*`` in ``costs.yaml``): good at smoke sizes, and what a
CPU run's remaining time starts from.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import yaml

from benchmark.errors import BenchError
from benchmark.experiment import (
    AttackSpec,
    DatasetSpec,
    DefenseSpec,
    TargetSpec,
    build_attack,
    defense_key,
    target_key,
)
from benchmark.registry import DEFENSES

COSTS = Path(__file__).with_name("costs.yaml")


@dataclass(frozen=True)
class Figure:
    value: float
    guess: bool


class Costs:
    """The figures of ``costs.yaml``: ``get(section, key, field)`` falls back to the section's
    ``default`` entry (a guess when the key has no entry of its own). Each entry is ``measured``
    (where), ``derived`` (from which measured figures and counts) or ``guess: true``; ``used``
    remembers which entries a plan read and how (``measured``, ``derived``, ``guess``, or
    ``default`` for a key that has no entry of its own)."""

    def __init__(self, path: Path = COSTS) -> None:
        try:
            self.table = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise BenchError(f"{path}: cannot read the cost table ({exc})") from None
        self.used: dict[str, str] = {}

    def get(self, section: str, key: str | None = None, field: str = "s") -> Figure:
        entries = self.table[section]
        if key is None:
            entry, fallback, name = entries, False, section
        elif key in entries:
            entry, fallback, name = entries[key], False, f"{section}.{key}"
        else:
            entry, fallback, name = entries["default"], True, f"{section}.{key}"
        guess = bool(entry.get("guess")) or fallback
        self.used[name] = "default" if fallback else "guess" if guess else \
            "derived" if "derived" in entry else "measured"
        return Figure(float(entry[field]), guess)

    def guessed(self) -> list[str]:
        """The entries read so far that are guesses (a key without an entry: ``section.key (default)``)."""
        return sorted(f"{k} (default)" if v == "default" else k for k, v in self.used.items()
                      if v in ("guess", "default"))


@dataclass
class Stage:
    kind: str  # data, pairs, target, defense, checks, cells
    what: str
    seconds: float
    guess: bool
    detail: str = ""
    parts: dict[str, float] = field(default_factory=dict)  # a cells stage: each cell's share, by cell id
    about: str = ""  # what the stage's CPU factor is keyed by: the row's defense, the target's method

    def on_cpu(self, costs: Costs) -> Stage:
        """The stage on a 2-core CPU: its H100 seconds times the factor ``costs.yaml`` gives its kind
        and defense (or target method), measured on the default smoke run (``cpu_*`` sections)."""
        if f"cpu_{self.kind}" not in costs.table:  # data: read as on a GPU machine; pairs: not measured apart
            return self if self.kind == "data" else replace(self, guess=True)
        factor = costs.get(f"cpu_{self.kind}", self.about or "default", "x")
        return replace(self, seconds=self.seconds * factor.value, guess=self.guess or factor.guess,
                       parts={k: v * factor.value for k, v in self.parts.items()})


class Estimate:
    """Sums figures, remembering whether any of them was a guess."""

    def __init__(self) -> None:
        self.seconds, self.guess = 0.0, False

    def add(self, figure: Figure, times: float = 1.0) -> Estimate:
        self.seconds += figure.value * times
        self.guess = self.guess or figure.guess
        return self

    def scale(self, figure: Figure) -> Estimate:
        self.seconds *= figure.value
        self.guess = self.guess or figure.guess
        return self


class Planner:
    def __init__(self, runner, costs: Costs | None = None) -> None:
        self.runner, self.cfg, self.costs = runner, runner.cfg, costs or Costs()
        self.pretrainings: set[str] = set()  # DIR rows with one architecture and pre-training share it (per plan)
        self._cards: dict[tuple[str, str], dict | None] = {}

    # -- counts ---------------------------------------------------------------------------
    def train_images(self, ds: DatasetSpec) -> tuple[int, bool]:
        full = self.costs.get("train_images", ds.name, "n")
        return (min(ds.n_train, int(full.value)) if ds.n_train else int(full.value)), full.guess

    def eval_images(self, ds: DatasetSpec, spec: DefenseSpec) -> int:
        n = self.cfg.eval.n or int(self.costs.get("test_images", ds.name, "n").value)
        return min(n, spec.eval_n) if spec.eval_n else n

    def pass_us(self, spec: DefenseSpec, gradient: bool = True) -> Figure:
        """Per-image microseconds of one pass: with an input gradient (an attack's step), or a
        prediction (``gradient=False``; the EBM averages ``chains`` there, ``attack_chains`` in an
        attack's step)."""
        figure = self.costs.get("pass_us", spec.registered, "us")
        if spec.registered == "ebm":  # per Langevin step and chain
            steps, chains = spec.options.get("steps", 1500), spec.options.get("chains", 150)
            if gradient:
                chains = spec.options.get("attack_chains") or chains
            return Figure(figure.value * steps * chains, figure.guess)
        return figure

    def pass_latency_ms(self, spec: DefenseSpec) -> Figure:
        figure = self.costs.get("pass_ms", spec.registered, "ms")
        if spec.registered == "ebm":  # per Langevin step: the chains run as one batch
            return Figure(figure.value * spec.options.get("steps", 1500), figure.guess)
        return figure

    def pass_seconds(self, spec: DefenseSpec, n: int, gradient: bool = True) -> Figure:
        """Seconds of one forward + input-gradient pass of ``n`` images through the defended model, in
        batches of ``eval.batch_size``: each batch its images times the per-image cost, but never less
        than the defense's latency per pass (``pass_ms``: a small batch does not fill the GPU, and the
        purifiers' loops run in sequence). ``gradient=False``: a prediction, the defense's
        ``predict_share`` of that (a third where only the networks' forward runs; all of it where the
        purification takes gradients itself or runs an SVD, as the EBM, AID-Purifier and ME-Net do)."""
        per_image, floor = self.pass_us(spec, gradient), self.pass_latency_ms(spec)
        size = self.cfg.eval.batch_size
        size = n if size == "auto" else max(1, min(int(size), n))
        seconds = math.ceil(n / size) * max(size * per_image.value * 1e-6, floor.value * 1e-3)
        guess = per_image.guess or floor.guess
        if not gradient:
            share = self.costs.get("predict_share", spec.registered, "x")
            seconds, guess = seconds * share.value, guess or share.guess
        return Figure(seconds, guess)

    def attack_passes(self, spec: AttackSpec, stochastic: bool) -> tuple[float, bool]:
        """Forward + input-gradient passes per image (Square's queries: a third each)."""
        if spec.registered == "worst-of":
            members = [AttackSpec(**m) for m in build_attack(spec).params.attacks]
            parts = [self.attack_passes(m, stochastic) for m in members]
            return sum(p for p, _ in parts), any(g for _, g in parts)
        p = build_attack(spec).params
        steps = getattr(p, "steps", None)
        name = spec.registered
        if name == "clean":
            return 0.0, False
        if name == "square":
            return p.n_queries / 3, False
        if steps is None:
            return 10.0, True
        if name in ("pgd", "eot-pgd"):
            return steps * getattr(p, "restarts", 1) * getattr(p, "eot", 1), False
        if name == "vni-fgsm":
            return steps * (p.neighbors + 1), False
        if name in ("bpda-eot", "adaptive"):
            return steps * (p.eot_samples if stochastic else 1), False
        if name == "representation":
            return steps + (p.source_steps if p.source == "pgd" else 0), False
        if name in ("mi-fgsm", "mask-adaptive", "noise-discard", "ssp"):
            return float(steps), False
        return float(steps), True  # a plugin attack: its steps, one pass each (a guess)

    def active_cost(self, est: Estimate, ds, spec: DefenseSpec, stochastic: bool, draws: int) -> str:
        """Adds a row's binarization test to ``est``; says what it costs per sample. Per sample, one at
        a time: the features of its inner and boundary points (``feature_draws`` times on a random row).
        Then, all samples at once: the readouts' check on fresh passes, the random points, the attack."""
        from benchmark.runner import active_attack

        a = self.cfg.eval.checks.active
        name, attack = active_attack(self.cfg, spec)
        k = min(a.n, self.eval_images(ds, spec))
        reps = a.feature_draws if stochastic else 1
        chosen = next((x for x in self.cfg.attacks if x.name == name), None)
        if chosen is not None:
            per, guess = self.attack_passes(chosen, stochastic)
        else:  # the checks' own PGD: steps x EOT samples
            per, guess = float(attack.params.steps * attack.params.eot), False
        est.add(self.pass_seconds(spec, a.inner_points + 2, gradient=False), k * reps)
        est.add(self.pass_seconds(spec, 2 * k, gradient=False), draws)
        if a.random_points:
            est.add(self.pass_seconds(spec, a.random_points, gradient=False), k * draws)
        est.add(self.pass_seconds(spec, k), per).add(self.pass_seconds(spec, k, gradient=False), draws)
        est.guess = est.guess or guess
        return (f"binarization test ({name}): per sample {(a.inner_points + 2) * reps} feature passes, "
                f"{a.random_points} random points and {per:g} attack passes; {k} samples")

    # -- artifacts ------------------------------------------------------------------------
    @cached_property
    def artifacts(self) -> Path:
        return self.runner.out / "artifacts"

    def target_card(self, ds: DatasetSpec, target: TargetSpec) -> dict | None:
        """The card of the target's trained artifact in the run folder (or of its checkpoint), if
        there is one; its weights are not read. Read once per target."""
        if (ds.name, target.name) not in self._cards:
            self._cards[ds.name, target.name] = self._read_target_card(ds, target)
        return self._cards[ds.name, target.name]

    def _read_target_card(self, ds: DatasetSpec, target: TargetSpec) -> dict | None:
        if target.checkpoint is not None:
            from benchmark.checkpoint import read_card

            return read_card(target.checkpoint)
        if target.train is None:
            return None  # a pretrained model: its hash is known only once it is loaded
        card = self.artifacts / "targets" / f"{ds.name}-{target.name}-{target_key(ds, target, self.cfg.seed)}.json"
        try:
            return json.loads(card.read_text())
        except (OSError, ValueError):
            return None

    def defense_artifact(self, ds: DatasetSpec, spec: DefenseSpec, target: TargetSpec) -> tuple[str, bool]:
        """(the defense's artifact key, whether the run folder holds it). Before its target is
        trained the key stands on a placeholder for the target's hash: rows that share one training
        (NRP and NRP-dynamic) still get the same key."""
        against = next(t for t in self.cfg.targets if t.name == (spec.trained_against or target.name))
        card = self.target_card(ds, against) or {}
        key = defense_key(ds, spec, card.get("sha256", f"to be trained: {against.name}"), self.cfg.seed)
        return key, "sha256" in card and any((self.artifacts / "defenses").glob(f"{ds.name}-*-{key}.json"))

    # -- stages ---------------------------------------------------------------------------
    def stages(self, cpu: bool = False) -> list[Stage]:
        """Every stage the run would go through, in order, with its estimate on one H100 (``cpu``: on
        a 2-core CPU, see :meth:`Stage.on_cpu`)."""
        stages = self._stages()
        return [s.on_cpu(self.costs) for s in stages] if cpu else stages

    def _stages(self) -> list[Stage]:
        cfg, costs = self.cfg, self.costs
        self.pretrainings = set()  # (each call plans the run afresh)
        pending = {c.cell_id for c in self.runner.pending()}
        out: list[Stage] = []
        for ds in cfg.datasets:
            cells_here = [c for c in self.runner.cells if c.dataset is ds]
            if not any(c.cell_id in pending for c in cells_here) and not any(
                    self.runner.needs_checks(ds, t, d) for t in cfg.targets for d in cfg.defenses):
                continue
            split = costs.get("test_images", ds.name, "n")
            if not split.guess and (cfg.eval.n or 0) > split.value:  # what preflight says after loading the data
                raise BenchError(f"eval.n={cfg.eval.n} is larger than the {ds.name} test split ({int(split.value)} "
                                 "examples)")
            data = costs.get("data", ds.name)
            out.append(Stage("data", ds.name, data.value, data.guess))
            images, images_guess = self.train_images(ds)
            frac = images / 50_000
            pairs_needed, keys = set(), set()
            for target in cfg.targets:
                if target.train is not None and self.target_card(ds, target) is None:
                    est = self.target_estimate(target, images)
                    out.append(Stage("target", f"{ds.name}/{target.name}", est.seconds, est.guess or images_guess,
                                     f"{target.train.method}, {target.train.epochs} epochs, {images:,} images",
                                     about=target.train.method))
                for spec in cfg.defenses:
                    row = [c for c in cells_here if c.target is target and c.defense is spec]
                    if not row:
                        continue
                    cls = DEFENSES.get(spec.registered)
                    trains_here = (cls.trainable and spec.checkpoint is None
                                   and (spec.trained_against or target.name) == target.name)
                    if trains_here:
                        key, done = self.defense_artifact(ds, spec, target)
                        if not done and key not in keys:
                            keys.add(key)
                            if uses_static_pairs(spec):
                                pairs_needed.add(target.name)
                            out.append(self.defense_stage(ds, spec, frac, images_guess, target.name))
                    out += self.row_stages(ds, target, spec, [c for c in row if c.cell_id in pending])
            for name in sorted(pairs_needed):
                pairs = costs.get("static_pairs_50k")
                out.append(Stage("pairs", f"{ds.name}/{name}", pairs.value * frac, pairs.guess,
                                 "PGD-5 pairs the denoisers share"))
        return out

    def target_estimate(self, target: TargetSpec, images: int) -> Estimate:
        """A target's training: per epoch, the 50k-image figure scaled to ``images`` but never less
        than its steps at the per-step floor; times the architecture factor and, for a deterministic
        training, determinism's cost."""
        t, costs = target.train, self.costs
        epoch = costs.get("target_epoch_50k", t.method)
        floor = costs.get("target_step_ms", t.method, "ms")
        per_epoch = max(epoch.value * images / 50_000, math.ceil(images / t.batch_size) * floor.value * 1e-3)
        est = Estimate().add(Figure(per_epoch, epoch.guess or floor.guess), t.epochs)
        est.scale(costs.get("arch_factor", target.arch, "x"))
        if t.deterministic:
            est.scale(costs.get("deterministic_factor", field="x"))
        return est

    def defense_stage(self, ds: DatasetSpec, spec: DefenseSpec, frac: float, images_guess: bool,
                      target: str = "") -> Stage:
        costs, name = self.costs, spec.registered
        opts = spec.train_config()
        epoch = costs.get("defense_epoch_50k", name)
        est = Estimate()
        if name == "ebm":
            iterations = opts.iterations
            est.add(epoch, iterations * opts.mcmc_steps / 20)
            detail = f"{iterations} iterations of {opts.mcmc_steps} Langevin steps"
        else:
            epochs = getattr(opts, "epochs", 1)
            factor = opts.attack_steps / 7 if name == "menet-a" else 1.0
            est.add(epoch, epochs * frac * factor)
            detail = f"{epochs} epoch{'' if epochs == 1 else 's'}"
            fields = getattr(DEFENSES.get(name), "PRETRAIN_FIELDS", None)  # a defense with a shared pre-training
            if fields and opts.pretrain_epochs:
                # one pre-training per dataset, target, defense, options and pre-training options
                shared = json.dumps([ds.name, target, name, spec.options, [getattr(opts, k) for k in fields]],
                                    sort_keys=True, default=str)
                if shared in self.pretrainings:
                    detail = f"{epochs} main epochs (pre-training shared with an earlier row)"
                else:
                    self.pretrainings.add(shared)
                    est.add(costs.get("pretrain_epoch_50k", name), opts.pretrain_epochs * frac)
                    if name == "dir-official":  # its fixed PGD examples against the target
                        est.add(costs.get("static_pairs_50k"), frac * opts.pretrain_attack_steps / 5)
                    detail = f"{opts.pretrain_epochs} pre-training + {epochs} main epochs"
        return Stage("defense", f"{ds.name}/{spec.name}", est.seconds, est.guess or images_guess, detail,
                     about=name)

    def autoattack(self, n: int, spec: DefenseSpec, stochastic: bool) -> tuple[Figure, float]:
        """(seconds figure, times) of one AutoAttack cell on ``n`` images (see costs.yaml)."""
        aa = self.costs.get
        if stochastic:
            passes = aa("autoattack", "rand_passes", "x")
            return self.pass_seconds(spec, n), passes.value
        pass_s = self.pass_us(spec)
        ratio = pass_s.value / aa("pass_us", "none", "us").value
        est = Estimate().add(aa("autoattack", "fixed_s")).add(aa("autoattack", "per_image_s"), n)
        return Figure(est.seconds * max(1.0, math.sqrt(ratio)), est.guess or pass_s.guess), 1.0

    def row_stages(self, ds, target, spec: DefenseSpec, cells: list) -> list[Stage]:
        stages = []
        stochastic = DEFENSES.get(spec.registered).stochastic_with(spec.options)
        overhead = self.costs.get("cell_overhead")
        row = f"{ds.name}/{target.name}/{spec.name}"
        if self.runner.needs_checks(ds, target, spec):
            from benchmark.masking import DEFAULT_EOT
            from benchmark.runner import row_eot, runs_active

            c = self.cfg.eval.checks
            # PGD few and more, the eps sweep, one FGSM step; Square's queries and the noise baseline
            # are predictions; each check's images are scored with the row's draws
            passes = c.steps + c.more_steps + c.steps * len(c.eps_multipliers) + 1
            passes += c.steps if c.transfer else 0
            scored = 5 + len(c.eps_multipliers) + (1 if c.transfer else 0)
            if stochastic:  # EOT-PGD with the row's own E and 2E, repeats, PGD with the randomness fixed
                e = c.eot if c.eot != "auto" else (row_eot(self.cfg, spec) or DEFAULT_EOT)
                passes += c.steps * 3 * e + (c.repeats - 1) * c.steps + (c.steps if c.fixed_randomness else 0)
                scored += 2 + (c.repeats - 1) + (1 if c.fixed_randomness else 0)
            n_checks = min(c.n, self.eval_images(ds, spec))
            draws = self.cfg.draws if stochastic else 1
            est = Estimate().add(self.pass_seconds(spec, n_checks), passes)
            est.add(self.pass_seconds(spec, n_checks, gradient=False), c.square_queries + 1 + scored * draws)
            est.add(self.costs.get("checks_overhead", "stochastic" if stochastic else "deterministic"))
            detail = ""
            if runs_active(self.cfg, spec):
                detail = self.active_cost(est, ds, spec, stochastic, draws)
            stages.append(Stage("checks", row, est.seconds, est.guess, detail, about=spec.registered))
        if cells:
            n = self.eval_images(ds, spec)
            draws = self.cfg.draws if stochastic else 1
            est, names = Estimate(), []
            one, predict = self.pass_seconds(spec, n), self.pass_seconds(spec, n, gradient=False)
            parts = {}
            for cell in cells:
                before = est.seconds
                est.add(overhead)
                names.append(cell.attack.name)
                if cell.attack.registered == "autoattack":
                    figure, times = self.autoattack(n, spec, stochastic)
                    members = cell.attack.params.get("attacks")
                    if members:  # a subset of the version's attacks: their share of it (a guess)
                        from attacks.autoattack import SEQUENCES, version_for

                        version = version_for(cell.attack.params.get("version", "auto"), stochastic)
                        figure = Figure(figure.value * len(members) / len(SEQUENCES[version]), True)
                    est.add(figure, times)
                else:
                    passes, guess = self.attack_passes(cell.attack, stochastic)
                    if cell.attack.registered == "square":  # queries: predictions
                        est.add(predict, build_attack(cell.attack).params.n_queries)
                    else:
                        est.add(Figure(one.value, one.guess or guess), passes)
                    # the draws score the returned images and, but for clean, the attack's best iterate
                    est.add(predict, draws * (1 if cell.attack.registered == "clean" else 2))
                parts[cell.cell_id] = est.seconds - before
            stages.append(Stage("cells", row, est.seconds, est.guess, f"{len(cells)}: {', '.join(names)}", parts,
                                about=spec.registered))
        return stages


def uses_static_pairs(spec: DefenseSpec) -> bool:
    return getattr(spec.train_config(), "pairs", None) == "static"


class RunProgress:
    """A run's remaining time, weighted by what each stage is expected to cost: the plan's
    estimates (for one H100; on the CPU, times its factors), scaled by the speed this run has shown so far on stages of
    the same kind (training, or evaluation: checks and cells), so that a minute-long AutoAttack
    cell counts for more than a clean one. Stages are keyed as the plan names them (a defense
    trained for several targets has one entry per training); a cell by its id. Stages run one
    after the other: the time since the previous mark belongs to the stage just finished, and
    a stage that failed or was left to another worker is skipped without charging its time."""

    TRAINING = ("target", "defense", "pairs")

    def __init__(self, stages: list[Stage], cells: int) -> None:
        self.left: dict[tuple[str, str], list[float]] = {}
        for s in stages:
            if s.kind == "cells":
                for cid, sec in s.parts.items():
                    self.left.setdefault(("cell", cid), []).append(sec)
            elif s.kind != "data":  # loaded before the run starts
                self.left.setdefault((s.kind, s.what), []).append(s.seconds)
        self.cells, self.cells_done = cells, 0
        self.spent = {"train": 0.0, "eval": 0.0}  # seconds measured, per group
        self.estimated = {"train": 0.0, "eval": 0.0}  # the plan's seconds of what they covered
        self.mark = time.monotonic()
        self.lock = threading.Lock()  # the heartbeat thread reads while the run marks

    @classmethod
    def of(cls, runner, pending: int) -> RunProgress | None:
        """For a run of the whole matrix; None when the plan cannot be estimated (it is only a display)."""
        try:
            return cls(Planner(runner).stages(cpu=runner.device.type == "cpu"), pending)
        except Exception:  # noqa: BLE001 - an estimate that fails must not stop the run
            return None

    @classmethod
    def group(cls, kind: str) -> str:
        return "train" if kind in cls.TRAINING else "eval"

    @property
    def done_estimate(self) -> float:
        return sum(self.estimated.values())

    def _pop(self, kind: str, what: str) -> float | None:
        queue = self.left.get((kind, what))
        if not queue:
            return None
        sec = queue.pop(0)
        if not queue:
            del self.left[(kind, what)]
        return sec

    def done(self, kind: str, what: str) -> None:
        """The stage finished: its time counts towards its group's speed."""
        with self.lock:
            now = time.monotonic()
            sec = self._pop(kind, what)
            if sec is not None:
                g = self.group(kind)
                self.estimated[g] += sec
                self.spent[g] += now - self.mark
            self.mark = now
            if kind == "cell":
                self.cells_done += 1

    def skip(self, kind: str, what: str) -> None:
        """The stage will not run here (failed, or another worker holds it): forget it, time included."""
        with self.lock:
            if self._pop(kind, what) is not None and kind == "cell":
                self.cells_done += 1
            self.mark = time.monotonic()

    def remaining_seconds(self) -> float | None:
        with self.lock:
            total_spent = sum(self.spent.values())
            if self.done_estimate <= 0 or total_spent < 1:
                return None
            overall = total_spent / self.done_estimate
            left = 0.0
            for (kind, _), queue in self.left.items():
                g = self.group(kind)
                left += sum(queue) * (self.spent[g] / self.estimated[g] if self.estimated[g] > 0 else overall)
            return left

    def text(self) -> str:
        """e.g. "about 3 min 10 s left" ("" until something has finished)."""
        from benchmark.logs import duration

        left = self.remaining_seconds()
        return "" if left is None else f"about {duration(left)} left"

    def cell_text(self) -> str:
        eta = self.text()
        return f"{self.cells_done}/{self.cells} cells" + (f", {eta}" if eta else "")


def data_line(ds) -> str:
    """Where a config's dataset entry reads from, and whether the data is there (nothing is read)."""
    from benchmark.registry import DATASETS

    meta = DATASETS.metadata(ds.name)
    label = f"data {ds.name}" + (f" ({meta['copy']})" if meta.get("copy") else "")
    locate = meta.get("locate")
    if locate is None:
        return f"{label}: a dataset without a known location; its presence is not checked"
    where, present = locate(ds.root, ds.download)
    if present:
        return f"{label}: reads {where} (present)"
    if not meta.get("downloadable"):
        return f"{label}: reads {where} (MISSING: the run stops there; this copy cannot be downloaded)"
    if ds.download:
        return f"{label}: reads {where} (missing: download: true fetches it, needs internet)"
    return f"{label}: reads {where} (MISSING: the run stops there; download: true fetches it)"


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 7200 else f"{seconds / 60:.1f} min"


def cluster_wall(stages: list[Stage], gpus: int = 8) -> tuple[float, tuple[str, float]]:
    """(wall seconds of the cluster path on ``gpus`` GPUs, (its longest job, seconds)): three job
    arrays one after the other (targets; defense trainings with their pairs; rows, each its checks
    then its cells), each array's jobs placed longest first on the GPU that frees up first."""
    phases: dict[str, dict[str, float]] = {"target": {}, "defense": {}, "row": {}}
    for s in stages:
        if s.kind == "data":  # each job reads its data: seconds, left out
            continue
        phase = {"target": "target", "defense": "defense", "pairs": "defense"}.get(s.kind, "row")
        # a row's checks and cells are one job; every training its own (one name may train twice)
        job = f"row {s.what}" if phase == "row" else f"{s.kind} {s.what}" + " " * len(phases[phase])
        phases[phase][job] = phases[phase].get(job, 0.0) + s.seconds
    wall = 0.0
    for jobs in phases.values():
        free = [0.0] * gpus
        for seconds in sorted(jobs.values(), reverse=True):
            free[free.index(min(free))] += seconds
        wall += max(free)
    longest = max(((job.rstrip(), sec) for jobs in phases.values() for job, sec in jobs.items()),
                  key=lambda j: j[1], default=("", 0.0))
    return wall, longest


def cluster_lines(stages: list[Stage], limit: float = 24 * 3600) -> list[str]:
    """For a run over a day on one H100: the cluster path's wall time on 8 GPUs, and a job that
    would outlast Slurm's default time limit (``--time-min``, 24 h)."""
    total = sum(s.seconds for s in stages)
    if total <= limit:
        return []
    wall, (job, seconds) = cluster_wall(stages)
    lines = [f"over a day on one H100: through --executor slurm (job arrays: targets, then defense trainings, "
             f"then one job per row), about {hours(wall)} wall on 8 GPUs"]
    if seconds > limit:
        lines.append(f"its longest job, {job} ({hours(seconds)}), outlasts the jobs' default 24 h limit: give "
                     "--time-min, or submit again after a timeout (trainings resume from their last epoch, "
                     "finished cells are kept)")
    return lines


PART_LIMIT_S = 480  # a part of a config fits a short GPU job: at most 8 minutes on one H100


def part_folder(cfg, part: str) -> Path:
    """Where ``run CONFIG --part PART`` writes by default."""
    from benchmark.paths import REPO_ROOT

    return REPO_ROOT / "results" / f"{cfg.name}-{part}"


def merge_command(cfg) -> str:
    """The command that merges the parts of ``cfg`` from their default folders."""
    from benchmark.paths import REPO_ROOT

    folders = " ".join(str(part_folder(cfg, p).relative_to(REPO_ROOT)) for p in cfg.parts)
    return f"python run_benchmark.py report {folders} --out results/{cfg.name}-merged"


def part_plans(cfg, config_path: str, costs: Costs | None = None) -> list[tuple[str, list[Stage]]]:
    """(part, its stages) for every part of ``cfg``, each planned in its default folder (what is
    recorded there already is not counted)."""
    from benchmark.experiment import select_part
    from benchmark.runner import Runner

    costs = costs or Costs()
    out = []
    for part in cfg.parts:
        sub = select_part(cfg, part, f"{config_path}: parts")
        runner = Runner(sub, part_folder(cfg, part), device="cpu", progress=False, plan_only=True)
        out.append((part, Planner(runner, costs).stages()))
    return out


def format_parts(cfg, config_path: str) -> str:
    """The parts of a config: each one's rows and estimate, the commands that run them and merge them."""
    lines = ["", f"parts: {len(cfg.parts)} jobs of at most {PART_LIMIT_S // 60} min each on one H100 (each trains "
             "its own copy of the targets it needs; merged, they are this config's tables)", "",
             "| part | rows | estimate (s, one H100) |", "|---|---|---:|"]
    for part, stages in part_plans(cfg, config_path):
        seconds = sum(s.seconds for s in stages)
        guess = " *" if any(s.guess for s in stages) else ""
        over = f" (over {PART_LIMIT_S} s)" if seconds > PART_LIMIT_S else ""
        lines.append(f"| {part} | {', '.join(cfg.parts[part])} | {seconds:,.0f}{guess}{over} |")
    lines += ["", f"run each:  python run_benchmark.py run {config_path} --part PART", f"merge:     {merge_command(cfg)}"]
    return "\n".join(lines)


def format_plan(runner, planner: Planner, config_path: str) -> str:
    stages = planner.stages()
    cells, pending = runner.cells, runner.pending()
    lines = [f"plan: {config_path} -> {runner.out} (profile {runner.cfg.profile}; nothing is loaded, trained or "
             f"written)",
             f"cells: {len(cells)} planned, {len(pending)} to compute, {len(cells) - len(pending)} already recorded"]
    trains = [s for s in stages if s.kind in ("target", "defense", "pairs")]
    lines.append("to train: " + ("; ".join(f"{s.kind} {s.what} ({s.detail})" if s.detail else f"{s.kind} {s.what}"
                                           for s in trains) or "nothing (every artifact is in the run folder)"))
    lines += [data_line(ds) for ds in runner.cfg.datasets]
    lines += ["", "| stage | what | estimate (s, one H100) | counts |", "|---|---|---:|---|"]
    for s in stages:
        lines.append(f"| {s.kind} | {s.what} | {s.seconds:,.0f}{' *' if s.guess else ''} | {s.detail} |")
    total = sum(s.seconds for s in stages)
    guessed = sum(s.seconds for s in stages if s.guess)
    lines += ["", f"total: about {hours(total)} ({total:,.0f} s) on one H100"
              + (f"; * = uses a guessed figure: {guessed:,.0f} s of it ({100 * guessed / total:.0f}%)"
                 if guessed else "; no stage rests on a guess")
              + f". Figures: {COSTS.relative_to(COSTS.parents[1])} (measured, derived from measured ones, or "
                "guessed; each says where from)."]
    if guessed:
        lines.append("guessed figures used: " + ", ".join(planner.costs.guessed()))
    lines += cluster_lines(stages)
    if runner.device.type == "cpu" and runner.cfg.profile == "smoke":
        on_cpu = [s.on_cpu(planner.costs) for s in stages]
        cpu = sum(s.seconds for s in on_cpu)
        lines.append(f"on a 2-core CPU (this run's device): about {cpu / 60:.1f} min ({cpu:,.0f} s)"
                     + (" *" if any(s.guess for s in on_cpu) else "")
                     + ", from each stage's CPU factor (measured on the default smoke run)")
    elif runner.device.type == "cpu":
        lines.append(f"on a CPU (this run's device): not estimated; the CPU factors hold at smoke sizes only, and a "
                     f"{runner.cfg.profile} config takes many times its H100 figure there")
    return "\n".join(lines)
