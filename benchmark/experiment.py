"""Experiment configs and the target stage of a run.

A config (YAML) names datasets, target classifiers (trained from a spec, loaded
from a checkpoint, or a named pretrained model), the threat model and the
evaluation size. This module validates a config up front and trains or loads
every target through a content-keyed artifact folder: the key hashes everything
that determines the weights, so a rerun reuses them and a changed spec retrains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from benchmark.checkpoint import load_checkpoint, load_pretrained, read_card, save_checkpoint
from benchmark.config import ConfigError, from_dict, load_yaml, require, subkey
from benchmark.data import load_dataset
from benchmark.errors import BenchError, CheckpointError
from benchmark.io import atomic_write_json, atomic_write_text
from benchmark.models import create_model
from benchmark.registry import DATASETS, MODELS
from benchmark.runtime import resolve_device, versions
from benchmark.training import TrainConfig, evaluate_classifier, train_classifier

log = logging.getLogger("purifybench")
ARTIFACT_VERSION = 1  # bump when training code changes what a given spec produces


@dataclass
class DatasetSpec:
    name: str
    root: str | None = None
    download: bool = False
    options: dict = field(default_factory=dict)
    n_train: int | None = None  # a deterministic subset of the training split

    def validate(self, where: str) -> None:
        if self.name not in DATASETS:
            raise ConfigError(f"{subkey(where, 'name')}: {DATASETS.unknown_message(self.name)}")
        require(self.n_train is None or self.n_train >= 1, subkey(where, "n_train"), "must be >= 1 or null")


@dataclass
class TargetSpec:
    name: str
    arch: str = "resnet18"
    arch_options: dict = field(default_factory=dict)
    train: TrainConfig | None = None
    checkpoint: str | None = None
    pretrained: str | None = None

    def validate(self, where: str) -> None:
        sources = [s for s in ("train", "checkpoint", "pretrained") if getattr(self, s) is not None]
        require(len(sources) == 1, where, f"give exactly one of train, checkpoint, pretrained (got {sources or 'none'})")
        if self.train is not None and self.arch not in MODELS:
            raise ConfigError(f"{subkey(where, 'arch')}: {MODELS.unknown_message(self.arch)}")
        if self.checkpoint is not None:
            read_card(self.checkpoint)  # fails early, naming the file


@dataclass
class ThreatSpec:
    norm: Literal["linf"] = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255

    def validate(self, where: str) -> None:
        require(0 < self.eps <= 1, subkey(where, "eps"), f"must be in (0, 1] (images are in [0,1]), got {self.eps}")
        require(0 < self.step_size <= 1, subkey(where, "step_size"), f"must be in (0, 1], got {self.step_size}")


@dataclass
class EvalSpec:
    n: int | None = 1000
    pgd_steps: int = 20
    batch_size: int = 500

    def validate(self, where: str) -> None:
        require(self.n is None or self.n >= 1, subkey(where, "n"), f"must be >= 1 or null, got {self.n}")
        require(self.pgd_steps >= 0, subkey(where, "pgd_steps"), "must be >= 0")
        require(self.batch_size >= 1, subkey(where, "batch_size"), "must be >= 1")


@dataclass
class ExperimentConfig:
    name: str
    profile: Literal["smoke", "quick", "paper"] = "smoke"
    seed: int = 0
    device: str = "auto"
    datasets: list[DatasetSpec] = field(default_factory=list)
    targets: list[TargetSpec] = field(default_factory=list)
    threat: ThreatSpec = field(default_factory=ThreatSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def validate(self, where: str) -> None:
        require(bool(self.datasets), subkey(where, "datasets"), "must list at least one dataset")
        require(bool(self.targets), subkey(where, "targets"), "must list at least one target")
        for kind, items in (("datasets", self.datasets), ("targets", self.targets)):
            names = [i.name for i in items]
            dup = {n for n in names if names.count(n) > 1}
            require(not dup, subkey(where, kind), f"duplicate names {sorted(dup)}")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    raw = load_yaml(path)
    if raw is None:
        raise ConfigError(f"config {path} is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping")
    for key, value in (overrides or {}).items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return from_dict(ExperimentConfig, raw, f"{path}:")


# ----------------------------------------------------------------------------- targets
def artifact_key(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def target_key(ds: DatasetSpec, target: TargetSpec, seed: int) -> str:
    return artifact_key({
        "v": ARTIFACT_VERSION, "dataset": asdict(ds) | {"root": None}, "arch": target.arch,
        "arch_options": target.arch_options, "train": asdict(target.train) | {"progress": None,
        "eval_n": None, "eval_pgd_steps": None, "eval_batch_size": None}, "seed": seed,
    })


def prepare_target(ds: DatasetSpec, target: TargetSpec, cfg: ExperimentConfig, device: torch.device,
                   artifacts: Path, eval_data) -> tuple[torch.nn.Module, dict, bool]:
    """Train, or load from the artifact folder, the target ``target`` on ``ds``. Returns
    (model, card, reused)."""
    if target.pretrained is not None:
        model, card = load_pretrained(target.pretrained, device)
        return model, card, True
    if target.checkpoint is not None:
        model, card = load_checkpoint(target.checkpoint, device)
        return model, card, True
    key = target_key(ds, target, cfg.seed)
    stem = artifacts / "targets" / f"{ds.name}-{target.name}-{key}"
    if stem.with_name(stem.name + ".json").is_file():
        try:
            model, card = load_checkpoint(stem, device)
            log.info("target %s/%s: reusing %s", ds.name, target.name, stem.name)
            return model, card, True
        except CheckpointError as exc:
            log.warning("target %s/%s: cached artifact rejected (%s); retraining", ds.name, target.name, exc)
    train = load_dataset(ds.name, "train", n=ds.n_train, seed=cfg.seed, root=ds.root,
                         download=ds.download, **ds.options)
    model = create_model(target.arch, num_classes=train.num_classes, in_channels=train.channels,
                         mean=train.mean, std=train.std, **target.arch_options)
    tcfg = target.train
    log.info("target %s/%s: training %s (%s, %d epochs, %d images) on %s", ds.name, target.name,
             target.arch, tcfg.method, tcfg.epochs, len(train), device)
    result = train_classifier(model, train, tcfg, device, eval_data=None, desc=f"{ds.name}/{target.name}")
    card = {
        "arch": target.arch, "arch_options": target.arch_options, "num_classes": train.num_classes,
        "in_channels": train.channels, "mean": list(train.mean), "std": list(train.std),
        "classes": train.classes, "dataset": train.describe() | {"spec": asdict(ds)},
        "method": tcfg.method, "train_config": asdict(tcfg), "artifact_key": key,
        "training": {"seconds": result.seconds, "seconds_per_epoch": result.seconds_per_epoch,
                     "history": result.history, "device": str(device)},
    }
    save_checkpoint(model, stem, card)
    return model.eval(), read_card(stem), False


def run_targets(cfg: ExperimentConfig, out: Path, device: str | None = None) -> list[dict]:
    """Train or load every (dataset, target) pair, evaluate clean and PGD accuracy, write a summary."""
    dev = resolve_device(device or cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ds in cfg.datasets:
        test = load_dataset(ds.name, "test", n=None, root=ds.root, download=ds.download, **ds.options)
        if cfg.eval.n is not None and cfg.eval.n > len(test):
            raise BenchError(f"eval.n={cfg.eval.n} is larger than the {ds.name} test split ({len(test)} examples)")
        test = test.subset(cfg.eval.n, seed=cfg.seed)
        for target in cfg.targets:
            t0 = time.perf_counter()
            model, card, reused = prepare_target(ds, target, cfg, dev, out / "artifacts", test)
            metrics = evaluate_classifier(model, test, dev, eps=cfg.threat.eps, step_size=cfg.threat.step_size,
                                          steps=cfg.eval.pgd_steps, batch_size=cfg.eval.batch_size, seed=cfg.seed)
            row = {
                "dataset": ds.name, "copy": test.copy, "target": target.name, "arch": card["arch"],
                "method": card.get("method"), "reused": reused, **metrics,
                "train_seconds_per_epoch": card.get("training", {}).get("seconds_per_epoch"),
                "wall_seconds": time.perf_counter() - t0, "checkpoint_sha256": card["sha256"],
            }
            log.info("%s/%s: clean %.2f%%, PGD-%d %.2f%% (n=%d)", ds.name, target.name,
                     100 * metrics["clean_acc"], cfg.eval.pgd_steps, 100 * metrics.get("pgd_acc", float("nan")),
                     metrics["n_eval"])
            rows.append(row)
    summary = {"config": asdict(cfg), "profile": cfg.profile, "device": str(dev), "versions": versions(),
               "targets": rows}
    atomic_write_json(out / "targets.json", summary)
    atomic_write_text(out / "targets.md", targets_markdown(rows, cfg))
    return rows


def targets_markdown(rows: list[dict], cfg: ExperimentConfig) -> str:
    lines = ["| dataset | target | arch | method | clean % | PGD % | n | s/epoch |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spe = r["train_seconds_per_epoch"]
        pgd = f"{100 * r['pgd_acc']:.2f}" if "pgd_acc" in r else "-"
        lines.append(
            f"| {r['dataset']} | {r['target']} | {r['arch']} | {r['method']} | {100 * r['clean_acc']:.2f} | "
            f"{pgd} | {r['n_eval']} | {spe:.2f} |" if spe else
            f"| {r['dataset']} | {r['target']} | {r['arch']} | {r['method']} | {100 * r['clean_acc']:.2f} | "
            f"{pgd} | {r['n_eval']} | - |"
        )
    copies = sorted({r["copy"] for r in rows})
    lines += ["", f"Profile: {cfg.profile}. Data: {'; '.join(copies)}. Threat: L-inf eps={cfg.threat.eps:.4f}, "
              f"PGD-{cfg.eval.pgd_steps} step {cfg.threat.step_size:.4f}, random start, fp32."]
    return "\n".join(lines) + "\n"
