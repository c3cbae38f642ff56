"""Result records: one JSON file per cell, written atomically, verified on read.

A record carries the cell key, n, the number correct, the accuracy with its
Wilson 95% interval, per-sample correctness (a '0'/'1' string in the order of
``sample_indices``), cost figures and the run manifest. Schema 2 adds the
scoring draws: ``draws`` (R), ``scores`` (all-R, mean over draws, majority vote,
first draw, each with n_correct, accuracy and Wilson interval) and, when R > 1,
``correct_draws`` (per sample, how many draws were correct, one base-36 digit),
``correct_majority`` and ``correct_single`` ('0'/'1' strings). ``correct`` is then
"correct under all R draws". Schema-1 records (written before per-draw scoring)
still read: they were scored on one draw. Its ``checksum`` is the
sha256 of the record's canonical JSON without that field; a record whose
checksum fails is treated as missing (recomputed), never trusted.

In code a record is a :class:`CellRecord` (typed fields, ``to_json`` /
``from_json``); readers use its fields, never dict look-ups.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from benchmark.config import subkey
from benchmark.io import atomic_write_text

SCHEMA = "purifybench-record/2"
OLD_SCHEMAS = ("purifybench-record/1",)  # readable: scored on one draw of a stochastic defense
DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


class RecordError(ValueError):
    pass


def _canonical(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(_canonical(body).encode()).hexdigest()


class Typed:
    """A dataclass that crosses files as JSON: ``to_json`` gives plain data, ``from_json`` builds it
    back, checking it (:class:`RecordError` names ``where`` and what is wrong). Fields holding other
    :class:`Typed` classes are listed in ``NESTED`` (field -> class, or ``(list, class)`` /
    ``(dict, class)`` for a list or a mapping of them); ``None`` is allowed there only where the
    field's default is ``None``. ``where`` names the file, ending in ':' (``file.json:``)."""

    NESTED: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_json(cls, data: Any, where: str = "file:"):
        if isinstance(data, cls):
            return data
        at = where if where.endswith(":") else where + ":"  # "file.json: a.b:" before the message
        if not isinstance(data, dict):
            raise RecordError(f"{at} expected an object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise RecordError(f"{at} unknown field(s) {', '.join(map(str, unknown))}")
        kw = {}
        for k, v in data.items():
            kind = cls.NESTED.get(k)
            if v is None and kind is not None and fields[k].default is not None:
                raise RecordError(f"{subkey(where, k)}: must not be null")
            kw[k] = v if kind is None or v is None else _nested(kind, v, subkey(where, k))
        try:
            return cls(**kw)
        except TypeError as exc:
            raise RecordError(f"{at} malformed ({exc})") from None
        except RecordError as exc:  # the class's own consistency check
            raise RecordError(f"{at} {exc}") from None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _nested(kind, value: Any, where: str):
    """``value`` read as ``kind``: a Typed class, or (list, class) / (dict, class)."""
    if not isinstance(kind, tuple):
        return kind.from_json(value, where)
    container, item = kind
    if not isinstance(value, container):
        raise RecordError(f"{where}: expected a {container.__name__}, got {type(value).__name__}")
    if container is list:
        return [item.from_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return {k: item.from_json(v, subkey(where, str(k))) for k, v in value.items()}


def write_record(path: Path, record: dict[str, Any] | Typed | CellRecord, schema: str = SCHEMA) -> Path:
    """Write ``record`` (a :class:`CellRecord` or another :class:`Typed` file, e.g. a row's checks)
    with its schema and checksum, atomically."""
    if isinstance(record, (CellRecord, Typed)):
        record = record.to_json()
    record = dict(record, schema=schema)
    record["checksum"] = checksum(record)
    return atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")


def read_verified(path: Path, what: str, schemas: tuple[str, ...], noun: str = "file") -> dict:
    """The JSON file at ``path`` (``what``: "record", "checks file") parsed, its schema one of
    ``schemas`` (the current one first) and its checksum right; :class:`RecordError` (one line) if not."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{what} {path} is unreadable ({exc})") from None
    found = data.get("schema") if isinstance(data, dict) else None
    if found not in schemas:
        raise RecordError(f"{what} {path} is not a {schemas[0]} {noun} (schema {found!r}; readable: "
                          f"{', '.join(schemas)})")
    if data.get("checksum") != checksum(data):
        raise RecordError(f"{what} {path} fails its checksum")
    return data


def read_record(path: Path) -> CellRecord:
    """Parse and verify a record; raise :class:`RecordError` (one line) if it cannot be trusted."""
    data = read_verified(path, "record", (SCHEMA, *OLD_SCHEMAS), noun="record")
    return CellRecord.from_json(data, where=f"record {path}")


def bit_string(flags) -> str:
    """A boolean tensor or sequence as a '0'/'1' string."""
    return "".join("1" if bool(f) else "0" for f in (flags.tolist() if hasattr(flags, "tolist") else flags))


def count_string(counts) -> str:
    """Per-sample draw counts (each 0..35) as one base-36 digit each."""
    return "".join(DIGITS[int(c)] for c in (counts.tolist() if hasattr(counts, "tolist") else counts))


def parse_counts(text: str) -> list[int]:
    return [DIGITS.index(c) for c in text]


@dataclass
class GradientCheck(Typed):
    """The input gradient of the attacks' loss at the clean images: how many images got a zero
    gradient, whether it was finite, and whether that flags masking."""

    n: int
    zero_gradient_fraction: float  # NaN when not finite
    finite: bool
    masked: bool


@dataclass(frozen=True)
class CellKey:
    dataset: str
    target: str
    defense: str
    attack: str


@dataclass
class Score:
    """One way of scoring a cell: how many correct (a mean over draws may be fractional), the
    accuracy and its Wilson 95% interval."""

    n_correct: float
    accuracy: float
    ci95: list[float]


@dataclass
class CellRecord:
    """One cell's result, as written to ``records/<cell>.json`` (:func:`write_record`) and read back
    (:func:`read_record`). Keys of the file that this version does not know are kept in ``extra``
    (and written back), so a newer writer's fields survive."""

    cell: CellKey
    n: int
    n_correct: int
    accuracy: float
    ci95: list[float]
    correct: str  # per sample, '1' = correct (under every scoring draw)
    threat: dict
    cell_id: str = ""
    cell_hash: str = ""
    attack_label: str | None = None
    attack_registered: str | None = None
    attack_params: dict = field(default_factory=dict)
    attack_info: dict = field(default_factory=dict)  # what the attack reported (resolved choices, survivors)
    threat_space: str | None = None
    defense_registered: str | None = None
    defense_options: dict = field(default_factory=dict)
    defense_train: dict | None = None
    defense_declarations: dict = field(default_factory=dict)
    bpda: bool = False
    dataset_copy: str | None = None
    profile: str | None = None
    draws: int = 1
    scores: dict[str, Score] = field(default_factory=dict)  # all / mean / majority / single
    correct_draws: str | None = None  # draws > 1: per sample, the correct draws (one base-36 digit)
    correct_majority: str | None = None
    correct_single: str | None = None
    random_score: bool | None = None  # None: a record from before it was stored
    # Other scorings of the same images, reported beside the cell (e.g. ``fixed-masks``: with the masks
    # the mask-adaptive attacker fixed): name -> {"correct": '0'/'1' string, n_correct, accuracy, ci95}
    diagnostic_scores: dict = field(default_factory=dict)
    sample_indices: list[int] | None = None
    seconds: float | None = None
    attack_seconds: float | None = None
    images_per_second: float | None = None
    forwards: int | None = None
    backwards: int | None = None
    score_forwards: int | None = None
    peak_gpu_memory_mb: float | None = None
    gradient_check: GradientCheck | None = None
    batch_size: int | str | None = None
    engine: dict | None = None
    ranks: int | None = None
    target: dict = field(default_factory=dict)
    defense_checkpoint_sha256: str | None = None
    defense_training: dict | None = None
    manifest: dict = field(default_factory=dict)
    worker: dict | None = None
    created: str | None = None
    schema: str = SCHEMA
    checksum: str | None = None
    extra: dict = field(default_factory=dict)

    REQUIRED = ("cell", "n", "n_correct", "accuracy", "ci95", "correct", "threat")

    @classmethod
    def from_json(cls, data: dict, where: str = "record") -> CellRecord:
        """The typed record of a parsed file, its consistency checked; :class:`RecordError` names
        what is wrong. A schema-1 record (one scoring draw) gets its single-draw scores."""
        missing = [k for k in cls.REQUIRED if k not in data]
        if missing:
            raise RecordError(f"{where}: missing field(s) {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw = {k: v for k, v in data.items() if k in names}
        try:
            kw["cell"] = CellKey(**data["cell"])
            kw["scores"] = {k: Score(**v) for k, v in (data.get("scores") or {}).items()}
            if kw.get("gradient_check") is not None:
                kw["gradient_check"] = GradientCheck.from_json(kw["gradient_check"], f"{where}: gradient_check")
            rec = cls(**kw, extra={k: v for k, v in data.items() if k not in names})
        except TypeError as exc:
            raise RecordError(f"{where}: malformed ({exc})") from None
        bits = rec.correct
        if not isinstance(bits, str) or len(bits) != rec.n or bits.count("1") != rec.n_correct:
            raise RecordError(f"{where}: per-sample results disagree with n / n_correct")
        if not isinstance(rec.draws, int) or rec.draws < 1:
            raise RecordError(f"{where}: draws must be an integer >= 1, got {rec.draws!r}")
        if rec.draws > 1:
            try:
                counts = parse_counts(rec.correct_draws)
            except (TypeError, ValueError):
                raise RecordError(f"{where}: draws={rec.draws} but no valid 'correct_draws'") from None
            if len(counts) != rec.n or any(c > rec.draws for c in counts) or \
                    any((c == rec.draws) != (b == "1") for c, b in zip(counts, bits)):
                raise RecordError(f"{where}: per-draw counts disagree with 'correct' and draws={rec.draws}")
        if not rec.scores:  # written before per-draw scoring: one draw
            from benchmark.stats import draw_scores

            flags = [b == "1" for b in bits]
            rec.scores = {k: Score(**v) for k, v in draw_scores([int(f) for f in flags], 1, flags, flags).items()}
        return rec

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["cell"] = dataclasses.asdict(self.cell)
        out["scores"] = {k: dataclasses.asdict(v) for k, v in self.scores.items()}
        if self.gradient_check is not None:
            out["gradient_check"] = self.gradient_check.to_json()
        return {**self.extra, **out}

    # -- what readers ask of a record ------------------------------------------------------
    @property
    def attack(self) -> str:
        """The registered attack."""
        return self.attack_registered or self.cell.attack

    @property
    def defense(self) -> str:
        """The registered defense."""
        return self.defense_registered or self.cell.defense

    @property
    def column(self) -> str:
        return self.attack_label or self.cell.attack

    @property
    def old_schema(self) -> bool:
        return self.schema in OLD_SCHEMAS

    def draw_counts(self) -> list[int]:
        """Per sample, how many of the scoring draws classified it correctly (0/1 for one draw)."""
        return parse_counts(self.correct_draws) if self.draws > 1 else [int(b) for b in self.correct]

    def single_draw_bits(self) -> str:
        """Per-sample correctness under one draw of the defense (the first), as a '0'/'1' string."""
        return self.correct_single or self.correct


def as_record(record: CellRecord | dict) -> CellRecord:
    """A typed record from a typed one or a parsed dict (tests and tools build dicts)."""
    return record if isinstance(record, CellRecord) else CellRecord.from_json(record)


def valid_record(path: Path, cell_hash: str | None = None) -> CellRecord | None:
    """The record at ``path`` if it exists, verifies and (optionally) matches ``cell_hash``."""
    if not Path(path).is_file():
        return None
    try:
        record = read_record(path)
    except RecordError:
        return None
    if cell_hash is not None and record.cell_hash != cell_hash:
        return None
    return record


class RunRecords(list):
    """A run's records (a list of :class:`CellRecord`), with ``excluded``: one line per record file
    left out and why (stale: computed under another plan; corrupt: fails its checksum or does not
    parse), and ``off_plan``: how many records belong to cells no longer in the plan."""

    def __init__(self, records=(), excluded: list[str] | None = None, off_plan: int = 0,
                 paths: list[Path] | None = None) -> None:
        super().__init__(records)
        self.excluded = excluded or []
        self.off_plan = off_plan
        self.paths = paths or []  # each record's file


RERUN = "a run of the config recomputes it"


def load_records(run_dir: Path, include_stale: bool = False) -> RunRecords:
    """Every valid record of a run whose cell hash matches the run's plan (``plan.json``), in the
    plan's order. A record computed under another plan (a changed eps, steps or draws whose rerun
    was interrupted or failed) is stale and a record that fails its checksum or does not parse is
    corrupt: both are left out and named in ``excluded`` (``include_stale``: stale ones are kept,
    and still named). Without a plan: every valid record of the folder."""
    run_dir = Path(run_dir)
    plan_path = run_dir / "plan.json"
    excluded: list[str] = []
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        entries = [(run_dir / "records" / f"{c['cell_id']}.json", c.get("cell_hash")) for c in plan["cells"]]
        planned = {p.name for p, _ in entries}
        off_plan = sum(1 for p in (run_dir / "records").glob("*.json") if p.name not in planned)
    else:
        entries = [(p, None) for p in sorted((run_dir / "records").glob("*.json"))]
        off_plan = 0
    out, paths = [], []
    for path, cell_hash in entries:
        if not path.is_file():
            continue
        try:
            rec = read_record(path)
        except RecordError as exc:
            excluded.append(f"{'corrupt' if 'checksum' in str(exc) else 'unreadable'}: {exc}; left out ({RERUN})")
            continue
        if cell_hash is not None and rec.cell_hash != cell_hash:
            excluded.append(f"stale: record {path} was computed under another plan (its cell's config, scoring "
                            f"or attack changed since); {'shown, as asked' if include_stale else 'left out'} ({RERUN})")
            if not include_stale:
                continue
        out.append(rec)
        paths.append(path)
    return RunRecords(out, excluded, off_plan, paths)
