"""Ownership markers for work shared by several workers on one results folder.

A lock is a small JSON file created with ``O_CREAT | O_EXCL`` (atomic on local file systems and
on NFSv3+), naming its owner: host, pid, Slurm job, a random token. While it is held a background
thread touches it every ``heartbeat`` seconds. It is stale, and may be broken by another worker,
when its owner is a dead process on the same host, or when it has not been touched for
``stale_after`` seconds (an owner on another node that was killed). Breaking goes through a
second marker (``<lock>.break``) so that two workers never both break the same lock and then
both take it; a breaker that dies leaves a marker that is itself stale after ``stale_after``.

The results stay sound without locks (records are written atomically and verified by hash);
locks only stop two workers from spending time on the same cell or artifact.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from benchmark.errors import BenchError

STALE_AFTER = 300.0
HEARTBEAT = 30.0


def owner_info() -> dict:
    """Who this process is, as written into locks and records."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": job or os.environ.get("SUBMITIT_JOB_ID")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    except OSError:
        return False
    return True


def _read(path: Path) -> tuple[dict | None, float | None]:
    """(owner, mtime) of a lock file; (None, None) if it is gone; ({}, mtime) if unreadable."""
    try:
        mtime = path.stat().st_mtime
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except OSError:
        return {}, time.time()
    try:
        owner = json.loads(text)
    except ValueError:  # being written right now, or truncated by a crash: judged by its age
        owner = {}
    return (owner if isinstance(owner, dict) else {}), mtime


def is_stale(owner: dict, mtime: float, stale_after: float = STALE_AFTER) -> bool:
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        if not _pid_alive(owner["pid"]):
            return True
    return time.time() - mtime > stale_after


class OwnerLock:
    """``with OwnerLock(path) as lock: if lock.held: ...``; or ``acquire()`` / ``release()``."""

    def __init__(self, path: str | Path, *, stale_after: float = STALE_AFTER, heartbeat: float = HEARTBEAT) -> None:
        self.path = Path(path)
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self.token is not None

    def owner(self) -> dict | None:
        return _read(self.path)[0]

    def describe_owner(self) -> str:
        owner = self.owner() or {}
        return ", ".join(f"{k} {owner[k]}" for k in ("host", "pid", "job") if owner.get(k) is not None) or "unknown"

    def acquire(self) -> bool:
        """Take the lock if it is free or stale; False if a live owner holds it."""
        if self.held:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                return True
            owner, mtime = _read(self.path)
            if owner is None:  # released in between: try again
                continue
            if not is_stale(owner, mtime, self.stale_after) or not self._break(owner):
                return False
        return False

    def wait(self, poll: float = 2.0, timeout: float | None = None, on_wait=None) -> None:
        """Block until the lock is ours (``on_wait(owner)`` is called once if we have to wait)."""
        start = time.monotonic()
        waited = False
        while not self.acquire():
            if not waited and on_wait is not None:
                on_wait(self.describe_owner())
            waited = True
            if timeout is not None and time.monotonic() - start > timeout:
                raise BenchError(f"timed out after {timeout:.0f} s waiting for {self.path} "
                                 f"(held by {self.describe_owner()})")
            time.sleep(poll)

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        owner, _ = _read(self.path)
        if owner is not None and owner.get("token") == self.token:  # never remove a lock someone else took
            self.path.unlink(missing_ok=True)
        self.token = None

    def __enter__(self) -> OwnerLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- internals ------------------------------------------------------------------------
    def _create(self) -> bool:
        token = uuid.uuid4().hex
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(owner_info() | {"token": token, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        self.token = token
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.path.name}", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def _break(self, seen: dict) -> bool:
        """Remove a stale lock whose owner we read as ``seen``, unless someone else is doing it or
        it changed hands in the meantime."""
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _, mtime = _read(breaker)
            if mtime is not None and time.time() - mtime > self.stale_after:
                breaker.unlink(missing_ok=True)  # a breaker that died: try again
                return self._break(seen)
            return False
        os.close(fd)
        try:
            owner, mtime = _read(self.path)
            if owner is None:
                return True
            if owner.get("token") != seen.get("token") or not is_stale(owner, mtime, self.stale_after):
                return False
            self.path.unlink(missing_ok=True)
            return True
        finally:
            breaker.unlink(missing_ok=True)


def sweep_stale_locks(run_dir: str | Path, stale_after: float = STALE_AFTER) -> int:
    """Remove the stale locks a killed worker left in a results folder (cells, checks, artifacts);
    returns how many."""
    run_dir = Path(run_dir)
    removed = 0
    paths = sorted((run_dir / "locks").glob("*.lock")) + sorted((run_dir / "artifacts").rglob("*.lock"))
    for path in paths:  # artifacts: targets/, defenses/ and the shared stages (stages/<dataset>-<target>/)
        owner, mtime = _read(path)
        if owner is not None and is_stale(owner, mtime, stale_after):
            lock = OwnerLock(path, stale_after=stale_after)
            if lock._break(owner):
                removed += 1
    return removed
