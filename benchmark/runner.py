"""The matrix runner: plan the cells, build what they need, run them, write one record each.

A cell is (dataset, target, defense, attack) under the config's threat model.
The runner validates everything up front (the config, then a preflight that
loads every evaluation split), trains or loads targets and defenses through the
content-keyed artifact cache only when some cell still needs them, and writes
each cell's record atomically. A rerun skips cells whose record exists, verifies
and matches the cell's hash (``force=True`` recomputes).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from attacks.base import Threat
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
    prepare_defense,
    prepare_target,
)
from benchmark.harness import run_attack
from benchmark.io import atomic_write_json
from benchmark.records import valid_record, write_record
from benchmark.registry import ATTACKS, DEFENSES
from benchmark.runtime import resolve_device, versions
from benchmark.stats import wilson_interval
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


def plan_cells(cfg: ExperimentConfig) -> list[Cell]:
    """Every (dataset, target, defense, attack) whose attack applies to the defense (e.g. the
    mask-adaptive attack only to defenses that declare masks)."""
    cells = []
    for ds in cfg.datasets:
        for target in cfg.targets:
            for defense in cfg.defenses:
                for attack in cfg.attacks:
                    if not ATTACKS.get(attack.registered).applies_to(DEFENSES.get(defense.registered)):
                        continue
                    if attack.only is not None and defense.name not in attack.only:
                        continue
                    if defense.targets is not None and target.name not in defense.targets:
                        continue
                    cell_id = "__".join(_slug(n) for n in (ds.name, target.name, defense.name, attack.name))
                    cell_hash = artifact_key({
                        "v": ARTIFACT_VERSION, "dataset": asdict(ds) | {"root": None},
                        "target": asdict(target),
                        "defense": {k: v for k, v in asdict(defense).items()
                                    if k != "targets" and not (k == "eval_n" and v is None)},
                        "attack": {k: v for k, v in asdict(attack).items() if k != "only"},
                        "threat": asdict(cfg.threat), "n": cfg.eval.n, "seed": cfg.seed,
                        **({"engine": engine} if (engine := cfg.eval.engine.changes_results()) else {}),
                        **({"trained_against": asdict(next(t for t in cfg.targets if t.name == defense.trained_against))}
                           if defense.trained_against else {}),
                    })
                    cells.append(Cell(ds, target, defense, attack, cell_id, cell_hash))
    return cells


class Runner:
    def __init__(self, cfg: ExperimentConfig, out: Path, *, device: str | None = None, force: bool = False,
                 progress: bool = True, config_path: str | None = None) -> None:
        self.cfg = cfg
        self.out = Path(out)
        self.force = force
        self.progress = progress
        self.config_path = config_path
        self.device = resolve_device(device or cfg.device)
        self.cells = plan_cells(cfg)
        self.eval_sets: dict[str, ImageData] = {}
        self.threat = Threat(cfg.threat.norm, cfg.threat.eps)

    # -- preflight: everything that can fail on bad input, before anything is written ------
    def preflight(self) -> None:
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

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> dict:
        if not self.eval_sets:
            self.preflight()
        self.out.mkdir(parents=True, exist_ok=True)
        manifest = self.manifest()
        atomic_write_json(self.out / "manifest.json", manifest)
        atomic_write_json(self.out / "plan.json", {"cells": [
            {"cell_id": c.cell_id, "cell_hash": c.cell_hash, **c.key()} for c in self.cells]})
        todo = self.pending()
        log.info("%d cells planned, %d to compute, %d already recorded", len(self.cells), len(todo),
                 len(self.cells) - len(todo))
        todo_ids = {c.cell_id for c in todo}
        bar = tqdm(total=len(todo), desc="matrix", disable=not self.progress, dynamic_ncols=True)
        artifacts = self.out / "artifacts"
        computed = 0
        failures: list[str] = []
        for ds in self.cfg.datasets:
            eval_set = self.eval_sets[ds.name].to(self.device)
            train_cache: dict[str, ImageData] = {}

            def train_data(ds=ds, cache=train_cache):
                if "train" not in cache:
                    cache["train"] = load_dataset(ds.name, "train", n=ds.n_train, seed=self.cfg.seed,
                                                  root=ds.root, download=ds.download, **ds.options)
                return cache["train"]

            prepared: dict[str, tuple] = {}

            def target_for(name: str, ds=ds, prepared=prepared):
                if name not in prepared:
                    spec = next(t for t in self.cfg.targets if t.name == name)
                    prepared[name] = prepare_target(ds, spec, self.cfg, self.device, artifacts,
                                                    progress=self.progress)[:2]
                return prepared[name]

            for target in self.cfg.targets:
                group = [c for c in self.cells if c.dataset is ds and c.target is target and c.cell_id in todo_ids]
                if not group:
                    continue
                classifier, target_card = target_for(target.name)
                for dspec in self.cfg.defenses:
                    cells = [c for c in group if c.defense is dspec]
                    if not cells:
                        continue
                    try:
                        trained_on, trained_card = (target_for(dspec.trained_against) if dspec.trained_against
                                                    else (classifier, target_card))
                        defense, defense_card = prepare_defense(
                            ds, dspec, trained_on, trained_card, self.cfg, self.device, artifacts, train_data,
                            data_shape=(eval_set.channels, eval_set.image_size[0]), progress=self.progress)
                    except BenchError as exc:  # one defense that cannot be trained does not stop the others
                        log.error("defense %s/%s: %s; its %d cells are skipped", ds.name, dspec.name, exc, len(cells))
                        failures.append(f"{ds.name}/{target.name}/{dspec.name}: {exc}")
                        bar.update(len(cells))
                        continue
                    defended = DefendedModel.for_defense(defense, classifier)
                    rows = eval_set if dspec.eval_n is None else eval_set.head(dspec.eval_n)
                    for cell in cells:
                        self.run_cell(cell, defended, rows, manifest, target_card, defense_card)
                        computed += 1
                        bar.update(1)
        bar.close()
        from benchmark.tables import write_tables

        tables = write_tables(self.out)
        if failures:
            raise BenchError(f"{len(failures)} defense(s) failed, their cells are missing from the tables "
                             f"(rerun to retry them): " + "; ".join(failures))
        return {"planned": len(self.cells), "computed": computed, "tables": tables}

    def run_cell(self, cell: Cell, defended: DefendedModel, data: ImageData, manifest: dict,
                 target_card: dict, defense_card: dict | None) -> dict:
        attack = build_attack(cell.attack, f"attack {cell.attack.name!r}")
        x, y = data.as_float(), data.labels
        t0 = time.perf_counter()
        outcome = run_attack(attack, defended, x, y, self.threat, batch_size=self.cfg.eval.batch_size,
                             seed=self.cfg.seed, name=cell.cell_id, progress=self.progress,
                             engine=self.cfg.eval.engine)
        wall = time.perf_counter() - t0
        lo, hi = wilson_interval(outcome.n_correct, outcome.n)
        record = {
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
            "correct": "".join("1" if c else "0" for c in outcome.correct.tolist()),
            "sample_indices": data.indices.tolist() if data.indices is not None else None,
            "seconds": wall, "attack_seconds": outcome.seconds,
            "images_per_second": outcome.n / outcome.seconds if outcome.seconds > 0 else None,
            "forwards": outcome.forwards, "backwards": outcome.backwards, **outcome.extra,
            "peak_gpu_memory_mb": outcome.peak_memory_bytes / 2**20 if outcome.peak_memory_bytes else None,
            "target": {"name": cell.target.name, "arch": target_card.get("arch"), "method": target_card.get("method"),
                       "checkpoint_sha256": target_card.get("sha256")},
            "defense_checkpoint_sha256": defense_card.get("sha256") if defense_card else None,
            "defense_training": defense_card.get("fit") if defense_card else None,
            "manifest": manifest, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_record(self.record_path(cell), record)
        log.info("%s: %.2f%% [%.2f, %.2f] (n=%d, %.1f s)", cell.cell_id, 100 * outcome.accuracy, 100 * lo, 100 * hi,
                 outcome.n, wall)
        return record
