"""Experiment configs, and the artifacts (targets, defenses) a run needs.

A config (YAML) names datasets, target classifiers (trained from a spec, loaded
from a checkpoint, or a named pretrained model), defenses, attacks, the threat
model and the evaluation size. :func:`load_config` validates the whole config up
front. Targets and defenses are trained or loaded through a content-keyed
artifact folder: the key hashes everything that determines the weights, so a
rerun reuses them and a changed spec retrains only what it changes.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from benchmark import distributed
from benchmark.artifacts import StageStore, get_or_build, save
from benchmark.checkpoint import load_checkpoint, load_pretrained, read_card
from benchmark.config import FRACTION, ConfigError, fraction, from_dict, load_yaml, require, subkey
from benchmark.data import load_dataset
from benchmark.errors import BenchError
from benchmark.harness import MAX_DRAWS
from benchmark.io import artifact_key
from benchmark.masking import ChecksSpec
from benchmark.models import create_model
from benchmark.registry import ATTACKS, DATASETS, DEFENSES, MODELS
from benchmark.resume import EpochCheckpoint
from benchmark.training import TrainConfig, train_classifier
from defenses.base import TrainContext, compiled

SAFE_NAME = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9_.+-]{0,63}")
log = logging.getLogger("purifybench")
DEFAULT_DRAWS = {"smoke": 4}  # eval.draws when null, per profile (10 for the others)
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


def verify_checkpoints(cfg: ExperimentConfig) -> None:
    """Every checkpoint a config names (targets and defenses): card and weights' hash, checked when
    a run starts (its preflight), so a bad one fails before anything is written."""
    from benchmark.checkpoint import checkpoint_paths, verify_weights

    for spec in [*cfg.targets, *cfg.defenses]:
        if spec.checkpoint is not None:
            verify_weights(read_card(spec.checkpoint), checkpoint_paths(spec.checkpoint)[1])


@dataclass
class TargetSpec:
    name: str
    arch: str = "resnet18"
    arch_options: dict = field(default_factory=dict)
    train: TrainConfig | None = None
    checkpoint: str | None = None
    pretrained: str | None = None
    # a RobustBench model by its name (the `zoo` extra), e.g. Carmon2019Unlabeled: its weights are read
    # from model_dir (default ./models, RobustBench's layout), downloaded by RobustBench when missing
    robustbench: str | None = None
    model_dir: str | None = None

    def validate(self, where: str) -> None:
        sources = [s for s in ("train", "checkpoint", "pretrained", "robustbench") if getattr(self, s) is not None]
        require(len(sources) == 1, where,
                f"give exactly one of train, checkpoint, pretrained, robustbench (got {sources or 'none'})")
        require(self.model_dir is None or self.robustbench is not None, subkey(where, "model_dir"),
                "is the folder of a robustbench model's weights: give robustbench too")
        if self.train is not None and self.arch not in MODELS:
            raise ConfigError(f"{subkey(where, 'arch')}: {MODELS.unknown_message(self.arch)}")


@dataclass
class DefenseSpec:
    """A row of the tables: a registered defense with its options and training options."""

    name: str
    defense: str | None = None  # registered name; defaults to ``name``
    options: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    checkpoint: str | None = None
    # Train against this target of the config and evaluate in front of every target (the seed
    # paper's Table 2 transfers denoisers trained against the AT target to TRADES/MART targets).
    trained_against: str | None = None
    # Evaluate only in front of these targets (default: every target of the config).
    targets: list[str] | None = None
    # Evaluate this row on the first ``eval_n`` examples of the config's evaluation subset (for
    # defenses too costly to attack on all of them, e.g. the EBM's long Langevin chains); the
    # tables print every row's n.
    eval_n: int | None = None

    @property
    def registered(self) -> str:
        return self.defense or self.name

    def train_config(self, where: str | None = None) -> Any:
        """The row's ``train:`` as its defense's ``TrainConfig`` dataclass, checked (None for a defense
        that has none). Read once, when the config is validated; ``where`` names it in errors."""
        cls = getattr(DEFENSES.get(self.registered), "TrainConfig", None)
        where = where or f"defense {self.name!r}.train"
        if cls is None:
            if self.train:
                raise ConfigError(f"{where}: defense {self.registered!r} takes no training options")
            return None
        parsed = self.__dict__.get("_train_config")  # not a field: configs are serialized field by field
        if parsed is None:
            parsed = self.__dict__["_train_config"] = from_dict(cls, self.train, where)
        return parsed

    def validate(self, where: str) -> None:
        if self.registered not in DEFENSES:
            raise ConfigError(f"{subkey(where, 'defense' if self.defense else 'name')}: "
                              f"{DEFENSES.unknown_message(self.registered)}")
        require(self.eval_n is None or self.eval_n >= 1, subkey(where, "eval_n"),
                f"must be >= 1 or null, got {self.eval_n}")
        check_defense(self, where)  # option errors surface now, before anything runs; nothing is built


@dataclass
class AttackSpec:
    """A column of the tables: a registered attack with its parameters."""

    name: str
    attack: str | None = None  # registered name; defaults to ``name``
    params: dict = field(default_factory=dict)
    label: str | None = None
    # Run only against these defenses (names of the config's rows); default: every defense it applies to.
    only: list[str] | None = None

    @property
    def registered(self) -> str:
        return self.attack or self.name

    @property
    def column(self) -> str:
        """The table column: ``label``, else the attack's registered label (e.g. "PGD"), else ``name``."""
        if self.label:
            return self.label
        if self.name == self.registered:
            return ATTACKS.metadata(self.registered).get("label", self.name)
        return self.name

    def validate(self, where: str) -> None:
        if self.registered not in ATTACKS:
            raise ConfigError(f"{subkey(where, 'attack' if self.attack else 'name')}: "
                              f"{ATTACKS.unknown_message(self.registered)}")
        build_attack(self, where)


def check_defense(spec: DefenseSpec, where: str = "defense") -> None:
    """A row's constructor options (its defense's ``Options``), training options and ``fit``
    signature, checked without building anything."""
    cls = DEFENSES.get(spec.registered)
    if cls.trainable:  # the runner calls fit(classifier, train, context, config=...)
        slots = list(inspect.signature(cls.fit).parameters)
        require(len(slots) < 4 or slots[3] not in ("device", "dev"), where,
                f"defense {spec.registered!r} ({cls.__module__}.{cls.__qualname__}) defines fit({', '.join(slots)}), "
                "the signature before the training context: write fit(self, classifier, train, context, "
                "config=None) and read context.device and context.seed (README: Writing a defense)")
    cls.read_options(spec.options, subkey(where, "options"))
    spec.train_config(subkey(where, "train"))


def build_defense(spec: DefenseSpec, where: str = "defense", data_shape: tuple[int, int] | None = None):
    """Instantiate the defense; ``data_shape`` = (channels, image size) fills the options a defense
    lists in ``data_shape_options`` unless the config sets them."""
    cls = DEFENSES.get(spec.registered)
    options = dict(spec.options)
    if data_shape is not None:
        for key, value in zip(("in_channels", "image_size"), data_shape):
            if key in getattr(cls, "data_shape_options", ()):
                options.setdefault(key, value)
    try:
        return cls(**options)
    except ConfigError as exc:  # read_options names the key, under "options"
        raise ConfigError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{subkey(where, 'options')}: {exc}") from None


def build_attack(spec: AttackSpec, where: str = "attack"):
    return ATTACKS.get(spec.registered)(where=subkey(where, "params"), **spec.params)


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
    n: int | None = 1000  # evaluation examples (a deterministic subset of the test split); null = all
    batch_size: int | Literal["auto"] = 500  # auto: the largest that fits in free GPU memory (CPU: 500)
    # attack engine (attacks/engine.py): speed options that keep each attack's strength
    precision: Literal["fp32", "bf16"] = "fp32"  # of the attack's passes; re-scoring is always fp32
    channels_last: bool = False
    compile: bool = False
    eot_batch: int = 1  # EOT / VNI draws per forward pass
    # Scoring passes per adversarial image for a stochastic defense (independent draws of its
    # randomness); a sample is robust only if every draw classifies it correctly. null: 4 in the
    # smoke profile, 10 otherwise. Deterministic rows are always scored once.
    draws: int | None = None
    # gradient-masking checks per row (benchmark/masking.py); on by default
    checks: ChecksSpec = field(default_factory=ChecksSpec)

    def validate(self, where: str) -> None:
        require(self.n is None or self.n >= 1, subkey(where, "n"), f"must be >= 1 or null, got {self.n}")
        require(self.batch_size == "auto" or self.batch_size >= 1, subkey(where, "batch_size"),
                "must be >= 1 or auto")
        require(self.eot_batch >= 1, subkey(where, "eot_batch"), f"must be >= 1, got {self.eot_batch}")
        require(self.draws is None or 1 <= self.draws <= MAX_DRAWS, subkey(where, "draws"),
                f"must be in [1, {MAX_DRAWS}] or null, got {self.draws}")

    @property
    def engine(self):
        from attacks.engine import EngineOptions

        return EngineOptions(self.precision, self.channels_last, self.compile, self.eot_batch)


@dataclass
class ReportSpec:
    """What the report a run ends with adds to its tables and record figures."""

    # rows whose restored representations the closing report shows as a UMAP (Figure 5); it runs
    # PGD through each row again, so only the rows named (empty: none; `umap RUN_DIR` makes it later)
    umap: list[str] = field(default_factory=list)
    umap_n: int | None = None  # test images for the UMAP (null: at most 500, at most the split)
    umap_steps: int = 20  # steps of the white-box PGD whose restorations it embeds (the seed paper's: 20)

    def validate(self, where: str) -> None:
        require(self.umap_n is None or self.umap_n >= 20, subkey(where, "umap_n"),
                f"must be >= 20 (a neighbourhood graph per class) or null, got {self.umap_n}")
        require(self.umap_steps >= 1, subkey(where, "umap_steps"), f"must be >= 1, got {self.umap_steps}")


@dataclass
class ExperimentConfig:
    name: str
    profile: Literal["smoke", "quick", "paper"] = "smoke"
    seed: int = 0
    # modules imported before anything else is read (each registers its defenses, attacks, ...): a
    # module name (``my_pkg.defense``) or a Python file (relative to the config's folder)
    plugins: list[str] = field(default_factory=list)
    device: str = "auto"
    datasets: list[DatasetSpec] = field(default_factory=list)
    targets: list[TargetSpec] = field(default_factory=list)
    defenses: list[DefenseSpec] = field(default_factory=lambda: [DefenseSpec(name="none")])
    attacks: list[AttackSpec] = field(default_factory=lambda: [AttackSpec(name="clean")])
    threat: ThreatSpec = field(default_factory=ThreatSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    # The matrix split into jobs that each fit a short GPU slot: {part name: its rows}, every row in
    # exactly one part. ``run CONFIG --part NAME`` runs one (its rows in front of the targets they
    # need, every attack; each part retrains the targets, so they must train deterministically), and
    # ``report PART_RUN... --out DIR`` merges the parts' runs into the config's tables.
    parts: dict[str, list[str]] = field(default_factory=dict)
    # A part's run: {"config": the whole config's name, "part": its name, "parts": every part's name}
    part_of: dict | None = None

    @property
    def draws(self) -> int:
        """Scoring draws per adversarial image for stochastic rows (``eval.draws`` or the profile's)."""
        if self.eval.draws is not None:
            return self.eval.draws
        return DEFAULT_DRAWS.get(self.profile, 10)

    def validate(self, where: str) -> None:
        for kind in ("datasets", "targets", "defenses", "attacks"):
            require(bool(getattr(self, kind)), subkey(where, kind), "must list at least one entry (empty matrix)")
        for kind, items in (("datasets", self.datasets), ("targets", self.targets),
                            ("defenses", self.defenses), ("attacks", self.attacks)):
            names = [i.name for i in items]
            for i, n in enumerate(names):  # names become file names of artifacts and records
                require(isinstance(n, str) and SAFE_NAME.fullmatch(n) is not None, subkey(where, f"{kind}[{i}].name"),
                        f"{n!r} is not allowed: use letters, digits and '_ . + -', not starting with '.' or '-'")
            dup = {n for n in names if names.count(n) > 1}
            require(not dup, subkey(where, kind), f"duplicate names {sorted(dup)}")
        targets = [t.name for t in self.targets]
        for i, d in enumerate(self.defenses):
            require(d.trained_against is None or d.trained_against in targets,
                    subkey(where, f"defenses[{i}].trained_against"),
                    f"{d.trained_against!r} is not a target of this config; targets: {targets}")
        for i, d in enumerate(self.defenses):
            unknown = sorted(set(d.targets or ()) - set(targets))
            require(not unknown, subkey(where, f"defenses[{i}].targets"),
                    f"{unknown} are not targets of this config; targets: {targets}")
        defenses = [d.name for d in self.defenses]
        for i, a in enumerate(self.attacks):
            unknown = sorted(set(a.only or ()) - set(defenses))
            require(not unknown, subkey(where, f"attacks[{i}].only"),
                    f"{unknown} are not defenses of this config; defenses: {defenses}")
        for i, a in enumerate(self.attacks):  # an AutoAttack subset must exist in the version each row gets
            if a.registered == "autoattack" and a.params.get("attacks") and a.params.get("version", "auto") == "auto":
                from attacks.autoattack import check_members, version_for

                for d in self.defenses:
                    if a.only is None or d.name in a.only:
                        stochastic = DEFENSES.get(d.registered).stochastic_with(d.options)
                        check_members(version_for("auto", stochastic), a.params["attacks"],
                                      subkey(where, f"attacks[{i}] ({a.name}).params.attacks"), f"row {d.name!r}")
        active = self.eval.checks.active
        if active is not None and active.attack != "auto":  # the attack the binarization test holds to account
            from benchmark.active import ATTACKS_FOR_IT, NAMED_ATTACKS

            at = subkey(where, "eval.checks.active.attack")
            chosen = next((a for a in self.attacks if a.name == active.attack), None)
            require(chosen is not None, at, f"{active.attack!r} is not an attack of this config; attacks: "
                    f"{[a.name for a in self.attacks]} (or auto)")
            require(chosen.registered in ATTACKS_FOR_IT + NAMED_ATTACKS, at,
                    f"{active.attack!r} is a {chosen.registered} attack; the test runs a label attack on the whole "
                    f"model: one of {', '.join(ATTACKS_FOR_IT + NAMED_ATTACKS)}")
            require(chosen.params.get("loss", "ce") != "dlr", at,
                    f"{active.attack!r} uses the DLR loss, which needs three classes (the test's model has two)")
        unknown = sorted(set(self.report.umap) - set(defenses))
        require(not unknown, subkey(where, "report.umap"), f"{unknown} are not defenses of this config; defenses: {defenses}")
        self._validate_parts(subkey(where, "parts"), defenses)
        for i, d in enumerate(self.defenses):  # outputs that depend on the batch's other images
            if not DEFENSES.get(d.registered).batch_dependent_with(d.options):
                continue
            at = subkey(where, f"defenses[{i}] ({d.name})")
            require(self.eval.batch_size != "auto", at, "its outputs depend on the batch's other images (batch "
                    "statistics): eval.batch_size must be a number, not auto (it is part of the cell's identity)")
            for a in self.attacks:
                if a.only is not None and d.name not in a.only:
                    continue
                gradient = a.params.get("gradient", "auto" if a.registered == "adaptive" else "bpda")
                composite = (a.registered in ("worst-of", "autoattack", "square")
                             or int(a.params.get("restarts", 1) or 1) > 1
                             or (a.registered in ("bpda-eot", "adaptive") and gradient == "auto"))
                require(not composite, at, f"its outputs depend on the batch's other images (batch statistics): "
                        f"attack {a.name!r} attacks survivors in smaller batches (worst-of, restarts, AutoAttack, "
                        "BPDA-then-exact), which changes them; restrict it with 'only' or drop the batch statistics")

    def _validate_parts(self, where: str, defenses: list[str]) -> None:
        """Parts name rows of the config, each row in exactly one part (merged, they are the whole)."""
        if not self.parts:
            return
        seen: dict[str, str] = {}
        for part, rows in self.parts.items():
            at = subkey(where, str(part))
            require(isinstance(part, str) and SAFE_NAME.fullmatch(part) is not None, at,
                    f"{part!r} is not allowed as a part name: use letters, digits and '_ . + -', not starting "
                    "with '.' or '-'")
            require(part != "merged", at, "'merged' is the suffix of the parts' merged folder: name the part otherwise")
            require(isinstance(rows, list) and bool(rows) and all(isinstance(r, str) for r in rows), at,
                    f"must be a non-empty list of row names, got {rows!r}")
            unknown = [r for r in rows if r not in defenses]
            require(not unknown, at, f"{unknown} are not defenses of this config; defenses: {defenses}")
            for r in rows:
                require(r not in seen, at, f"row {r!r} is listed twice" if seen.get(r) == part else
                        f"row {r!r} is in part {seen.get(r)!r} already (each row in one part)")
                seen[r] = part
        missing = [d for d in defenses if d not in seen]
        require(not missing, where, f"rows {missing} are in no part (merged, the parts must be the whole config)")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """The config at ``path``; ``overrides``: {dotted key: value} set first (a list's item by its
    ``name`` or its index: ``defenses.DIR.train.epochs``, ``attacks.0.params.steps``). Training
    options ``eps`` and ``step_size`` that a target or defense leaves unset, and attacks' unset
    ``step_size``, follow the config's ``threat``."""
    raw = load_yaml(path)
    if raw is None:
        raise ConfigError(f"config {path} is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping")
    for key, value in (overrides or {}).items():
        _override(raw, key, value, f"{path}: override {key}")
    if raw.get("plugins") is not None:
        raw["plugins"] = import_plugins(raw["plugins"], Path(path).parent, f"{path}: plugins")
    _fractions(raw)
    _threat_defaults(raw)
    return from_dict(ExperimentConfig, raw, f"{path}:")


def select_part(cfg: ExperimentConfig, part: str, where: str) -> ExperimentConfig:
    """The config of one of ``cfg.parts``: its rows (in the config's order), the targets they are
    evaluated in front of or trained against, every attack (an ``only`` list cut to the part's rows;
    a column left with no row of the part dropped, unless the binarization test names it: then it
    stays, running against no row, so each row's checks keep their identity), the UMAP rows that
    are in it. Every kept cell, checks and artifact has the identity it has in the whole config, so
    merged parts hold the whole config's cells."""
    if not cfg.parts:
        raise ConfigError(f"{where}: config {cfg.name!r} has no parts (give them under parts:, or run it whole)")
    if part not in cfg.parts:
        raise ConfigError(f"{where}: {part!r} is not a part of config {cfg.name!r}; parts: {', '.join(cfg.parts)}")
    rows = set(cfg.parts[part])
    defenses = [d for d in cfg.defenses if d.name in rows]
    needed = {t for d in defenses for t in (d.targets if d.targets is not None else [t.name for t in cfg.targets])}
    needed |= {d.trained_against for d in defenses if d.trained_against}
    active = cfg.eval.checks.active
    attacks = []
    for a in cfg.attacks:
        if a.only is None:
            attacks.append(a)
        elif (kept := [n for n in a.only if n in rows]) or (active is not None and active.attack == a.name):
            attacks.append(replace(a, only=kept))
    out = replace(cfg, name=f"{cfg.name}-{part}", defenses=defenses,
                  targets=[t for t in cfg.targets if t.name in needed], attacks=attacks,
                  report=replace(cfg.report, umap=[n for n in cfg.report.umap if n in rows]),
                  parts={}, part_of={"config": cfg.name, "part": part, "parts": list(cfg.parts)})
    out.validate(f"{where} (part {part!r})")
    return out


def config_from_dict(data: Any, where: str) -> ExperimentConfig:
    """A config as a run stored it (a manifest, a cluster job's share): its plugins imported first."""
    if isinstance(data, dict):
        import_plugins(data.get("plugins"), Path.cwd(), f"{where} plugins")
    return from_dict(ExperimentConfig, data, where)


def _fractions(node: Any) -> Any:
    """Every value written as a fraction (``8/255``) as the number it is, wherever it stands (typed
    fields would read it so anyway; free-form options and parameters, and the hashes of both, too)."""
    if isinstance(node, dict):
        for k, v in node.items():
            node[k] = _fractions(v)
    elif isinstance(node, list):
        node[:] = [_fractions(v) for v in node]
    elif isinstance(node, str) and FRACTION.fullmatch(node.strip()):
        try:
            return fraction(node)
        except ValueError:  # 1/0: left as written, for the key's own error
            return node
    return node


def import_plugins(plugins: Any, folder: Path, where: str) -> Any:
    """Import a config's ``plugins`` (module names or ``.py`` files, relative to ``folder`` or the
    working directory) so that what they register is known before the config is checked; returns the
    list with each file as its absolute path (what a manifest keeps, so a worker finds it again)."""
    import hashlib
    import importlib
    import importlib.util
    import sys

    if plugins is None:
        return plugins
    if not isinstance(plugins, list) or not all(isinstance(p, str) and p for p in plugins):
        raise ConfigError(f"{where}: expected a list of module names or .py files, got {plugins!r}")
    resolved = list(plugins)
    for i, plugin in enumerate(plugins):
        at = f"{where}[{i}] ({plugin})"
        if plugin.endswith(".py"):
            candidates = [Path(plugin)] if Path(plugin).is_absolute() else [folder / plugin, Path(plugin)]
            file = next((c for c in candidates if c.is_file()), None)
            if file is None:
                raise ConfigError(f"{at}: no such file (looked in {', '.join(str(c) for c in candidates)})")
            file = file.resolve()
            resolved[i] = str(file)
            loaded = {Path(m.__file__).resolve() for m in list(sys.modules.values())
                      if isinstance(getattr(m, "__file__", None), str)}
            if file in loaded:  # imported already (by an earlier config, or as a module of defenses/)
                continue
            module = f"purifybench_plugin_{file.stem}_{hashlib.sha256(str(file).encode()).hexdigest()[:12]}"
            spec = importlib.util.spec_from_file_location(module, file)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[module] = mod
            try:
                spec.loader.exec_module(mod)
            except Exception as exc:
                del sys.modules[module]
                raise ConfigError(f"{at}: importing it failed: {type(exc).__name__}: {exc}") from None
        else:
            try:
                importlib.import_module(plugin)
            except Exception as exc:
                raise ConfigError(f"{at}: importing it failed: {type(exc).__name__}: {exc}") from None
    return resolved


def _override(raw: dict, key: str, value: Any, where: str) -> None:
    node: Any = raw
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            names = [item.get("name") for item in node if isinstance(item, dict)]
            if part.isdigit() and int(part) < len(node):
                index = int(part)
            elif part in names:
                index = names.index(part)
            else:
                close = difflib.get_close_matches(part, [n for n in names if isinstance(n, str)], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{where}: no item {part!r} in {'.'.join(parts[:i]) or 'the config'}{hint}; "
                                  f"items: {names or list(range(len(node)))}")
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{where}: {'.'.join(parts[:i])} is a value, not a mapping or a list")


def _threat_defaults(raw: dict) -> None:
    """Fill the training ``eps`` / ``step_size`` of every target and defense, and the ``step_size`` of
    every attack, that leave them unset (and whose options have them) with the threat's, where that
    differs from the options' own default (so that configs at the default keep their keys)."""
    threat = raw.get("threat")
    if not isinstance(threat, dict):
        return
    rows = [(t, "train", TrainConfig, ("eps", "step_size")) for t in raw.get("targets") or [] if isinstance(t, dict)]
    for kind, registry, options, attr, keys in (("defenses", DEFENSES, "train", "TrainConfig", ("eps", "step_size")),
                                                ("attacks", ATTACKS, "params", "Params", ("step_size",))):
        for item in raw.get(kind) or []:
            registered = item.get(kind[:-1]) or item.get("name") if isinstance(item, dict) else None
            if not isinstance(registered, str):
                continue
            try:
                rows.append((item, options, getattr(registry.get(registered), attr, None), keys))
            except BenchError:  # an unknown name: its validation says so
                continue
    for row, options, cls, keys in rows:
        given = row.setdefault(options, {}) if options == "params" else row.get(options)
        if cls is None or not dataclasses.is_dataclass(cls) or not isinstance(given, dict):
            continue
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key in keys:
            value = threat.get(key)
            if isinstance(value, str) and FRACTION.fullmatch(value.strip()):  # eps: 8/255
                value = fraction(value)
            valid = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
            if key in defaults and key not in given and valid and value != defaults[key]:
                given[key] = value  # (a bad threat value stays where it is, for its own error)


# ----------------------------------------------------------------------------- targets
def classifier_card(arch: str, train, tcfg: TrainConfig, result, device, **extra: Any) -> dict:
    """The model card of a target trained by :func:`train_classifier` on ``train``."""
    return {
        "arch": arch, "num_classes": train.num_classes, "in_channels": train.channels,
        "mean": list(train.mean), "std": list(train.std), "classes": train.classes,
        "dataset": train.describe(), "method": tcfg.method, "train_config": asdict(tcfg),
        "metrics": result.metrics,
        "training": {"seconds": result.seconds, "seconds_per_epoch": result.seconds_per_epoch,
                     "history": result.history, "device": str(device)},
        **extra,
    }


def train_split(ds: DatasetSpec, cfg: ExperimentConfig):
    """The training split a run's targets and defenses train on."""
    return load_dataset(ds.name, "train", n=ds.n_train, seed=cfg.seed, root=ds.root, download=ds.download,
                        **ds.options)


def data_identity(ds: DatasetSpec) -> dict:
    """A dataset entry as hashes see it: where it is read from (``root``) and whether a missing copy
    is fetched (``download``) change no number."""
    return asdict(ds) | {"root": None, "download": False}


def target_identity(target: TargetSpec) -> dict:
    """``asdict(target)`` as the artifact and cell hashes see it: ``train.deterministic`` only when
    on (the keys of targets trained before the option existed stay what they were)."""
    out = asdict(target)
    if out.get("train") is not None and not out["train"].get("deterministic"):
        out["train"].pop("deterministic", None)
    out.pop("model_dir", None)  # where the weights are read from: no number depends on it
    if out.get("robustbench") is None:  # (identities of targets from before the key stay the same)
        out.pop("robustbench", None)
    return out


def target_key(ds: DatasetSpec, target: TargetSpec, seed: int) -> str:
    return artifact_key({
        "v": ARTIFACT_VERSION, "dataset": data_identity(ds), "arch": target.arch,
        "arch_options": target.arch_options, "train": target_identity(target)["train"] | {"progress": None,
        "eval_n": None, "eval_pgd_steps": None, "eval_batch_size": None}, "seed": seed,
    })


def _state_sha256(model: torch.nn.Module) -> str:
    """A hash of a model's weights (names, shapes, values), for a model whose file is not at hand."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_robustbench_target(ds: DatasetSpec, target: TargetSpec, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A RobustBench model as the target, with a card that names it and the hash of its weights file."""
    from benchmark.checkpoint import sha256_file
    from benchmark.models.zoo import load_robustbench

    family = "cifar10" if ds.name.startswith("cifar10") else ds.name
    model_dir = target.model_dir or "models"
    model = load_robustbench(target.robustbench, dataset=family, threat_model="Linf", model_dir=model_dir)
    weights = Path(model_dir) / family / "Linf" / f"{target.robustbench}.pt"
    card = {"arch": f"robustbench:{target.robustbench}", "num_classes": 10, "dataset": family,
            "method": "robustbench", "mean": [0.0] * 3, "std": [1.0] * 3,
            "sha256": sha256_file(weights) if weights.is_file() else _state_sha256(model),
            "source": f"RobustBench model {target.robustbench} (Linf, {family}) from {model_dir}"}
    return model.to(device).eval(), card


def prepare_target(ds: DatasetSpec, target: TargetSpec, cfg: ExperimentConfig, device: torch.device,
                   artifacts: Path, progress: bool = True, train: bool = True) -> tuple[torch.nn.Module, dict, bool]:
    """Train, or load from the artifact folder, the target ``target`` on ``ds``. Returns
    (model, card, reused). ``train=False``: load only (a report never trains)."""
    if target.pretrained is not None:
        model, card = load_pretrained(target.pretrained, device)
        return model, card, True
    if target.robustbench is not None:
        return *load_robustbench_target(ds, target, device), True
    if target.checkpoint is not None:
        model, card = load_checkpoint(target.checkpoint, device)
        return model, card, True
    key = target_key(ds, target, cfg.seed)
    stem = artifacts / "targets" / f"{ds.name}-{target.name}-{key}"
    together = distributed.active()  # under torchrun every rank trains the target (DDP)
    (model, card), reused = get_or_build(
        stem, f"target {ds.name}/{target.name}", lambda path: load_checkpoint(path, device),
        lambda: _train_target(ds, target, cfg, device, key, stem, progress), train=train, together=together)
    return model, card, reused


def _train_target(ds: DatasetSpec, target: TargetSpec, cfg: ExperimentConfig, device: torch.device, key: str,
                  stem: Path, progress: bool) -> tuple[torch.nn.Module, dict]:
    train = train_split(ds, cfg)
    # Initial weights from a seed of their own: whatever ran before (other cells, other targets)
    # must not change what this artifact is.
    torch.manual_seed(int(key[:8], 16) ^ cfg.seed)
    model = create_model(target.arch, num_classes=train.num_classes, in_channels=train.channels,
                         mean=train.mean, std=train.std, **target.arch_options)
    tcfg = replace(target.train, progress=target.train.progress and progress)
    partial = EpochCheckpoint(stem.with_name(stem.name + ".partial"), key)  # a killed training resumes here
    log.info("target %s/%s: training %s (%s, %d epochs, %d images) on %s%s", ds.name, target.name,
             target.arch, tcfg.method, tcfg.epochs, len(train), device,
             f" (DDP over {distributed.size()} ranks)" if distributed.active() else "")
    result = train_classifier(model, train, tcfg, device, eval_data=None, desc=f"{ds.name}/{target.name}",
                              checkpoint=partial, ddp=distributed.active())
    card = classifier_card(target.arch, train, tcfg, result, device, arch_options=target.arch_options,
                           artifact_key=key)
    card["dataset"]["spec"] = asdict(ds)
    save(model, stem, card, together=distributed.active())  # DDP: every rank trained the same weights
    if distributed.is_main():
        partial.clear()
    return model.eval(), read_card(stem)


# ----------------------------------------------------------------------------- defenses
def defense_key(ds: DatasetSpec, spec: DefenseSpec, target_sha: str, seed: int) -> str:
    cls = DEFENSES.get(spec.registered)
    return artifact_key({
        "v": ARTIFACT_VERSION, "code": getattr(cls, "version", 1), "defense": spec.registered,
        # options that only change inference (NRP's dynamic mode) do not change what training makes
        "options": {k: v for k, v in spec.options.items() if k not in getattr(cls, "inference_options", ())},
        "train": {k: v for k, v in spec.train.items() if k != "progress"},
        "target": target_sha,
        "dataset": data_identity(ds), "seed": seed,
    })


def prepare_defense(ds: DatasetSpec, spec: DefenseSpec, classifier: torch.nn.Module, target_card: dict,
                    cfg: ExperimentConfig, device: torch.device, artifacts: Path, train_data,
                    data_shape: tuple[int, int] | None = None, progress: bool = True,
                    train: bool = True, together: bool = False) -> tuple[Any, dict | None]:
    """Build the defense; train it (or reuse its cached artifact) if it is trainable.

    ``train_data`` is a callable returning the training split (loaded only if needed).
    ``together``: every torchrun rank calls this at once and trains data-parallel (defenses that
    declare ``data_parallel``); otherwise one process trains.
    Returns (defense, card or None for defenses without weights).
    """
    from benchmark.checkpoint import load_into, load_verified_state

    key = defense_key(ds, spec, target_card["sha256"], cfg.seed)
    torch.manual_seed(int(key[:8], 16) ^ cfg.seed)  # initial weights independent of what ran before
    defense = build_defense(spec, f"defense {spec.name!r}", data_shape)
    if hasattr(defense, "attach_classifier"):  # the defense retrains its own copy of the target (ME-Net)
        defense.attach_classifier(classifier)
    if spec.checkpoint is not None:
        state, card = load_verified_state(spec.checkpoint, "defense")
        load_into(defense, state, f"defense checkpoint {spec.checkpoint}")
        return defense.to(device).eval(), card
    if not defense.trainable:
        return defense.to(device).eval(), None
    stem = artifacts / "defenses" / f"{ds.name}-{spec.name}-{key}"

    def load(path: Path):
        state, card = load_verified_state(path, "defense")
        load_into(defense, state, f"defense artifact {path}")
        return defense.to(device).eval(), card

    # rows trained identically under another name (NRP and NRP-dynamic) share one artifact and one lock
    (defense, card), _ = get_or_build(
        stem, f"defense {ds.name}/{spec.name}", load,
        lambda: _train_defense(ds, spec, defense, classifier, target_card, cfg, device, artifacts, train_data,
                               key, stem, progress, together),
        train=train, together=together, lock=stem.parent / f"{ds.name}-{key}.lock",
        also=lambda: [p.with_suffix("") for p in sorted(stem.parent.glob(f"{ds.name}-*-{key}.json"))])
    return defense, card


COLLAPSE_N = 256  # training images a trained defense's predictions are checked on


def training_collapse(defense, classifier: torch.nn.Module, train, stuck: str | None = None) -> str | None:
    """Why a trained defense is collapsed, or None: every prediction of the defended model on the first
    training images is one class (a constant output, or one the target maps to one class) where its
    classifier alone predicts several. Iterative
    purifiers (``prefers_bpda``: long chains) are not checked here; their rows' checks still flag a
    degenerate row."""
    from defenses.base import DefendedModel

    if getattr(defense, "prefers_bpda", False):
        return None
    model = DefendedModel.for_defense(defense, classifier)
    device = defense._device()
    head = train.head(min(COLLAPSE_N, len(train))).to(device)
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        preds = model(head.as_float()).argmax(1)
        alone = model.classifier(head.as_float()).argmax(1)
    if len(preds) < 2 or int(preds.unique().numel()) > 1 or int(alone.unique().numel()) == 1:
        return None  # (a target that itself predicts one class: nothing the defense's training did)
    return (f"every prediction on {len(preds)} training images is class {int(preds[0])}, where the classifier alone "
            f"predicts {int(alone.unique().numel())} classes" + (f"; {stuck}" if stuck else ""))


def _train_defense(ds: DatasetSpec, spec: DefenseSpec, defense, classifier: torch.nn.Module, target_card: dict,
                   cfg: ExperimentConfig, device: torch.device, artifacts: Path, train_data, key: str, stem: Path,
                   progress: bool, together: bool) -> tuple[Any, dict]:
    train_cfg = spec.train_config()
    if train_cfg is not None and hasattr(train_cfg, "progress"):
        train_cfg = replace(train_cfg, progress=train_cfg.progress and progress)
    classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    defense.to(device)
    log.info("defense %s/%s: training on %s%s", ds.name, spec.name, device,
             f" (data-parallel over {distributed.size()} ranks)" if distributed.active() else "")
    context = TrainContext(
        device, cfg.seed,
        # stages rows may share when they differ only later (DIR's pre-training, the static pairs)
        stages=StageStore(artifacts / "stages" / f"{ds.name}-{target_card['sha256'][:16]}", together),
        checkpoint=EpochCheckpoint(stem.with_name(stem.name + ".partial"), key))  # a killed training resumes
    with compiled(defense.compile_modules(training=True), bool(getattr(train_cfg, "compile", False))):
        result = defense.fit(classifier, train_data(), context, config=train_cfg)
    collapsed = training_collapse(defense, classifier, train_data(), getattr(result, "stuck", None))
    if collapsed:
        raise BenchError(f"defense {spec.name!r}: its training collapsed ({collapsed}); nothing was saved. Change "
                         f"its train options (lr, epochs{', warmup_epochs' if hasattr(train_cfg, 'warmup_epochs') else ''})"
                         " or the seed")
    card = {
        "kind": "defense", "defense": spec.registered, "name": spec.name, "options": spec.options,
        "train": spec.train, "target_sha256": target_card["sha256"], "artifact_key": key,
        "declarations": defense.declarations(), "fit": asdict(result),
    }
    if together:  # every rank goes on with rank 0's weights and statistics, as saved
        distributed.broadcast_module(defense)
    save(defense, stem, card, together)  # alone, or rank 0 of ranks that trained together
    if distributed.is_main():
        context.checkpoint.clear()
    return defense.eval(), read_card(stem)
