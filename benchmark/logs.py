"""The suite's one logger ("purifybench"), set up once per process (a run, a cluster worker)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("purifybench")


def setup_logging(out: Path | None, quiet: bool = False) -> None:
    """The suite's log to stderr (warnings only when ``quiet``) and, with ``out``, to ``out/run.log``."""
    from benchmark import distributed

    if not distributed.is_main():  # under torchrun only rank 0 reports and writes run.log
        quiet, out = True, None
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    log.addHandler(console)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(out / "run.log", encoding="utf-8")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    log.propagate = False


# ----------------------------------------------------------------------------- heartbeat
# Without progress bars (output to a file or a pipe) a long cell or training would print nothing for
# minutes. The run names what it is doing (:func:`activity`), loops report their step (:func:`step`),
# and a daemon thread logs one "still ..." line whenever the log has been quiet for ``every`` seconds.
class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.what: str | None = None
        self.since = 0.0
        self.step: tuple[str, int, int] | None = None
        self.last_line = time.monotonic()
        self.eta: Callable[[], str] | None = None


_state = _State()


class _Quiet(logging.Filter):
    """Notes the time of every line the suite's logger emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        _state.last_line = time.monotonic()
        return True


@contextmanager
def activity(what: str) -> Iterator[None]:
    """The run is doing ``what`` (a cell, a row's checks, a training) until the block ends."""
    with _state.lock:
        outer = (_state.what, _state.since, _state.step)
        _state.what, _state.since, _state.step = what, time.monotonic(), None
    try:
        yield
    finally:
        with _state.lock:
            _state.what, _state.since, _state.step = outer


def step(unit: str, done: int, total: int) -> None:
    """A loop inside the current activity finished ``done`` of its ``total`` ``unit``s (e.g. batches)."""
    with _state.lock:
        _state.step = (unit, done, total)


def duration(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def heartbeat_line() -> str | None:
    """The "still ..." line for the current activity, or None when there is none."""
    with _state.lock:
        what, since, st = _state.what, _state.since, _state.step
    if what is None:
        return None
    parts = [f"still {what}: {duration(time.monotonic() - since)}"]
    if st is not None:
        parts.append(f"{st[0]} {st[1]}/{st[2]} done")
    if _state.eta is not None:
        try:
            eta = _state.eta()
        except Exception:  # noqa: BLE001 - an estimate that fails leaves the line without it
            eta = ""
        if eta:
            parts.append(eta)
    return ", ".join(parts)


@contextmanager
def heartbeat(every: float = 30.0, eta: Callable[[], str] | None = None) -> Iterator[None]:
    """While the block runs, log a "still ..." line after every ``every`` seconds without a line.
    ``eta()``: the run's remaining-time text added to each such line."""
    stop = threading.Event()
    _state.eta = eta
    _state.last_line = time.monotonic()
    quiet = _Quiet()
    log.addFilter(quiet)

    def beat() -> None:
        while not stop.wait(min(5.0, every / 2)):
            if time.monotonic() - _state.last_line < every:
                continue
            try:
                line = heartbeat_line()
            except Exception:  # noqa: BLE001 - a display must never end the run, nor itself
                line = None
            if line is not None:
                log.info("%s", line)
            else:
                _state.last_line = time.monotonic()

    thread = threading.Thread(target=beat, name="purifybench-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        log.removeFilter(quiet)
        _state.eta = None
