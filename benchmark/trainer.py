"""The epoch loop the defenses' trainings share.

A defense supplies what is its own: its optimizers (and schedules), the generators its batches and
steps draw from, the batches of an epoch, and one ``step(batch) -> {metric: tensor}`` that
updates its weights. :class:`Trainer` owns the rest: resuming after the last complete epoch of a
killed training (``context.checkpoint``), the progress bar, the per-epoch history (means of the
step's metrics weighted by batch size, seconds), the divergence check (a non-finite metric or
weight ends the training with a one-line error), saving the per-epoch state and calling
``context.on_epoch``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from benchmark.errors import BenchError
from benchmark.resume import LoopState


class EpochLog:
    """Per-epoch history rows with loss averages, times and a divergence check."""

    def __init__(self, name: str, module: nn.Module, device: torch.device) -> None:
        self.name, self.module, self.device = name, module, device
        self.rows: list[dict] = []

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, n: int, **losses: torch.Tensor) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float() * n
        self.count += n

    def end(self, epoch: int, **extra) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        row = {"phase": "train", "epoch": epoch,
               **{k: float(v) / max(1, self.count) for k, v in self.sums.items()},
               "seconds": time.perf_counter() - self.t0, **extra}
        self.rows.append(row)
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad or not all(torch.isfinite(p).all() for p in self.module.parameters()):
            raise BenchError(f"{self.name} training diverged in epoch {epoch} ({', '.join(bad) or 'weights'} "
                             "not finite); lower its lr in the defense's train options")
        return row

    def seconds_per_epoch(self) -> float:
        secs = sorted(r["seconds"] for r in self.rows)
        return secs[len(secs) // 2] if secs else 0.0


class Trainer:
    """``epochs`` epochs of ``defense``'s training (``name`` in messages and the progress bar).
    Everything the loop draws from must be in ``optimizers``, ``gens`` and ``schedulers`` (and
    ``modules``, for state outside the defense's own submodules) so that a resumed training is
    bit-identical to an uninterrupted one."""

    def __init__(self, defense: nn.Module, name: str, context, epochs: int, *,
                 optimizers: dict[str, torch.optim.Optimizer], gens: dict[str, torch.Generator],
                 schedulers: dict | None = None, modules: dict[str, nn.Module] | None = None,
                 progress: bool = True, started: float | None = None, steps_per_epoch: int | None = None) -> None:
        self.defense, self.name, self.epochs, self.progress = defense, name, epochs, progress
        self.steps = steps_per_epoch  # the progress bar counts batches when given, else epochs
        self.started = time.perf_counter() if started is None else started
        self.log = EpochLog(name, defense, context.device)
        self.loop = LoopState(defense, name, context, optimizers=optimizers, gens=gens, schedulers=schedulers,
                              modules=modules)

    def fit(self, batches: Callable[[int], Iterable[tuple]], step: Callable[[tuple], dict[str, torch.Tensor]],
            epoch_info: Callable[[], dict] | None = None):
        """Run the epochs not yet done: ``batches(epoch)`` yields the batches (tuples whose first
        item holds the examples), ``step(batch)`` trains on one and returns its metrics,
        ``epoch_info()`` adds to the epoch's history row (e.g. the learning rate). Returns the
        defense's :class:`defenses.base.FitResult`, the defense in eval mode."""
        from defenses.base import FitResult  # defenses import this module

        first, self.log.rows = self.loop.resume()
        per = self.steps or 1
        with tqdm(total=self.epochs * per, initial=first * per, desc=self.name.lower(), disable=not self.progress,
                  leave=False) as bar:
            for epoch in range(first + 1, self.epochs + 1):
                self.log.start()
                for batch in batches(epoch):
                    self.log.add(len(batch[0]), **step(batch))
                    if self.steps:
                        bar.update(1)
                self.log.end(epoch, **(epoch_info() if epoch_info is not None else {}))
                self.loop.epoch_done(epoch, self.epochs, self.log.rows)
                if not self.steps:
                    bar.update(1)
        self.defense.eval()
        return FitResult(seconds=time.perf_counter() - self.started, seconds_per_epoch=self.log.seconds_per_epoch(),
                         epochs=self.epochs, history=self.log.rows)
