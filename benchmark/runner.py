"""The matrix runner: plan the cells, build what they need, run them, write one record each.

A cell is (dataset, target, defense, attack) under the config's threat model.
The runner validates everything up front (the config, then a preflight that
loads every evaluation split), trains or loads targets and defenses through the
content-keyed artifact cache only when some cell still needs them, and writes
each cell's record atomically. A rerun skips cells whose record exists, verifies
and matches the cell's hash (``force=True`` recomputes).
"""

from __future__ import annotations

import json
import logging
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from attacks.base import Threat
from benchmark import distributed
from benchmark.data import ImageData, load_dataset
from benchmark.errors import BenchError
from benchmark.experiment import (
    ARTIFACT_VERSION,
    AttackSpec,
    DatasetSpec,
    DefenseSpec,
    ExperimentConfig,
    TargetSpec,
    artifact_key,
    build_attack,
    data_identity,
    prepare_defense,
    prepare_target,
    target_identity,
    train_split,
    verify_checkpoints,
)
from benchmark.harness import SCORING_VERSION, run_attack
from benchmark.io import atomic_write_json
from benchmark.locks import OwnerLock, owner_info, sweep_stale_locks
from benchmark.logs import activity, heartbeat
from benchmark.masking import (
    CHECKS_VERSION,
    ChecksRecord,
    RowKey,
    check_determinism,
    run_checks,
    valid_checks,
    write_checks,
)
from benchmark.plan import RunProgress, uses_static_pairs
from benchmark.records import CellRecord, bit_string, count_string, valid_record, write_record
from benchmark.registry import ATTACKS, DEFENSES
from benchmark.runtime import fix_cublas_workspace, resolve_device, versions
from benchmark.stats import draw_scores, wilson_interval
from defenses.base import DefendedModel

log = logging.getLogger("purifybench")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


@dataclass
class Cell:
    dataset: DatasetSpec
    target: TargetSpec
    defense: DefenseSpec
    attack: AttackSpec
    cell_id: str
    cell_hash: str

    def key(self) -> dict:
        return {"dataset": self.dataset.name, "target": self.target.name, "defense": self.defense.name,
                "attack": self.attack.name}


def _on_main_first(build):
    """``build()`` on rank 0 first (it trains and writes the artifact), then on the other ranks (they
    load it); a failure on rank 0 is raised on every rank. Without torchrun: just ``build()``."""
    if not distributed.active():
        return build()
    error, result = None, None
    if distributed.is_main():
        try:
            result = build()
        except BenchError as exc:
            error = str(exc)
    error = distributed.broadcast(error)
    if error is not None:
        raise BenchError(error)
    if not distributed.is_main():
        result = build()
    distributed.barrier()
    return result


def row_description(cfg: ExperimentConfig, ds: DatasetSpec, target: TargetSpec, defense: DefenseSpec) -> dict:
    """What a row's results depend on (a cell adds its attack): the cell and checks hashes."""
    return {
        "v": ARTIFACT_VERSION, "dataset": data_identity(ds),
        "target": target_identity(target),
        "defense": {k: v for k, v in asdict(defense).items() if k != "targets" and not (k == "eval_n" and v is None)},
        "threat": asdict(cfg.threat), "n": cfg.eval.n, "seed": cfg.seed,
        **({"engine": engine} if (engine := cfg.eval.engine.changes_results()) else {}),
        # a defense whose outputs depend on the batch's other images: the batch is part of the identity
        **({"batch_size": cfg.eval.batch_size}
           if DEFENSES.get(defense.registered).batch_dependent_with(defense.options) else {}),
        **({"trained_against": target_identity(next(t for t in cfg.targets if t.name == defense.trained_against))}
           if defense.trained_against else {}),
    }


def row_draws(cfg: ExperimentConfig, defense: DefenseSpec) -> int:
    """Scoring draws of a row's cells: ``eval.draws`` for a stochastic defense, else one."""
    return cfg.draws if DEFENSES.get(defense.registered).stochastic_with(defense.options) else 1


def row_name(dataset: str, target: str, defense: str) -> str:
    """A row's file-name stem (its checks file, its lock)."""
    return "__".join(_slug(n) for n in (dataset, target, defense))


def row_id(ds: DatasetSpec, target: TargetSpec, defense: DefenseSpec) -> str:
    return row_name(ds.name, target.name, defense.name)


def checks_hash(cfg: ExperimentConfig, ds: DatasetSpec, target: TargetSpec, defense: DefenseSpec) -> str:
    checks, active = asdict(cfg.eval.checks), {}
    if cfg.eval.checks.active is not None:  # what the binarization test's attack runs with
        name, attack = active_attack(cfg, defense)
        active = {"active_attack": {"name": name, "registered": type(attack).__name__, "params": attack.describe()},
                  "active_version": ACTIVE_VERSION}
    else:  # without the test, the identity of checks made before it existed
        del checks["active"]
    return artifact_key(row_description(cfg, ds, target, defense) | {"checks": checks} | active
                        | {"scoring": SCORING_VERSION, "checks_version": CHECKS_VERSION, "draws": row_draws(cfg, defense)}
                        | ({"eot": row_eot(cfg, defense)} if cfg.eval.checks.eot == "auto" and row_draws(cfg, defense) > 1
                           and DEFENSES.get(defense.registered).stochastic_with(defense.options) else {}))


def _eot_counts(attack, stochastic: bool) -> list[int]:
    """The EOT sample counts an attack (a built one; a composite's parts too) takes against a row."""
    members = getattr(attack, "members", None)
    if members is not None:
        return [e for _, member in members for e in _eot_counts(member, stochastic)]
    params = attack.params
    if type(attack).__name__ == "AutoAttackWrapper":  # the rand version's APGD: 20 EOT iterations
        from attacks.autoattack import version_for

        return [20] if version_for(params.version, stochastic) == "rand" else []
    eot = getattr(params, "eot", None)
    if eot == "auto":
        eot = getattr(params, "eot_samples", None) if stochastic else None
    return [eot] if isinstance(eot, int) and eot > 1 else []


def row_eot(cfg: ExperimentConfig, defense: DefenseSpec) -> int | None:
    """The largest EOT sample count among a row's attacks (the EOT check doubles it), None when none of
    them takes EOT samples."""
    cls = DEFENSES.get(defense.registered)
    stochastic = cls.stochastic_with(defense.options)
    built = [build_attack(spec, f"attack {spec.name!r}") for spec in cfg.attacks
             if spec.only is None or defense.name in spec.only]
    counts = [e for attack in built if attack.applies(cls) for e in _eot_counts(attack, stochastic)]
    return max(counts) if counts else None


ACTIVE_VERSION = 2  # in a row's checks identity with the binarization test: bump when what it computes changes


def runs_active(cfg: ExperimentConfig, defense: DefenseSpec) -> bool:
    """Whether a row's checks include the binarization test: asked for, and not a row whose outputs
    depend on the batch (its readouts' features and its attack would see other batches)."""
    return cfg.eval.checks.active is not None and not DEFENSES.get(defense.registered).batch_dependent_with(
        defense.options)


def active_attack(cfg: ExperimentConfig, defense: DefenseSpec) -> tuple[str, object]:
    """The attack a row's binarization test holds to account, (its name, built): the config's
    ``checks.active.attack`` if named and run against the row, else the row's strongest gradient attack: among the config's
    PGD-family attacks on the whole model that run against the row (PGD, EOT-PGD, BPDA+EOT, Adaptive;
    not a DLR loss, which needs three classes), the one with the most gradient samples per image
    (steps x restarts x the EOT samples it takes against this row; on a tie, for a BPDA row the
    BPDA+EOT attack, else the first in the config). So a random row gets its EOT attack, a BPDA row
    its BPDA+EOT (through the surrogate, or exact where its parameters say so), any other row its
    longest PGD. With none of them in the config: PGD
    with the checks' ``more_steps`` (and the row's EOT samples on a random row)."""
    from benchmark.active import ATTACKS_FOR_IT
    from benchmark.masking import DEFAULT_EOT, _pgd

    spec = cfg.eval.checks.active
    cls = DEFENSES.get(defense.registered)
    if spec is not None and spec.attack != "auto":
        chosen = next(a for a in cfg.attacks if a.name == spec.attack)  # the config checked it names one
        built = build_attack(chosen, f"attack {chosen.name!r}")
        if (chosen.only is None or defense.name in chosen.only) and built.applies(cls):
            return chosen.name, built
        # a column that does not run against this row: the row's own strongest, as with auto
    stochastic = cls.stochastic_with(defense.options)
    bpda_row = not getattr(cls, "differentiable", True) or bool(getattr(cls, "prefers_bpda", False))
    best, budget = None, (0, False)
    for a in cfg.attacks:
        if a.registered not in ATTACKS_FOR_IT or (a.only is not None and defense.name not in a.only):
            continue
        built = build_attack(a, f"attack {a.name!r}")
        p = built.params
        if not built.applies(cls) or getattr(p, "loss", "ce") == "dlr":
            continue
        eot = (_eot_counts(built, stochastic) or [1])[0] if stochastic else 1
        # on a tie, a BPDA row prefers the attack built for it
        size = (p.steps * getattr(p, "restarts", 1) * eot, bpda_row and a.registered in ("bpda-eot", "adaptive"))
        if size > budget:
            best, budget = (a.name, built), size
    if best is not None:
        return best
    c = cfg.eval.checks
    eot = (row_eot(cfg, defense) or DEFAULT_EOT) if stochastic else 1
    return f"PGD-{c.more_steps}" + (f" (EOT {eot})" if eot > 1 else ""), _pgd(c.more_steps, cfg.threat.eps, eot)


FREE_FORM = ("params", "options", "train", "arch_options")  # config mappings with no fixed fields


LOCATIONS = {"root", "download", "model_dir"}  # where data and weights are read from: no number depends on it


def same_config(old, new, top: bool = True) -> bool:
    """Whether a folder's configuration (its manifest's ``config``) is ``new``: equal wherever both say
    something (a field a newer version added, with its default, is no difference), the report's
    options and the parts a config is split into aside (they change no number)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in old.keys() & new.keys():
            if (top and k in ("report", "parts")) or k in LOCATIONS:
                continue
            if k in FREE_FORM:  # a user's own mapping (an attack's params, a defense's options): whole
                if old[k] != new[k]:
                    return False
            elif not same_config(old[k], new[k], False):
                return False
        return True
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(same_config(a, b, False) for a, b in zip(old, new))
    return old == new


def plan_cells(cfg: ExperimentConfig) -> list[Cell]:
    """Every (dataset, target, defense, attack) whose attack applies to the defense (e.g. the
    mask-adaptive attack only to defenses that declare masks)."""
    cells = []
    attacks = [build_attack(a, f"attack {a.name!r}") for a in cfg.attacks]
    for ds in cfg.datasets:
        for target in cfg.targets:
            for defense in cfg.defenses:
                for attack, built in zip(cfg.attacks, attacks):
                    if not built.applies(DEFENSES.get(defense.registered)):
                        continue
                    if attack.only is not None and defense.name not in attack.only:
                        continue
                    if defense.targets is not None and target.name not in defense.targets:
                        continue
                    cell_id = "__".join(_slug(n) for n in (ds.name, target.name, defense.name, attack.name))
                    cell_hash = artifact_key(row_description(cfg, ds, target, defense) | {
                        "attack": {k: v for k, v in asdict(attack).items() if k != "only"}}
                        | ({"draws": draws} if (draws := row_draws(cfg, defense)) > 1 else {})
                        | ({"attack_version": v} if (v := getattr(ATTACKS.get(attack.registered), "version", 1)) > 1 else {})
                        | ({"members": built.member_versions()} if hasattr(built, "member_versions") else {})
                        | {"scoring": SCORING_VERSION})
                    cells.append(Cell(ds, target, defense, attack, cell_id, cell_hash))
    return cells


def describe_error(exc: BaseException) -> str:
    """One line for an error: the message of ours, the type and first line of anything else."""
    if isinstance(exc, BenchError):
        return str(exc)
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class _Builder:
    """Targets and defenses of one dataset, built (trained, or loaded from the artifact folder) once."""

    def __init__(self, runner: Runner, ds: DatasetSpec, train: bool, train_targets: bool | None = None) -> None:
        self.runner, self.ds = runner, ds
        self.train = train
        self.train_targets = train if train_targets is None else train_targets
        self.eval_set = runner.eval_sets[ds.name].to(runner.device)
        self.artifacts = runner.out / "artifacts"
        self._train_split: ImageData | None = None
        self._targets: dict[str, tuple] = {}
        self._failed: dict[str, str] = {}

    def train_data(self) -> ImageData:
        if self._train_split is None:
            self._train_split = train_split(self.ds, self.runner.cfg)
        return self._train_split

    def target(self, name: str) -> tuple:
        if name in self._failed:  # once per run, not again for every row in front of it
            raise BenchError(f"target {self.ds.name}/{name} failed earlier in this run: {self._failed[name]}")
        if name not in self._targets:
            r = self.runner
            spec = next(t for t in r.cfg.targets if t.name == name)
            try:
                with activity(f"preparing target {self.ds.name}/{name}"):
                    self._targets[name] = prepare_target(self.ds, spec, r.cfg, r.device, self.artifacts,
                                                         progress=r.progress, train=self.train_targets)[:2]
            except Exception as exc:
                self._failed[name] = describe_error(exc)
                raise
        return self._targets[name]

    def defense(self, dspec: DefenseSpec, target: str) -> tuple:
        r = self.runner
        trained_on, trained_card = self.target(dspec.trained_against or target)

        together = distributed.active() and DEFENSES.get(dspec.registered).data_parallel

        def build():
            with activity(f"preparing defense {self.ds.name}/{dspec.name}"):
                return prepare_defense(self.ds, dspec, trained_on, trained_card, r.cfg, r.device, self.artifacts,
                                       self.train_data, data_shape=(self.eval_set.channels, self.eval_set.image_size[0]),
                                       progress=r.progress, train=self.train, together=together)

        return build() if together else _on_main_first(build)


class Runner:
    def __init__(self, cfg: ExperimentConfig, out: Path, *, device: str | None = None, force: bool = False,
                 progress: bool = True, config_path: str | None = None, keep_going: bool = False,
                 replace: bool = False, plan_only: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(out)
        self.force = force
        self.replace = replace  # a folder that holds a run of another configuration becomes this one's
        if any(t.train is not None and t.train.deterministic for t in cfg.targets):
            fix_cublas_workspace()  # before the process's first cuBLAS call
        self.progress = progress
        self.eta: RunProgress | None = None  # set by run()
        self.config_path = config_path
        if plan_only:  # a plan loads nothing: it needs no GPU to say what a GPU run would cost
            self.device = resolve_device(device or cfg.device, available=False)
        else:
            self.device = distributed.init_from_env(resolve_device(device or cfg.device))
        # An unexpected error in a defense's training, a row's checks or a cell is logged with its
        # traceback and the run goes on; the run still fails at the end, naming every failure (a
        # smoke run on a new machine finds all its bugs in one go). One process only (checked after
        # torchrun's setup): a rank that went on alone would wait forever on the others.
        self.keep_going = keep_going and not distributed.active()
        self.cells = plan_cells(cfg)
        self.eval_sets: dict[str, ImageData] = {}
        self.threat = Threat(cfg.threat.norm, cfg.threat.eps)

    # -- preflight: everything that can fail on bad input, before anything is written ------
    def preflight(self) -> None:
        self.check_folder()
        verify_checkpoints(self.cfg)
        for ds in self.cfg.datasets:
            test = load_dataset(ds.name, "test", root=ds.root, download=ds.download, **ds.options)
            n = self.cfg.eval.n
            if n is not None and n > len(test):
                raise BenchError(f"eval.n={n} is larger than the {ds.name} test split ({len(test)} examples)")
            self.eval_sets[ds.name] = test.subset(n, seed=self.cfg.seed)
            for d in self.cfg.defenses:
                if d.eval_n is not None and d.eval_n > len(self.eval_sets[ds.name]):
                    raise BenchError(f"defense {d.name!r}: eval_n={d.eval_n} is larger than the evaluation subset "
                                     f"of {ds.name} ({len(self.eval_sets[ds.name])} examples, eval.n)")

    def check_folder(self) -> None:
        """A run goes into an empty folder or one of the same configuration; a folder whose manifest
        holds another configuration (another eps, steps, rows) is refused in one line, unless
        ``replace``: its records of cells whose identity changed are then recomputed, and the
        tables leave out (and name) whatever a stopped rerun leaves stale."""
        from benchmark.merge import MARK  # (merge imports this module)

        path = self.out / "manifest.json"
        if (self.out / MARK).is_file():  # its records are copies: a merge would delete this run's
            raise BenchError(f"{self.out} holds a merge of runs ({MARK}; `report RUN... --out`): give --out "
                             "another folder")
        if self.replace or not path.is_file():
            return
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # an unreadable manifest: rewritten by this run
        new = artifact_key(asdict(self.cfg))
        if old.get("config_hash") not in (None, new) and not same_config(old.get("config") or {}, asdict(self.cfg)):
            name = (old.get("config") or {}).get("name")
            where = old.get("config_path")
            raise BenchError(f"{self.out} holds a run of another configuration ({name}{f' from {where}' if where else ''}, "
                             f"config hash {str(old.get('config_hash'))[:12]}; this one: {new[:12]}): give --out "
                             "another folder, or --replace to make this configuration the folder's (cells whose "
                             "identity changed are recomputed, the others kept)")

    def record_path(self, cell: Cell) -> Path:
        return self.out / "records" / f"{cell.cell_id}.json"

    def pending(self) -> list[Cell]:
        if self.force:
            return list(self.cells)
        return [c for c in self.cells if valid_record(self.record_path(c), c.cell_hash) is None]

    def manifest(self) -> dict:
        cfg_dict = asdict(self.cfg)
        return {
            "config": cfg_dict, "config_hash": artifact_key(cfg_dict), "config_path": self.config_path,
            "seed": self.cfg.seed, "profile": self.cfg.profile, "device": str(self.device),
            "versions": versions(),
        }

    def write_manifest(self) -> dict:
        """manifest.json and plan.json of the run folder; stale locks of killed workers removed."""
        self.out.mkdir(parents=True, exist_ok=True)
        manifest = self.manifest()
        atomic_write_json(self.out / "manifest.json", manifest)
        atomic_write_json(self.out / "plan.json", {"cells": [
            {"cell_id": c.cell_id, "cell_hash": c.cell_hash, **c.key()} for c in self.cells], "rows": [
            {"row": row_id(ds, t, d), "checks_hash": checks_hash(self.cfg, ds, t, d)}
            for ds in self.cfg.datasets for t in self.cfg.targets for d in self.cfg.defenses]})
        sweep_stale_locks(self.out)
        return manifest

    # -- the run ---------------------------------------------------------------------------
    def run(self, *, cells: set[str] | None = None, rows: set[tuple[str, str, str]] | None = None,
            train: bool = True, tables: bool = True) -> dict:
        """Compute every pending cell and every row's checks, or only the cells with ids in
        ``cells`` and the checks of ``rows`` (dataset, target, defense) when given (a cluster
        worker's share). ``train=False``: artifacts must exist already. A cell or row that
        another worker holds the lock of is left to it (``busy`` in the summary)."""
        if not self.eval_sets:
            self.preflight()
        main = distributed.is_main()
        pending = self.pending()
        todo = [c for c in pending if cells is None or c.cell_id in cells]
        # Decided before anything is written, so that every rank of a torchrun run decides the same.
        unchecked_rows = {(ds.name, t.name, d.name) for ds in self.cfg.datasets for t in self.cfg.targets
                          for d in self.cfg.defenses
                          if (rows is None or (ds.name, t.name, d.name) in rows) and self.needs_checks(ds, t, d)}
        distributed.barrier()
        manifest = self.write_manifest() if main else self.manifest()
        log.info("%d cells planned, %d to compute, %d already recorded", len(self.cells), len(todo),
                 len(self.cells) - len(pending))
        todo_ids = {c.cell_id for c in todo}
        # the remaining time, weighted by each stage's expected cost (a run of the whole matrix)
        self.eta = RunProgress.of(self, len(todo)) if main and cells is None and rows is None else None
        bar = tqdm(total=len(todo), desc="matrix", disable=not self.progress or not main, dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        busy: list[str] = []
        failures: list[str] = []
        no_bars = main and not self.progress  # then a "still ..." line whenever a long step is quiet
        with heartbeat(eta=self.eta.text if self.eta else None) if no_bars else nullcontext():
            computed = self._run_matrix(todo_ids, unchecked_rows, manifest, bar, busy, failures, train)
        bar.close()
        from benchmark.tables import write_tables

        written = write_tables(self.out) if main and tables else []
        distributed.barrier()
        if failures:
            raise BenchError(f"{len(failures)} failure(s), their cells are missing from the tables "
                             f"(rerun to retry them): " + "; ".join(failures))
        return {"planned": len(self.cells), "computed": computed, "busy": busy, "tables": written}

    def _run_matrix(self, todo_ids: set[str], unchecked_rows: set, manifest: dict, bar, busy: list[str],
                    failures: list[str], train: bool) -> int:
        """The loop of :meth:`run`: each dataset's targets and rows, built once, then each row's
        checks and pending cells. Returns the number of cells computed here."""
        main, computed = distributed.is_main(), 0
        for ds in self.cfg.datasets:
            builder = _Builder(self, ds, train)
            for target in self.cfg.targets:
                group = [c for c in self.cells if c.dataset is ds and c.target is target and c.cell_id in todo_ids]
                unchecked = [d for d in self.cfg.defenses if (ds.name, target.name, d.name) in unchecked_rows]
                if not group and not unchecked:
                    continue
                for dspec in self.cfg.defenses:
                    cells_here = [c for c in group if c.defense is dspec]
                    if not cells_here and dspec not in unchecked:
                        continue
                    try:
                        classifier, target_card = builder.target(target.name)
                        self._progressed(bar, "target", f"{ds.name}/{target.name}")
                        defense, defense_card = builder.defense(dspec, target.name)
                        self._progressed(bar, "defense", f"{ds.name}/{dspec.name}")
                        if dspec.trained_against:  # trained inside the defense's preparation
                            self._progressed(bar, "target", f"{ds.name}/{dspec.trained_against}")
                        if uses_static_pairs(dspec):
                            self._progressed(bar, "pairs", f"{ds.name}/{dspec.trained_against or target.name}")
                    except Exception as exc:  # one defense that cannot be trained does not stop the others
                        if not isinstance(exc, BenchError) and not self.keep_going:
                            raise
                        log.error("defense %s/%s: %s; its %d cells are skipped", ds.name, dspec.name,
                                  describe_error(exc), len(cells_here), exc_info=not isinstance(exc, BenchError))
                        failures.append(f"{ds.name}/{target.name}/{dspec.name}: {describe_error(exc)}")
                        bar.update(len(cells_here))
                        for what in [("defense", f"{ds.name}/{dspec.name}")] + [("cell", c.cell_id) for c in cells_here]:
                            self._progressed(bar, *what, skip=True)
                        continue
                    defended = DefendedModel.for_defense(defense, classifier)
                    data = builder.eval_set if dspec.eval_n is None else builder.eval_set.head(dspec.eval_n)
                    refused = self._undeclared_randomness(defended, data, dspec)
                    if refused:  # a row declared deterministic must be: never scored once and attacked without EOT
                        log.error("%s/%s/%s refused: %s", ds.name, target.name, dspec.name, refused)
                        failures.append(f"{ds.name}/{target.name}/{dspec.name}: {refused}")
                        bar.update(len(cells_here))
                        for c in cells_here:
                            self._progressed(bar, "cell", c.cell_id, skip=True)
                        continue
                    if dspec in unchecked:
                        name = row_id(ds, target, dspec)
                        with self._claimed(f"checks__{name}", busy, lambda ds=ds, t=target, d=dspec:
                                           not self.needs_checks(ds, t, d)) as take:
                            if take and main:  # the other ranks wait in the row's first cell
                                with self._going_on(f"checks of {name}", failures), activity(f"checks of {name}"):
                                    self.run_row_checks(ds, target, dspec, defended, data, classifier)
                        self._progressed(bar, "checks", f"{ds.name}/{target.name}/{dspec.name}")
                    for cell in cells_here:
                        with self._claimed(cell.cell_id, busy, lambda cell=cell: valid_record(
                                self.record_path(cell), cell.cell_hash) is not None) as take:
                            if take:
                                with self._going_on(cell.cell_id, failures), activity(cell.cell_id):
                                    self.run_cell(cell, defended, data, manifest, target_card, defense_card)
                                    computed += 1
                        bar.update(1)
                        # a cell that failed or that another worker holds: left out of the estimate
                        self._progressed(bar, "cell", cell.cell_id, skip=True)
        return computed

    @staticmethod
    def _undeclared_randomness(defended: DefendedModel, data: ImageData, dspec: DefenseSpec) -> str | None:
        """Why a row that declares itself deterministic is refused (two passes disagree), or None. A
        defense that fails to run at all is not refused here: its checks and cells report the error."""
        try:
            check_determinism(defended, data.head(min(64, len(data))).as_float(), dspec.name)
        except BenchError as exc:
            return str(exc)
        except Exception:
            return None
        return None

    def _progressed(self, bar, kind: str, what: str, skip: bool = False) -> None:
        """A stage of the plan is behind us (``skip``: it will not run here): the remaining-time
        estimate, and the bar's, move on."""
        if self.eta is not None:
            (self.eta.skip if skip else self.eta.done)(kind, what)
            bar.set_postfix_str(self.eta.text(), refresh=False)

    @contextmanager
    def _going_on(self, what: str, failures: list[str]):
        """With ``keep_going``: an error in the block is logged with its traceback and listed in
        ``failures``; the run goes on. Without: it propagates."""
        try:
            yield
        except Exception as exc:
            if not self.keep_going:
                raise
            log.error("%s failed: %s", what, describe_error(exc), exc_info=True)
            failures.append(f"{what}: {describe_error(exc)}")

    @contextmanager
    def _claimed(self, name: str, busy: list[str], done):
        """Yields whether this worker computes a cell (or a row's checks, ``name`` naming its lock):
        rank 0 takes its lock, unless another worker finished it since planning (``done()``) or holds
        the lock (``name`` goes to ``busy``); every rank gets rank 0's answer. The lock is released
        on leaving."""
        lock = OwnerLock(self.out / "locks" / f"{name}.lock")
        claim = "done"
        if distributed.is_main() and (self.force or not done()):
            if not lock.acquire():
                claim = "busy"
                log.info("%s: another worker (%s) is computing it; left to it", name, lock.describe_owner())
            elif not self.force and done():  # finished between the check and the lock
                lock.release()
            else:
                claim = "take"
        claim = distributed.broadcast(claim)
        if claim == "busy":
            busy.append(name)
        try:
            yield claim == "take"
        finally:
            lock.release()

    def build_artifacts(self, targets: list[tuple[str, str]] = (), rows: list[tuple[str, str, str]] = (),
                        train_targets: bool = True) -> dict:
        """Train (or verify) the artifacts of ``targets`` (dataset, target) and of the defenses of
        ``rows`` (dataset, target, defense): the first stages of a cluster run."""
        if not self.eval_sets:
            self.preflight()
        done, failures = [], []
        for ds in self.cfg.datasets:
            builder = _Builder(self, ds, train=True, train_targets=train_targets)
            for d, t in targets:
                if d == ds.name:
                    try:
                        builder.target(t)
                        done.append(f"{d}/{t}")
                    except BenchError as exc:
                        failures.append(f"target {d}/{t}: {exc}")
            for d, t, name in rows:
                if d == ds.name:
                    try:
                        builder.defense(next(x for x in self.cfg.defenses if x.name == name), t)
                        done.append(f"{d}/{t}/{name}")
                    except BenchError as exc:
                        failures.append(f"defense {d}/{t}/{name}: {exc}")
        for f in failures:
            log.error("%s", f)
        return {"built": done, "failed": failures}

    # -- gradient-masking checks, once per row --------------------------------------------
    def checks_path(self, ds: DatasetSpec, target: TargetSpec, defense: DefenseSpec) -> Path:
        return self.out / "checks" / f"{row_id(ds, target, defense)}.json"

    def needs_checks(self, ds: DatasetSpec, target: TargetSpec, defense: DefenseSpec) -> bool:
        if not self.cfg.eval.checks.enabled:
            return False
        if not any(c.dataset is ds and c.target is target and c.defense is defense for c in self.cells):
            return False  # a row with no cells (restricted to other targets) has nothing to check
        if self.force:
            return True
        return valid_checks(self.checks_path(ds, target, defense), checks_hash(self.cfg, ds, target, defense)) is None

    def run_row_checks(self, ds: DatasetSpec, target: TargetSpec, defense: DefenseSpec, defended: DefendedModel,
                       data: ImageData, classifier=None) -> ChecksRecord:
        spec = self.cfg.eval.checks
        rows = data.head(min(spec.n, len(data)))
        active = runs_active(self.cfg, defense)
        if spec.active is not None and not active:
            log.warning("%s/%s/%s: no binarization test (the defense's outputs depend on the batch)",
                        ds.name, target.name, defense.name)
        results = run_checks(defended, rows.as_float(), rows.labels, self.threat, spec, seed=self.cfg.seed,
                             batch_size=self.cfg.eval.batch_size, engine=self.cfg.eval.engine,
                             draws=row_draws(self.cfg, defense), eot=row_eot(self.cfg, defense), target=classifier,
                             active=active_attack(self.cfg, defense) if active else None,
                             active_images=data.head(min(spec.active.n, len(data))).as_float() if active else None)
        record = ChecksRecord(
            row=RowKey(ds.name, target.name, defense.name), row_hash=checks_hash(self.cfg, ds, target, defense),
            results=results, spec=spec, threat={"norm": self.threat.norm, "eps": self.threat.eps},
            dataset_copy=rows.copy, profile=self.cfg.profile, bpda=defended.bpda,
            sample_indices=rows.indices.tolist() if rows.indices is not None else None,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_checks(self.checks_path(ds, target, defense), record)
        log.info("checks %s/%s/%s: %s (%.1f s)", ds.name, target.name, defense.name,
                 ", ".join(record.flags) or f"no flag (n={results.n})", results.seconds)
        if results.degenerate.failed:
            log.warning("%s/%s/%s is degenerate (%s): every number of this row is meaningless; look at its "
                        "training", ds.name, target.name, defense.name, "; ".join(results.degenerate.reasons))
        return record

    def run_cell(self, cell: Cell, defended: DefendedModel, data: ImageData, manifest: dict,
                 target_card: dict, defense_card: dict | None) -> CellRecord:
        attack = build_attack(cell.attack, f"attack {cell.attack.name!r}")
        x, y = data.as_float(), data.labels
        t0 = time.perf_counter()
        outcome = run_attack(attack, defended, x, y, self.threat, batch_size=self.cfg.eval.batch_size,
                             seed=self.cfg.seed, name=cell.cell_id, progress=self.progress and distributed.is_main(),
                             engine=self.cfg.eval.engine, sharded=distributed.active(),
                             draws=row_draws(self.cfg, cell.defense))
        wall = time.perf_counter() - t0
        lo, hi = wilson_interval(outcome.n_correct, outcome.n)
        record = CellRecord.from_json({
            "cell_id": cell.cell_id, "cell_hash": cell.cell_hash, "cell": cell.key(),
            "attack_label": cell.attack.column, "attack_registered": cell.attack.registered,
            "attack_params": attack.describe(),
            "defense_registered": cell.defense.registered, "defense_options": cell.defense.options,
            "defense_train": cell.defense.train,
            "defense_declarations": defended.defense.declarations(),
            "bpda": defended.bpda,
            "threat": {"norm": self.threat.norm, "eps": self.threat.eps},
            "dataset_copy": data.copy, "profile": self.cfg.profile,
            "n": outcome.n, "n_correct": outcome.n_correct, "accuracy": outcome.accuracy, "ci95": [lo, hi],
            "correct": bit_string(outcome.correct), "draws": outcome.draws,
            "scores": draw_scores(outcome.draw_counts.tolist(), outcome.draws, outcome.majority.tolist(),
                                  outcome.single.tolist()),
            **({"correct_draws": count_string(outcome.draw_counts), "correct_majority": bit_string(outcome.majority),
                "correct_single": bit_string(outcome.single)} if outcome.draws > 1 else {}),
            "score_forwards": outcome.score_forwards, "random_score": outcome.random_score,
            "diagnostic_scores": {name: {"correct": bit_string(bits), "n_correct": int(bits.sum()),
                                         "accuracy": float(bits.float().mean()),
                                         "ci95": list(wilson_interval(int(bits.sum()), len(bits)))}
                                  for name, bits in outcome.diagnostics.items()},
            "threat_space": type(attack).threat_space,
            "sample_indices": data.indices.tolist() if data.indices is not None else None,
            "seconds": wall, "attack_seconds": outcome.seconds,
            "images_per_second": outcome.n / outcome.seconds if outcome.seconds > 0 else None,
            "forwards": outcome.forwards, "backwards": outcome.backwards, **outcome.extra,
            "peak_gpu_memory_mb": outcome.peak_memory_bytes / 2**20 if outcome.peak_memory_bytes else None,
            "target": {"name": cell.target.name, "arch": target_card.get("arch"), "method": target_card.get("method"),
                       "checkpoint_sha256": target_card.get("sha256")},
            "defense_checkpoint_sha256": defense_card.get("sha256") if defense_card else None,
            "defense_training": defense_card.get("fit") if defense_card else None,
            "manifest": manifest, "worker": owner_info(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, where=f"cell {cell.cell_id}")
        if not distributed.is_main():
            return record
        write_record(self.record_path(cell), record)
        if self.eta is not None:
            self.eta.done("cell", cell.cell_id)
        log.info("%s: %.2f%% [%.2f, %.2f] (n=%d, %.1f s%s)%s", cell.cell_id, 100 * outcome.accuracy, 100 * lo, 100 * hi,
                 outcome.n, wall, f", all of {outcome.draws} draws; mean over draws "
                 f"{100 * record.scores['mean'].accuracy:.2f}%" if outcome.draws > 1 else "",
                 f" [{self.eta.cell_text()}]" if self.eta is not None else "")
        return record
