"""Ownership markers: exclusive, broken only when stale (dead owner or no heartbeat), never
removing a lock that someone else holds."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

from benchmark.locks import OwnerLock, is_stale, sweep_stale_locks


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _foreign_lock(path, **owner):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": "theirs"} | owner))


def test_lock_is_exclusive_and_released(tmp_path):
    path = tmp_path / "locks" / "cell.lock"
    a, b = OwnerLock(path), OwnerLock(path)
    assert a.acquire() and a.held
    owner = json.loads(path.read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["token"] == a.token
    assert not b.acquire() and not b.held  # a live owner on this host: not stale
    a.release()
    assert not path.exists()
    assert b.acquire()
    b.release()


def test_lock_of_a_dead_process_is_broken(tmp_path):
    path = tmp_path / "cell.lock"
    _foreign_lock(path, pid=_dead_pid())
    lock = OwnerLock(path)
    assert lock.acquire()
    assert json.loads(path.read_text())["token"] == lock.token
    lock.release()


def test_lock_without_heartbeat_is_stale_after_the_timeout(tmp_path):
    path = tmp_path / "cell.lock"
    _foreign_lock(path, host="another-node", pid=1)  # a process elsewhere: judged by the file's age only
    assert not OwnerLock(path, stale_after=60).acquire()
    past = time.time() - 120
    os.utime(path, (past, past))
    assert is_stale(json.loads(path.read_text()), path.stat().st_mtime, 60)
    lock = OwnerLock(path, stale_after=60)
    assert lock.acquire()
    lock.release()


def test_heartbeat_keeps_a_long_held_lock_fresh(tmp_path):
    path = tmp_path / "cell.lock"
    lock = OwnerLock(path, heartbeat=0.05, stale_after=0.5)
    assert lock.acquire()
    past = time.time() - 100
    os.utime(path, (past, past))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 0.5  # touched again by the heartbeat
    lock.release()


def test_release_never_removes_a_lock_that_changed_hands(tmp_path):
    path = tmp_path / "cell.lock"
    lock = OwnerLock(path)
    assert lock.acquire()
    path.unlink()
    _foreign_lock(path, token="someone else")  # broken as stale and taken by another worker
    lock.release()
    assert json.loads(path.read_text())["token"] == "someone else"


def test_a_breaker_in_progress_stops_a_second_breaker(tmp_path):
    path = tmp_path / "cell.lock"
    _foreign_lock(path, pid=_dead_pid())
    (tmp_path / "cell.lock.break").write_text("")  # another worker is breaking it right now
    assert not OwnerLock(path).acquire()
    past = time.time() - 1000
    os.utime(tmp_path / "cell.lock.break", (past, past))  # that breaker died long ago
    lock = OwnerLock(path, stale_after=60)
    assert lock.acquire()  # the dead breaker's marker goes first, then the lock
    lock.release()


def test_wait_blocks_until_the_owner_releases(tmp_path):
    path = tmp_path / "artifact.lock"
    owner = OwnerLock(path)
    assert owner.acquire()
    threading.Timer(0.3, owner.release).start()
    waited = []
    t0 = time.monotonic()
    OwnerLock(path).wait(poll=0.05, on_wait=waited.append)
    assert time.monotonic() - t0 >= 0.25 and len(waited) == 1 and f"pid {os.getpid()}" in waited[0]


def test_sweep_removes_only_stale_locks(tmp_path):
    stale = tmp_path / "locks" / "a.lock"
    _foreign_lock(stale, pid=_dead_pid())
    artifact = tmp_path / "artifacts" / "targets" / "t.lock"
    _foreign_lock(artifact, pid=_dead_pid())
    live = OwnerLock(tmp_path / "locks" / "b.lock")
    assert live.acquire()
    assert sweep_stale_locks(tmp_path) == 2
    assert not stale.exists() and not artifact.exists() and live.path.exists()
    live.release()
