"""``report RUN1 RUN2 ... --out DIR``: one set of tables from runs made in separate jobs.

A long matrix runs as parts that each fit a short GPU job (each part retrains the same
deterministic target); this puts their records (and gradient-masking checks) into one folder and
builds the report there. Rows of different runs may sit in one table only if they stand in front of
the same target: every (dataset, target) that two runs share must have the same checkpoint hash in
their records, else the merge is refused. A cell recorded by two runs must be the same cell (same
cell hash; the later run's record is kept when both verify); different ones are refused too.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from benchmark.errors import BenchError
from benchmark.io import atomic_write_json, atomic_write_text
from benchmark.masking import load_checks
from benchmark.records import load_records
from benchmark.runner import row_name
from benchmark.tables import left_out

log = logging.getLogger("purifybench")

MARK = "merged.json"  # what makes a folder a merge (and so safe to refill)


def _target_hash(record) -> str | None:
    return (record.target or {}).get("checkpoint_sha256")


def _run_records(run: Path) -> dict:
    """A run's valid records of its current plan, by cell id (as a single-run report reads them: cells
    dropped from the config stay out; stale and corrupt records are left out and named on the
    console); without a plan, every valid record in the folder."""
    records = load_records(run)
    for line in left_out(records):
        log.warning("%s: %s", run, line)
    return {path.stem: rec for path, rec in zip(records.paths, records)}


def _agree(seen: dict, key: tuple, sha: str | None, run: Path, what: str, hint: str) -> None:
    if key in seen and seen[key][0] != sha:
        raise BenchError(f"{what} differs between {seen[key][1]} ({str(seen[key][0])[:12]}) and {run} "
                         f"({str(sha)[:12]}): their rows cannot share a table ({hint}, or report the runs apart)")
    seen.setdefault(key, (sha, run))


def _part_of(manifest: dict) -> dict | None:
    return (manifest.get("config") or {}).get("part_of")


def parts_in(manifest: dict) -> list[dict]:
    """The config parts (``run --part``) a folder holds: a part's run its own, a merge those of the
    runs it was made of."""
    if of := _part_of(manifest):
        return [of]
    return list(manifest.get("parts") or [])


def missing_parts(manifests: list[dict]) -> list[str]:
    """For each config whose parts are merged (also through earlier merges), the parts not among
    them, as "config: part, part" (empty: every part is there, or none is a part)."""
    wholes: dict[str, tuple[list[str], set[str]]] = {}
    for of in (of for m in manifests for of in parts_in(m)):
        wholes.setdefault(of["config"], (of["parts"], set()))[1].add(of["part"])
    return [f"{name}: {', '.join(p for p in parts if p not in seen)}"
            for name, (parts, seen) in wholes.items() if set(parts) - seen]


def merge_runs(runs: list[Path], out: Path) -> list[Path]:
    """Check that ``runs`` can share tables, then write their records, checks, a plan and a
    manifest into ``out``. Returns the record files written."""
    out = Path(out)
    resolved = [Path(r).resolve() for r in runs]
    if out.resolve() in resolved:
        raise BenchError(f"report --out {out} is one of the runs being merged: give a new folder")
    if (out / "records").is_dir() and not (out / MARK).is_file():
        raise BenchError(f"report --out {out} holds a run's records (no {MARK}): give a new folder, a merge "
                         "never overwrites a run")
    hashes: dict[tuple, tuple[str, Path]] = {}  # (dataset, target[, defense]) -> checkpoint hash, run
    settings: dict[tuple, tuple[object, Path]] = {}  # (dataset, what) -> its value, the run it came from
    cells: dict[str, tuple[object, Path]] = {}
    for run in runs:
        run = Path(run)
        if not run.exists():
            raise BenchError(f"{run} does not exist (give the folders the runs wrote)")
        if not (run / "records").is_dir():
            raise BenchError(f"{run} is not a run folder (no records/ inside)")
        records = _run_records(run)
        if not records:
            raise BenchError(f"{run}/records holds no valid record")
        for cell_id, rec in records.items():
            what = f"{rec.cell.dataset}/{rec.cell.target}"
            _agree(hashes, (rec.cell.dataset, rec.cell.target), _target_hash(rec), run, f"target {what}",
                   "train the target with deterministic: true on the same GPU model and software")
            if rec.defense_checkpoint_sha256:  # a trained defense: the same weights in every part
                _agree(hashes, (rec.cell.dataset, rec.cell.target, rec.cell.defense), rec.defense_checkpoint_sha256,
                       run, f"defense {what}/{rec.cell.defense}", "keep each trained row's attacks in one part")
            # (rows may differ in n: eval_n evaluates a row on a prefix; the tables print each row's n)
            setting = {"threat": rec.threat, "seed": (rec.manifest or {}).get("seed"), "data copy": rec.dataset_copy,
                       "profile": rec.profile,
                       "scoring draws": rec.draws if rec.random_score and rec.draws > 1 else None}
            for what, value in setting.items():  # each compared on its own (a deterministic row has no draws)
                if value is None:
                    continue
                key = (rec.cell.dataset, what)
                if key in settings and settings[key][0] != value:
                    raise BenchError(f"{rec.cell.dataset}: {settings[key][1]} and {run} differ in {what} "
                                     f"({settings[key][0]} vs {value}): their numbers cannot share a table")
                settings.setdefault(key, (value, run))
            if cell_id in cells and cells[cell_id][0].cell_hash != rec.cell_hash:
                raise BenchError(f"cell {cell_id} was computed differently in {cells[cell_id][1]} and {run} "
                                 "(different configs for one cell): drop it from one run or report the runs apart")
            cells[cell_id] = (rec, run)
    atomic_write_json(out / MARK, {"runs": [str(r) for r in runs],  # first: a crash below leaves a merge
                                   "targets": {"/".join(k): sha for k, (sha, _) in hashes.items() if len(k) == 2}})
    for sub in ("records", "checks"):
        shutil.rmtree(out / sub, ignore_errors=True)
    written = []
    for cell_id, (_, run) in cells.items():
        written.append(atomic_write_text(out / "records" / f"{cell_id}.json",
                                         (run / "records" / f"{cell_id}.json").read_text(encoding="utf-8")))
    # a row's checks: from a run whose cells of that row are in the merge (same target and defense), only
    # a checks file of that run's current plan (as its own report reads them)
    rows: dict[str, list[Path]] = {}
    for r, run in cells.values():
        runs_of_row = rows.setdefault(row_name(r.cell.dataset, r.cell.target, r.cell.defense), [])
        if run not in runs_of_row:
            runs_of_row.append(run)
    current = {run: {row_name(k.dataset, k.target, k.defense): rec for k, rec in load_checks(run).items()}
               for runs_of_row in rows.values() for run in runs_of_row}
    checks_rows = []
    for row, runs_of_row in rows.items():
        run = next((r for r in reversed(runs_of_row) if row in current[r]), None)  # a run with current checks
        rec = current[run][row] if run is not None else None
        if rec is not None:
            atomic_write_text(out / "checks" / f"{row}.json", (run / "checks" / f"{row}.json").read_text(encoding="utf-8"))
            checks_rows.append({"row": row, "checks_hash": rec.row_hash})
    plan = {"cells": [{"cell_id": cid, "cell_hash": rec.cell_hash, **asdict(rec.cell)}
                      for cid, (rec, _) in cells.items()], "rows": checks_rows}
    atomic_write_json(out / "plan.json", plan)
    manifests = []
    for run in runs:
        path = Path(run) / "manifest.json"
        manifests.append(json.loads(path.read_text()) if path.is_file() else {})
    missing = missing_parts(manifests)
    for line in missing:
        log.warning("merged without part(s) %s: their rows are not in the tables", line)
    profiles = sorted({m.get("profile") for m in manifests if m.get("profile")})
    devices = sorted({m.get("device") for m in manifests if m.get("device")})
    atomic_write_json(out / "manifest.json", {
        "config": {"name": out.name}, "profile": ", ".join(profiles) or None, "device": ", ".join(devices) or None,
        "versions": manifests[0].get("versions", {}), "config_hash": None,
        "merged_from": [{"run": str(run), "config_hash": m.get("config_hash"), "profile": m.get("profile"),
                         "git_commit": m.get("versions", {}).get("git_commit"),
                         **({"part": part} if (part := _part_of(m)) else {})} for run, m in zip(runs, manifests)],
        "parts": [of for m in manifests for of in parts_in(m)],
        "missing_parts": missing,
    })
    return written
