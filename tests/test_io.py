"""Atomic writes leave files with the mode a plain open would give them, not mkstemp's 0600."""

import os

from benchmark.io import atomic_write_json, atomic_write_text


def test_atomic_writes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        text = atomic_write_text(tmp_path / "table.md", "| a |\n")
        record = atomic_write_json(tmp_path / "records" / "cell.json", {"correct": "101"})
        assert (text.stat().st_mode & 0o777) == 0o644 and (record.stat().st_mode & 0o777) == 0o644
        os.umask(0o077)  # a private umask stays private
        assert (atomic_write_text(tmp_path / "private.md", "x").stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)
    assert text.read_text() == "| a |\n" and not list(tmp_path.rglob("*.tmp"))
