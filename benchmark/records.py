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
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

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


def write_record(path: Path, record: dict[str, Any], schema: str = SCHEMA) -> Path:
    record = dict(record, schema=schema)
    record["checksum"] = checksum(record)
    return atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")


def read_record(path: Path) -> dict:
    """Parse and verify a record; raise :class:`RecordError` if it cannot be trusted."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"record {path} is unreadable ({exc})") from None
    if not isinstance(record, dict) or record.get("schema") not in (SCHEMA, *OLD_SCHEMAS):
        found = record.get("schema") if isinstance(record, dict) else None
        raise RecordError(f"record {path} is not a {SCHEMA} record (schema {found!r}; readable: "
                          f"{', '.join((SCHEMA, *OLD_SCHEMAS))})")
    if record.get("checksum") != checksum(record):
        raise RecordError(f"record {path} fails its checksum")
    bits = record.get("correct", "")
    if len(bits) != record.get("n") or bits.count("1") != record.get("n_correct"):
        raise RecordError(f"record {path}: per-sample results disagree with n / n_correct")
    draws = record.get("draws", 1)
    if not isinstance(draws, int) or draws < 1:
        raise RecordError(f"record {path}: draws must be an integer >= 1, got {draws!r}")
    if draws > 1:
        try:
            counts = draw_counts(record)
        except (KeyError, TypeError, ValueError):
            raise RecordError(f"record {path}: draws={draws} but no valid 'correct_draws'") from None
        if len(counts) != record["n"] or any(c > draws for c in counts) or \
                any((c == draws) != (b == "1") for c, b in zip(counts, bits)):
            raise RecordError(f"record {path}: per-draw counts disagree with 'correct' and draws={draws}")
    return record


def bit_string(flags) -> str:
    """A boolean tensor or sequence as a '0'/'1' string."""
    return "".join("1" if bool(f) else "0" for f in (flags.tolist() if hasattr(flags, "tolist") else flags))


def count_string(counts) -> str:
    """Per-sample draw counts (each 0..35) as one base-36 digit each."""
    return "".join(DIGITS[int(c)] for c in (counts.tolist() if hasattr(counts, "tolist") else counts))


def draw_counts(record: dict) -> list[int]:
    """Per sample, how many of the record's scoring draws classified it correctly (0/1 for one draw)."""
    if record.get("draws", 1) > 1:
        return [DIGITS.index(c) for c in record["correct_draws"]]
    return [int(b) for b in record["correct"]]


def single_draw_bits(record: dict) -> str:
    """Per-sample correctness under one draw of the defense (the first), as a '0'/'1' string."""
    return record.get("correct_single") or record["correct"]


def valid_record(path: Path, cell_hash: str | None = None) -> dict | None:
    """The record at ``path`` if it exists, verifies and (optionally) matches ``cell_hash``."""
    if not Path(path).is_file():
        return None
    try:
        record = read_record(path)
    except RecordError:
        return None
    if cell_hash is not None and record.get("cell_hash") != cell_hash:
        return None
    return record


def load_records(run_dir: Path) -> list[dict]:
    """Every valid record of a run, in the order of the run's plan when there is one."""
    run_dir = Path(run_dir)
    plan_path = run_dir / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        paths = [run_dir / "records" / f"{c['cell_id']}.json" for c in plan["cells"]]
    else:
        paths = sorted((run_dir / "records").glob("*.json"))
    out = []
    for p in paths:
        rec = valid_record(p)
        if rec is not None:
            out.append(rec)
    return out
