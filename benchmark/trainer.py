"""The epoch loop the defenses' trainings share.

A defense supplies what is its own: its optimizers (and schedules), the generators its batches and
steps draw from, the batches of an epoch, and one ``step(batch) -> {metric: tensor}`` that
updates its weights. :class:`Trainer` owns the rest: resuming after the last complete epoch of a
killed training (``context.checkpoint``), the progress bar, the per-epoch history (means of the
step's metrics weighted by batch size, seconds), the divergence check (a non-finite metric or
weight ends the training with a one-line error), saving the per-epoch state and calling
``context.on_epoch``.

A training counted in iterations rather than epochs (the EBM's) gives ``unit`` ("iteration"): each
"epoch" of the loop is then a period of ``steps_per_epoch`` iterations (a history row each, the last
one possibly shorter), ``total_steps`` is the budget, and ``save_every`` periods pass between saved
states.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from benchmark import distributed, logs
from benchmark.errors import BenchError
from benchmark.resume import LoopState

log = logging.getLogger("purifybench")
STUCK = 0.02  # a loss that ends within this fraction of its first step's value has not trained


class EpochLog:
    """Per-epoch history rows with loss averages, times and a divergence check."""

    def __init__(self, name: str, module: nn.Module, device: torch.device, phase: str = "train") -> None:
        self.name, self.module, self.device, self.phase = name, module, device, phase
        self.rows: list[dict] = []

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, n: int, **losses: torch.Tensor) -> None:
        if n == 0:  # a rank's empty slice of a last batch smaller than the world size
            return
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float() * n
        self.count += n

    def end(self, epoch: int, reduce: bool = False, period: str | None = None, **extra) -> dict:
        """The epoch's history row. ``reduce`` (data-parallel, every rank calling): the averages are
        over every rank's examples. ``period`` names the epoch in errors (default "epoch N")."""
        count = self.count
        if reduce:
            names = sorted(self.sums)
            packed = torch.stack([self.sums[k].reshape(()) for k in names]
                                 + [torch.tensor(float(count), device=self.device)])
            torch.distributed.all_reduce(packed)
            self.sums, count = dict(zip(names, packed[:-1], strict=True)), float(packed[-1])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        row = {"phase": self.phase, "epoch": epoch,
               **{k: float(v) / max(1, count) for k, v in self.sums.items()},
               "seconds": time.perf_counter() - self.t0, **extra}
        self.rows.append(row)
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad or not all(torch.isfinite(p).all() for p in self.module.parameters()):
            raise BenchError(f"{self.name} training diverged in {period or f'epoch {epoch}'} ({', '.join(bad) or 'weights'} "
                             "not finite); lower its lr in its train options")
        return row

    def seconds_per_epoch(self) -> float:
        secs = sorted(r["seconds"] for r in self.rows)
        return secs[len(secs) // 2] if secs else 0.0


def stuck_loss(rows: list[dict]) -> str | None:
    """Whether a training's loss (the first metric its step returned) ended within :data:`STUCK` of its
    value at the first step, over at least two epochs (periods); None when it moved, or cannot tell."""
    if len(rows) < 2:
        return None
    starts = [k for k in rows[0] if k.startswith("start_")]
    if not starts:
        return None
    name = starts[0][len("start_"):]
    first, last = rows[0][starts[0]], rows[-1].get(name)
    if not isinstance(last, float) or abs(last - first) > STUCK * abs(first):
        return None
    return f"its {name} stayed at its starting value ({first:.4g} at the first step, {last:.4g} in the last epoch)"


class Trainer:
    """``epochs`` epochs of ``defense``'s training (``name`` in messages and the progress bar).
    Everything the loop draws from must be in ``optimizers``, ``gens`` and ``schedulers`` (and
    ``modules``, for state outside the defense's own submodules) so that a resumed training is
    bit-identical to an uninterrupted one. A loop counted in ``unit``s saves how it counts with its
    state (e.g. "500 iterations per epoch"): a state saved under another counting is not resumed."""

    def __init__(self, defense: nn.Module, name: str, context, epochs: int, *,
                 optimizers: dict[str, torch.optim.Optimizer], gens: dict[str, torch.Generator],
                 schedulers: dict | None = None, modules: dict[str, nn.Module] | None = None,
                 progress: bool = True, started: float | None = None, steps_per_epoch: int | None = None,
                 reduce_metrics: bool | None = None, phase: str = "train", unit: str | None = None,
                 total_steps: int | None = None, save_every: int = 1) -> None:
        self.defense, self.name, self.epochs, self.progress = defense, name, epochs, progress
        self.steps = steps_per_epoch  # the progress bar counts batches when given, else epochs
        self.unit, self.save_every = unit, save_every
        self.total = total_steps or epochs * (steps_per_epoch or 1)
        # Data-parallel with every rank in the loop: metrics over all ranks (default: a defense that
        # trains data-parallel, under torchrun)
        self.reduce = (distributed.active() and bool(getattr(defense, "data_parallel", False))
                       if reduce_metrics is None else reduce_metrics)
        self.first = 0  # epochs already done when fit started (a resumed training)
        self.started = time.perf_counter() if started is None else started
        self.log = EpochLog(name, defense, context.device, phase)
        layout = None if unit is None else f"{steps_per_epoch} {unit}s per epoch"
        self.loop = LoopState(defense, name, context, optimizers=optimizers, gens=gens, schedulers=schedulers,
                              modules=modules, layout=layout)

    def fit(self, batches: Callable[[int], Iterable[tuple]], step: Callable[[tuple], dict[str, torch.Tensor]],
            epoch_info: Callable[[], dict] | None = None):
        """Run the epochs not yet done: ``batches(epoch)`` yields the batches (tuples whose first
        item holds the examples), ``step(batch)`` trains on one and returns its metrics,
        ``epoch_info()`` adds to the epoch's history row (e.g. the learning rate). Returns the
        defense's :class:`defenses.base.FitResult`, the defense in eval mode."""
        from defenses.base import FitResult  # defenses import this module

        first, self.log.rows = self.loop.resume()
        self.first = first
        per = self.steps or 1
        with tqdm(total=self.total, initial=min(self.total, first * per), desc=self.name.lower(),
                  disable=not self.progress, leave=False) as bar:
            for epoch in range(first + 1, self.epochs + 1):
                self.log.start()
                start: dict = {}
                for i, batch in enumerate(batches(epoch)):
                    metrics = step(batch)
                    if epoch == 1 and i == 0:  # the loss at the start (kept in the history: a resume keeps it)
                        start = {f"start_{k}": float(v.detach() if torch.is_tensor(v) else v)
                                 for k, v in list(metrics.items())[:1]}
                    self.log.add(len(batch[0]), **metrics)
                    if self.steps:
                        bar.update(1)
                        if self.unit:
                            logs.step(self.unit, (epoch - 1) * per + i + 1, self.total)
                        else:
                            logs.step(f"epoch {epoch}/{self.epochs}, batch", i + 1, self.steps)
                period = self._period(epoch)
                row = self.log.end(epoch, self.reduce, period, **(epoch_info() if epoch_info is not None else {}),
                                   **start)
                log.info("%s %s: %s, %.2f s", self.name, period, ", ".join(
                    f"{k} {v:.4g}" for k, v in row.items() if k not in ("phase", "epoch", "seconds")
                    and not k.startswith("start_") and isinstance(v, float)), row["seconds"])
                self.loop.epoch_done(epoch, self.epochs, self.log.rows, save=epoch % self.save_every == 0)
                if not self.steps:
                    bar.update(1)
        self.defense.eval()
        stuck = stuck_loss(self.log.rows)
        if stuck:
            log.warning("%s training: %s: it may have collapsed", self.name, stuck)
        return FitResult(seconds=time.perf_counter() - self.started, seconds_per_epoch=self.log.seconds_per_epoch(),
                         epochs=self.epochs, history=self.log.rows, stuck=stuck)

    def _period(self, epoch: int) -> str:
        """"epoch 3/10", or "iterations 41-60/70" for a training counted in ``unit``s."""
        if not self.unit:
            return f"epoch {epoch}/{self.epochs}"
        per = self.steps or 1
        return f"{self.unit}s {(epoch - 1) * per + 1}-{min(epoch * per, self.total)}/{self.total}"
