"""The suite's one logger ("purifybench"), set up once per process (a run, a cluster worker)."""

from __future__ import annotations

import logging
import sys
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
