"""Cluster runs through submitit: the matrix as job arrays on Slurm, or on this machine.

``run_benchmark.py run CONFIG --executor slurm [--partition P]`` plans the run as the plain
runner does, then submits up to three job arrays, one after the other, all writing to the one
results folder:

1. ``targets``: one array element per target to train (dataset, target);
2. ``defenses``: one per trainable defense row (dataset, target, defense), loading the targets;
3. ``cells``: one per row by default: the row's gradient-masking checks, then its cells, with
   artifacts loaded, never trained.

``--jobs N`` caps the number of array elements per stage (tasks are split into N contiguous
shares). Each cell and row is claimed through a lock (``benchmark.locks``), so two workers,
or a worker and a plain ``run`` on the same folder, never compute the same cell; artifacts are
locked too, and a worker that needs one being trained waits for it. The submitting process waits
for each stage, then writes the tables. If it is stopped, the jobs go on; running the same
command again submits only what is still missing (a cell held by a live worker is left to it).

``--executor local`` runs the same path through submitit's local executor (each array element a
process on this machine); that is how it is tested. Submitit stores its jobs as pickles in
``<out>/submitit``: a folder written by this process for itself, never one received from others.
What a job gets (a :class:`Share`: its tasks and the config) and what it returns (a
:class:`ShareResult`) are plain JSON data with a schema inside those pickles, so a worker of
another version of the suite refuses them in one line instead of misreading them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmark.config import ConfigError, subkey
from benchmark.errors import BenchError
from benchmark.experiment import ExperimentConfig, config_from_dict
from benchmark.io import atomic_write_json
from benchmark.records import RecordError, Typed
from benchmark.registry import DEFENSES

log = logging.getLogger("purifybench")

EXECUTORS = ("local", "slurm")
STAGES = ("targets", "defenses", "cells")
TASK_KINDS = ("target", "defense", "checks", "cell")
SHARE_SCHEMA = "purifybench-share/1"
_SLURM_KEY = re.compile(r"[a-z][a-z0-9_-]*")


@dataclass
class ClusterOptions:
    executor: str
    partition: str | None = None
    jobs: int | None = None  # array elements per stage, at most (default: slurm one per task, local 1)
    array_parallelism: int | None = None  # Slurm: elements of one array running at once
    timeout_min: int = 24 * 60
    gpus_per_job: int | None = None  # default: 1 on Slurm unless the device is the CPU; 0 locally
    cpus_per_job: int | None = None  # also torch's thread count in the worker
    mem_gb: float | None = None
    slurm_args: dict[str, str] = field(default_factory=dict)
    poll_s: float = 2.0

    def validate(self) -> None:
        if self.executor not in EXECUTORS:
            raise BenchError(f"--executor {self.executor!r} is not known; allowed: {', '.join(EXECUTORS)}")
        for name in ("jobs", "array_parallelism", "timeout_min", "cpus_per_job"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.gpus_per_job is not None and self.gpus_per_job < 0:
            raise BenchError(f"--gpus-per-job must not be negative, got {self.gpus_per_job}")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise BenchError(f"--mem-gb must be positive, got {self.mem_gb}")
        if self.executor != "slurm":
            for name, value in (("partition", self.partition), ("array-parallelism", self.array_parallelism),
                                ("slurm-arg", self.slurm_args or None)):
                if value is not None:
                    raise BenchError(f"--{name} applies only to --executor slurm")
        for key, value in self.slurm_args.items():
            if not _SLURM_KEY.fullmatch(key) or any(c in str(value) for c in "\n\r\0"):
                raise BenchError(f"--slurm-arg {key}={value!r}: use KEY=VALUE with a lower-case sbatch option "
                                 "name (e.g. account=abc, qos=high) and a one-line value")
        if self.executor == "slurm" and shutil.which("sbatch") is None:
            raise BenchError("--executor slurm: sbatch is not on PATH (run this on a Slurm login node, "
                             "or use --executor local)")


def parse_slurm_args(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--slurm-arg {item!r}: expected KEY=VALUE (e.g. account=abc)")
        out[key.strip()] = value.strip()
    return out


# ----------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Task(Typed):
    """One unit of a stage: train a target (dataset, target), train a defense row, run a row's
    checks, or compute a cell (its row and ``cell_id``)."""

    kind: str
    dataset: str
    target: str
    defense: str | None = None
    cell_id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise RecordError(f"task kind {self.kind!r} is not known; allowed: {', '.join(TASK_KINDS)}")
        if (self.kind != "target") != (self.defense is not None) or (self.kind == "cell") != (self.cell_id is not None):
            raise RecordError(f"a {self.kind} task needs "
                              + {"target": "no defense and no cell", "cell": "a defense and a cell_id"}.get(
                                  self.kind, "a defense and no cell_id") + f", got {self}")

    @property
    def row(self) -> tuple:
        """(dataset, target) for a target task, (dataset, target, defense) otherwise."""
        return (self.dataset, self.target) if self.kind == "target" else (self.dataset, self.target, self.defense)


def plan_stages(runner) -> dict[str, list[Task]]:
    """The tasks of each stage for what is still missing in the run folder."""
    cfg: ExperimentConfig = runner.cfg
    pending = runner.pending()
    rows = {(c.dataset.name, c.target.name, c.defense.name) for c in pending}
    checks = {(ds.name, t.name, d.name) for ds in cfg.datasets for t in cfg.targets for d in cfg.defenses
              if runner.needs_checks(ds, t, d)}
    rows |= checks
    by_name = {d.name: d for d in cfg.defenses}
    rows_sorted = [(ds.name, t.name, d.name) for ds in cfg.datasets for t in cfg.targets for d in cfg.defenses
                   if (ds.name, t.name, d.name) in rows]  # in plan order
    needed = {(ds, name) for ds, t, d in rows_sorted for name in (t, by_name[d].trained_against) if name}
    stage_targets = [Task("target", ds.name, t.name) for ds in cfg.datasets for t in cfg.targets
                     if (ds.name, t.name) in needed and t.train is not None]
    stage_defenses = [Task("defense", *row) for row in rows_sorted
                      if by_name[row[2]].checkpoint is None and DEFENSES.get(by_name[row[2]].registered).trainable]
    stage_cells: list[Task] = []
    for row in rows_sorted:
        if row in checks:
            stage_cells.append(Task("checks", *row))
        stage_cells += [Task("cell", *row, cell_id=c.cell_id) for c in pending
                        if (c.dataset.name, c.target.name, c.defense.name) == row]
    return {"targets": stage_targets, "defenses": stage_defenses, "cells": stage_cells}


def split(stage: str, tasks: list[Task], jobs: int | None) -> list[list[Task]]:
    """Array elements of a stage: one task each (artifacts) or one row each (cells: the row's
    checks and cells share the loaded defense), then merged into at most ``jobs`` contiguous shares."""
    units: list[list[Task]] = []
    for task in tasks:
        if stage == "cells" and units and units[-1][-1].row == task.row:
            units[-1].append(task)
        else:
            units.append([task])
    if jobs is None or len(units) <= jobs:
        return units
    return [sum(units[i * len(units) // jobs:(i + 1) * len(units) // jobs], []) for i in range(jobs)]


# ----------------------------------------------------------------------------- the worker
@dataclass
class Share(Typed):
    """What one array element does. Submitit pickles its JSON form (:meth:`to_json`)."""

    stage: str
    tasks: list[Task]
    cfg: ExperimentConfig
    out: str
    device: str | None
    force: bool
    threads: int | None
    config_path: str | None
    schema: str = SHARE_SCHEMA

    @classmethod
    def from_json(cls, data, where: str = "cluster share:"):
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        if found != SHARE_SCHEMA:
            raise RecordError(f"{where} schema {found!r} is not {SHARE_SCHEMA} (submitted by another version of "
                              "purifybench; submit again with this one)")
        if data.get("stage") not in STAGES:
            raise RecordError(f"{where} stage {data.get('stage')!r} is not one of {', '.join(STAGES)}")
        try:
            tasks = [Task.from_json(t, subkey(where, f"tasks[{i}]")) for i, t in enumerate(data.get("tasks") or [])]
            # validated again in the worker: a checkpoint file that changed since the submission is caught
            cfg = config_from_dict(data.get("cfg"), subkey(where, "cfg"))
        except ConfigError as exc:
            raise RecordError(str(exc)) from None
        return super().from_json(dict(data, tasks=tasks, cfg=cfg), where)


@dataclass
class ShareResult(Typed):
    """What one array element reports back (as JSON) to the submitter."""

    stage: str
    tasks: int
    worker: dict
    computed: int = 0
    busy: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    built: list[str] = field(default_factory=list)
    seconds: float = 0.0


def work(payload: dict) -> dict:
    """The body of one array element (``payload``: a :class:`Share` as JSON): build the artifacts of
    its tasks, or compute its cells. Returns a :class:`ShareResult` as JSON."""
    import torch

    from benchmark.locks import owner_info
    from benchmark.logs import heartbeat, setup_logging
    from benchmark.runner import Runner

    setup_logging(None)  # to stderr, which submitit keeps in the job's log
    t0 = time.perf_counter()
    try:
        share = Share.from_json(payload)
    except RecordError as exc:
        known = payload if isinstance(payload, dict) else {}
        return ShareResult(stage=str(known.get("stage")), tasks=len(known.get("tasks") or []),
                           worker=owner_info(), failed=[str(exc)]).to_json()
    if share.threads:
        torch.set_num_threads(share.threads)
    result = ShareResult(stage=share.stage, tasks=len(share.tasks), worker=owner_info())
    try:
        runner = Runner(share.cfg, Path(share.out), device=share.device, force=share.force, progress=False,
                        config_path=share.config_path)
        runner.preflight()
        if share.stage in ("targets", "defenses"):
            # a "still ..." line in the job's log while a long training is quiet (run() has its own)
            with heartbeat():
                if share.stage == "targets":
                    out = runner.build_artifacts(targets=[t.row for t in share.tasks])
                else:
                    out = runner.build_artifacts(rows=[t.row for t in share.tasks], train_targets=False)
            result.built, result.failed = out["built"], out["failed"]
        else:
            cells = {t.cell_id for t in share.tasks if t.kind == "cell"}
            rows = {t.row for t in share.tasks if t.kind == "checks"}
            out = runner.run(cells=cells, rows=rows, train=False, tables=False)
            result.computed, result.busy = out["computed"], out["busy"]
    except BenchError as exc:  # reported by the submitter in one line
        result.failed.append(str(exc))
    result.seconds = time.perf_counter() - t0
    return result.to_json()


# ----------------------------------------------------------------------------- submitting
def _executor(opts: ClusterOptions, folder: Path, device: str):
    try:
        import submitit
    except ImportError as exc:
        raise BenchError("--executor needs the submitit package (pip install submitit)") from exc
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=opts.executor)
    gpus = opts.gpus_per_job
    if gpus is None:
        gpus = 1 if opts.executor == "slurm" and device != "cpu" else 0
    params = {"timeout_min": opts.timeout_min, "gpus_per_node": gpus, "nodes": 1, "tasks_per_node": 1}
    if opts.cpus_per_job is not None:
        params["cpus_per_task"] = opts.cpus_per_job
    if opts.mem_gb is not None:
        params["mem_gb"] = opts.mem_gb
    if opts.executor == "slurm":
        if opts.partition:
            params["slurm_partition"] = opts.partition
        if opts.array_parallelism:
            params["slurm_array_parallelism"] = opts.array_parallelism
        if opts.slurm_args:
            params["slurm_additional_parameters"] = dict(opts.slurm_args)
    executor.update_parameters(**params)
    return executor


def submit(runner, opts: ClusterOptions, *, device: str | None = None) -> dict:
    """Submit the missing work of ``runner``'s run as job arrays, wait for each stage, write the
    tables. Returns the summary the CLI prints."""
    opts.validate()
    stages = plan_stages(runner)
    out = runner.out.resolve()  # workers may start elsewhere (another node, another folder)
    runner.write_manifest()
    folder = out / "submitit"
    dev = device or runner.cfg.device
    executor = _executor(opts, folder, dev)
    jobs_cap = opts.jobs if opts.jobs is not None else (1 if opts.executor == "local" else None)
    state = {"executor": opts.executor, "stages": []}
    summary = {"planned": len(runner.cells), "computed": 0, "busy": [], "failed": [], "jobs": []}
    for stage in STAGES:
        tasks = stages[stage]
        if not tasks:
            continue
        shares = split(stage, tasks, jobs_cap)
        threads = opts.cpus_per_job
        if threads is None and opts.executor == "local":
            threads = max(1, (os.cpu_count() or 1) // len(shares))
        payload = [Share(stage, s, runner.cfg, str(out), device, runner.force, threads, runner.config_path).to_json()
                   for s in shares]
        executor.update_parameters(name=f"purifybench-{runner.cfg.name}-{stage}")
        try:
            jobs = executor.map_array(work, payload)
        except Exception as exc:  # sbatch refused the array: its message, in one line
            raise BenchError(f"submitting the {stage} array failed: {' '.join(str(exc).split())}") from exc
        ids = [j.job_id for j in jobs]
        log.info("stage %s: %d tasks in %d jobs (%s)", stage, len(tasks), len(jobs), ", ".join(ids))
        state["stages"].append({"stage": stage, "tasks": len(tasks), "jobs": ids})
        atomic_write_json(out / "cluster.json", state)
        for job in jobs:
            while not job.done():
                time.sleep(opts.poll_s)
            try:
                answer = job.result()
            except Exception as exc:  # the job died (killed, timed out, a bug): its log has the traceback
                logs = getattr(job.paths, "stderr", folder)
                summary["failed"].append(f"{stage} job {job.job_id} failed ({type(exc).__name__}); see {logs}")
                continue
            try:
                res = ShareResult.from_json(answer, f"{stage} job {job.job_id}'s result:")
            except RecordError as exc:  # a worker of another version
                summary["failed"].append(str(exc))
                continue
            summary["jobs"].append({"job": job.job_id, **res.to_json()})
            summary["computed"] += res.computed
            summary["busy"] += res.busy
            summary["failed"] += [f"{stage} job {job.job_id}: {f}" for f in res.failed]
        for f in summary["failed"]:
            log.error("%s", f)
    from benchmark.tables import write_tables

    summary["tables"] = write_tables(out) if (out / "records").is_dir() else []
    state["summary"] = {k: v for k, v in summary.items() if k != "jobs"}
    atomic_write_json(out / "cluster.json", state | {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return summary
