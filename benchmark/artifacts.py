"""One artifact store: everything a run trains and caches goes through :func:`get_or_build`.

That is the targets (``artifacts/targets``), the trained defenses (``artifacts/defenses``) and the
training stages that rows differing only later can share (:class:`StageStore`,
``artifacts/stages``: DIR's pre-training, the static adversarial pairs of the pair-based
baselines). For each, one place owns:

* the file: ``<folder>/<name>-<key>`` (a ``.json`` card naming a ``.safetensors`` file with its
  sha256), where ``key`` is the content key of what the artifact depends on;
* verified loading: the card is read and the weights' hash checked before anything is used, and
  a file that fails (corrupt, truncated, edited) is rebuilt, never trusted, with a warning;
* ownership: one worker builds an artifact (a lock next to it); another that needs it waits,
  then loads it;
* agreement between torchrun ranks that build ``together``: they all load or all build;
* writing: the main rank saves the module and its card (atomically); ranks that built together
  wait for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from benchmark import distributed
from benchmark.checkpoint import (
    check_fits,
    checkpoint_paths,
    load_into,
    load_verified_state,
    save_checkpoint,
)
from benchmark.errors import BenchError, CheckpointError
from benchmark.io import artifact_key
from benchmark.locks import OwnerLock

log = logging.getLogger("purifybench")

T = TypeVar("T")


def card_path(stem: Path) -> Path:
    return checkpoint_paths(stem)[1]


def _agreed(found, together: bool):
    """``found`` if every rank that builds together found the artifact, else None on every rank (so
    that they all build, or all load)."""
    if together and not all(distributed.gather(found is not None)):
        return None
    return found


@contextmanager
def owned(path: Path, what: str, together: bool = False):
    """Hold the lock ``path``: one worker builds an artifact; another that needs it waits for it.
    Ranks that build ``together`` (torchrun) share rank 0's lock."""
    lock = OwnerLock(path)
    if distributed.is_main() or not together:
        lock.wait(on_wait=lambda owner: log.info("%s: another worker (%s) is building it; waiting", what, owner))
    if together:
        distributed.barrier()
    try:
        yield
    finally:
        lock.release()


def get_or_build(stem: Path, what: str, load: Callable[[Path], T], build: Callable[[], T], *,
                 train: bool = True, together: bool = False, lock: Path | None = None,
                 also: Callable[[], list[Path]] | None = None) -> tuple[T, bool]:
    """The artifact at ``stem``: ``(load(stem), True)`` if a verified one is there, else
    ``(build(), False)`` under the lock (``build`` trains and saves it, :func:`save`).

    ``load(path)`` raises :class:`CheckpointError` for a file it cannot trust: the artifact is then
    rebuilt. ``also()`` lists other files holding the same artifact (a row trained identically
    under another name), tried when ``stem`` has none. ``train=False``: never build (a report or a
    cluster's cell stage): a missing artifact is a one-line error. ``lock``: the lock file, when
    artifacts of several stems must wait for each other (default: next to ``stem``)."""

    def cached():
        paths = [stem] if card_path(stem).is_file() else (also() if also is not None else [])
        for path in paths:
            if not card_path(path).is_file():
                continue
            try:
                found = load(path)
            except CheckpointError as exc:
                log.warning("%s: cached artifact %s rejected (%s); building it again", what, path.name, exc)
                continue
            log.info("%s: reusing %s", what, path.name)
            return found
        return None

    if (found := _agreed(cached(), together)) is not None:
        return found, True
    if not train:
        raise BenchError(f"{what}: no trained artifact {card_path(stem)} in the run")
    with owned(lock or stem.with_name(stem.name + ".lock"), what, together):
        if (found := _agreed(cached(), together)) is not None:  # another worker built it while we waited
            return found, True
        return build(), False


def save(module: nn.Module, stem: Path, card: dict, together: bool = False) -> None:
    """Write an artifact built by this process (the main rank, when ranks built it together; the
    others wait for it)."""
    if distributed.is_main():
        save_checkpoint(module, stem, card)
    if together:
        distributed.barrier()


@dataclass
class StageStore:
    """Training stages cached for rows that differ only after them (``folder``: one per dataset and
    target). ``together``: torchrun ranks train data-parallel and build each stage together."""

    folder: Path
    together: bool = False

    def get_or_build(self, name: str, key: dict[str, Any], module: nn.Module, build: Callable[[], dict],
                     what: str) -> tuple[dict, bool]:
        """The stage ``name`` for content ``key``: its weights loaded (verified) into ``module`` and
        its card, or ``build()`` run (it trains ``module`` and returns the card) and saved.
        Returns (card, reused). ``module`` is changed only once the ranks agree to load."""
        stem = Path(self.folder) / f"{name}-{artifact_key(key)}"

        def load(path: Path) -> tuple[dict, dict]:
            state, card = load_verified_state(path, "defense")
            check_fits(module, state, f"{what} {path}")
            return state, card

        def build_and_save() -> tuple[None, dict]:
            card = {"kind": "defense", "stage": name, **build()}
            save(module, stem, card, self.together)
            return None, card

        (state, card), reused = get_or_build(stem, what, load, build_and_save, together=self.together)
        if reused:
            load_into(module, state, f"{what} {stem}")
        return card, reused


def stage(store: StageStore | None, name: str, key: dict[str, Any], module: nn.Module, build: Callable[[], dict],
          what: str) -> tuple[dict, bool]:
    """:meth:`StageStore.get_or_build`, or just ``build()`` outside a run (no store)."""
    if store is None:
        return build(), False
    return store.get_or_build(name, key, module, build, what)
