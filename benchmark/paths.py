"""Where the suite keeps caches and looks for data."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Root of the suite's caches: ``$PURIFYBENCH_CACHE`` or ``~/.cache/purifybench``."""
    env = os.environ.get("PURIFYBENCH_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "purifybench"
    return path


def data_dir() -> Path:
    """Default root for downloadable datasets: ``$PURIFYBENCH_DATA`` or ``<cache>/data``."""
    env = os.environ.get("PURIFYBENCH_DATA")
    return Path(env).expanduser() if env else cache_dir() / "data"


def writable_dir(path: Path) -> bool:
    """True if files may be created in ``path`` (read-only folders are respected even for root)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return path.is_dir() and bool(mode & 0o200) and os.access(path, os.W_OK)
