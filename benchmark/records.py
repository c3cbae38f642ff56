"""Result records: one JSON file per cell, written atomically, verified on read.

A record carries the cell key, n, the number correct, the accuracy with its
Wilson 95% interval, per-sample correctness (a '0'/'1' string in the order of
``sample_indices``), cost figures and the run manifest. Its ``checksum`` is the
sha256 of the record's canonical JSON without that field; a record whose
checksum fails is treated as missing (recomputed), never trusted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from benchmark.io import atomic_write_text

SCHEMA = "purifybench-record/1"


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
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise RecordError(f"record {path} is not a {SCHEMA} record")
    if record.get("checksum") != checksum(record):
        raise RecordError(f"record {path} fails its checksum")
    bits = record.get("correct", "")
    if len(bits) != record.get("n") or bits.count("1") != record.get("n_correct"):
        raise RecordError(f"record {path}: per-sample results disagree with n / n_correct")
    return record


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
