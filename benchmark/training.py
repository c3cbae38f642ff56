"""Target-classifier training: natural, PGD adversarial training, TRADES and MART.

Data stay on the device as uint8 tensors; batches are sliced and augmented there
(no per-sample DataLoader). On CUDA the forward passes run under bf16 autocast
with channels_last memory layout; losses are computed in fp32.
"""

from __future__ import annotations

import gc
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Threat
from attacks.pgd import pgd_linf, trades_kl_linf
from benchmark import distributed
from benchmark.config import require, subkey
from benchmark.data import ImageData, augment
from benchmark.harness import run_attack
from benchmark.resume import EpochCheckpoint
from benchmark.runtime import deterministic_algorithms

log = logging.getLogger("purifybench")
Method = Literal["natural", "at", "trades", "mart"]


@dataclass
class TrainConfig:
    """How to train a target classifier. Defaults are the DIR paper's AT target recipe
    (SGD 0.1, momentum 0.9, weight decay 2e-4, PGD-5 at 8/255 with step 2/255), except the
    epoch count and a one-cycle schedule, which suit short runs."""

    method: Method = "natural"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    nesterov: bool = False
    schedule: Literal["onecycle", "step", "constant"] = "onecycle"
    milestones: list[float] = field(default_factory=lambda: [0.75, 0.9])  # fractions of training
    gamma: float = 0.1
    warmup_fraction: float = 0.3  # one-cycle: fraction of steps spent rising
    eps: float = 8 / 255
    step_size: float = 2 / 255
    attack_steps: int = 5
    beta: float = 6.0  # TRADES / MART
    augment: bool = True
    crop_padding: int = 4
    flip: bool = True
    bf16: Literal["auto", True, False] = "auto"
    channels_last: Literal["auto", True, False] = "auto"
    compile: bool = False  # torch.compile the model for the training steps (CUDA; first epoch pays the compile)
    # Bit-identical weights when the same training runs again on the same GPU model and software
    # (another job retraining the same target): benchmark.runtime.deterministic_algorithms
    deterministic: bool = False
    seed: int = 0
    eval_n: int | None = 1000
    eval_pgd_steps: int = 20
    eval_batch_size: int = 500
    progress: bool = True

    def validate(self, where: str = "train") -> None:
        require(self.epochs >= 1, subkey(where, "epochs"), f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, subkey(where, "batch_size"), f"must be >= 1, got {self.batch_size}")
        require(self.lr > 0, subkey(where, "lr"), f"must be > 0, got {self.lr}")
        require(0 <= self.momentum < 1, subkey(where, "momentum"), f"must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, subkey(where, "weight_decay"), f"must be >= 0, got {self.weight_decay}")
        require(0 <= self.eps <= 1, subkey(where, "eps"), f"must be in [0, 1], got {self.eps}")
        require(0 < self.step_size <= 1, subkey(where, "step_size"), f"must be in (0, 1], got {self.step_size}")
        require(self.attack_steps >= 1, subkey(where, "attack_steps"), f"must be >= 1, got {self.attack_steps}")
        require(self.beta >= 0, subkey(where, "beta"), f"must be >= 0, got {self.beta}")
        require(all(0 < m < 1 for m in self.milestones), subkey(where, "milestones"),
                f"must be fractions in (0, 1), got {self.milestones}")
        require(0 < self.warmup_fraction < 1, subkey(where, "warmup_fraction"), "must be in (0, 1)")
        require(self.crop_padding >= 0, subkey(where, "crop_padding"), "must be >= 0")
        require(self.eval_n is None or self.eval_n >= 1, subkey(where, "eval_n"), "must be >= 1 or null")
        require(self.eval_pgd_steps >= 0, subkey(where, "eval_pgd_steps"), "must be >= 0")


@dataclass
class TrainResult:
    history: list[dict]
    metrics: dict
    seconds: float
    seconds_per_epoch: float


def _use(flag: bool | str, device: torch.device) -> bool:
    return device.type == "cuda" if flag == "auto" else bool(flag)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.warmup_fraction,
            anneal_strategy="linear", div_factor=25.0, final_div_factor=1e3,
            cycle_momentum=False,
        )
    if cfg.schedule == "step":
        bounds = [int(m * total_steps) for m in cfg.milestones]
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: cfg.gamma ** sum(s >= b for b in bounds)
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def mart_loss(logits_adv: torch.Tensor, logits_nat: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """MART (Wang et al. 2020): boosted CE on adversarial examples plus a KL term weighted
    by the clean model's misclassification (1 - p_y)."""
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = adv_probs.argsort(dim=1)[:, -2:]
    runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    boosted = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), runner_up)
    nat_probs = F.softmax(logits_nat, dim=1)
    true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(1)
    return boosted + beta * (kl * (1.0000001 - true_probs)).mean()


def train_step_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                    autocast, attack_model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of one batch for ``cfg.method``; also the logits used for the accuracy readout.
    ``attack_model`` crafts the adversarial examples (the plain module when ``model`` is a DDP
    wrapper: input-gradient passes must not enter DDP's gradient synchronisation)."""
    attack_model = model if attack_model is None else attack_model
    if cfg.method == "natural":
        with autocast():
            logits = model(x).float()
        return F.cross_entropy(logits, y), logits
    # Adversarial examples are crafted with BN in eval mode (running statistics), as in
    # the reference TRADES/MART code, then the model is trained on them in train mode.
    model.eval()
    with autocast():
        if cfg.method == "trades":
            x_adv = trades_kl_linf(attack_model, x, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.attack_steps)
        else:
            x_adv = pgd_linf(attack_model, x, y, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.attack_steps)
    model.train()
    with autocast():
        if cfg.method == "at":
            logits = model(x_adv).float()
            return F.cross_entropy(logits, y), logits
        both = model(torch.cat([x, x_adv])).float()
    logits_nat, logits_adv = both[: len(x)], both[len(x):]
    if cfg.method == "trades":
        kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_nat, 1), reduction="batchmean")
        return F.cross_entropy(logits_nat, y) + cfg.beta * kl, logits_adv
    return mart_loss(logits_adv, logits_nat, y, cfg.beta), logits_adv


def train_classifier(model: nn.Module, train: ImageData, cfg: TrainConfig, device: torch.device,
                     *args, **kwargs) -> TrainResult:
    """Train ``model`` (see :func:`_train_classifier`), under deterministic algorithms when
    ``cfg.deterministic``."""
    with deterministic_algorithms(cfg.deterministic, cfg.seed):
        return _train_classifier(model, train, cfg, device, *args, **kwargs)


def _sgd(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with weight decay on the weights and none on biases and norm parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
    )


def _step_model(model: nn.Module, cfg: TrainConfig, device: torch.device, channels_last: bool,
                ddp: bool) -> tuple[nn.Module, bool]:
    """(the module the training steps call, whether it is data-parallel): ``model`` on ``device``
    (channels_last when asked), compiled when ``cfg.compile``, wrapped in DistributedDataParallel
    under torchrun when ``ddp`` (every rank trains on its slice of each batch; gradients averaged)."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.compile else model  # shares parameters and train/eval mode
    ddp = ddp and distributed.active()
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None)
    return step_model, ddp


def _train_classifier(
    model: nn.Module,
    train: ImageData,
    cfg: TrainConfig,
    device: torch.device,
    eval_data: ImageData | None = None,
    desc: str = "train",
    checkpoint: EpochCheckpoint | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    ddp: bool = False,
    gens: dict[str, torch.Generator] | None = None,
) -> TrainResult:
    """Train ``model`` (images in [0,1] -> logits) in place; evaluate clean and PGD accuracy at the end.

    The epochs run in :class:`benchmark.trainer.Trainer`. With ``checkpoint``, the state is saved
    after every epoch and a training that finds a state of its own there continues after that epoch
    (bit-identical on the CPU to an uninterrupted run); ``on_epoch(row)`` is called after each
    epoch's state is saved. ``ddp`` (under torchrun, every rank calling): DistributedDataParallel,
    each rank training on its slice of every batch. ``gens``: other generators the model draws from
    while training (saved with the state; ME-Net's masks)."""
    from benchmark.trainer import Trainer
    from defenses.base import TrainContext

    torch.manual_seed(cfg.seed)
    data = train.to(device)
    channels_last = _use(cfg.channels_last, device)
    step_model, ddp = _step_model(model, cfg, device, channels_last, ddp)
    use_bf16 = _use(cfg.bf16, device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    opt = _sgd(model, cfg)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    sched = make_scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    trainer = Trainer(model, desc, TrainContext(device, cfg.seed, checkpoint=checkpoint, on_epoch=on_epoch),
                      cfg.epochs, optimizers={"sgd": opt}, schedulers={"lr": sched},
                      gens={"shuffle": gen, "augment": aug_gen, **(gens or {})}, progress=cfg.progress,
                      steps_per_epoch=steps_per_epoch, reduce_metrics=ddp)
    lr = {}

    def batches(epoch: int):
        model.train()
        for x, y in data.batches(cfg.batch_size, shuffle=True, generator=gen):
            if cfg.augment:
                x = augment(x, crop_padding=cfg.crop_padding, flip=cfg.flip, generator=aug_gen)
            if ddp:  # the same shuffled batch on every rank (same generator), each rank its slice
                lo, hi = len(x) * distributed.rank() // distributed.size(), len(x) * (distributed.rank() + 1) // distributed.size()
                x, y = x[lo:hi], y[lo:hi]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def step(batch) -> dict[str, torch.Tensor]:
        x, y = batch
        loss, logits = train_step_loss(step_model, x, y, cfg, autocast, attack_model=model if ddp else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr["last"] = sched.get_last_lr()[0]  # the rate this step used
        sched.step()
        return {"loss": loss.detach(), "train_acc": (logits.detach().argmax(1) == y).float().mean()}

    fit = trainer.fit(batches, step, lambda: {"lr": lr["last"]})
    if ddp:  # free the DDP wrapper (it sits in reference cycles) while the process group is alive
        del step, step_model
        gc.collect()
    history = fit.history
    seconds = fit.seconds + sum(h["seconds"] for h in history[:trainer.first])
    metrics: dict = {}
    if eval_data is not None:
        ev = eval_data.subset(min(cfg.eval_n, len(eval_data)) if cfg.eval_n else None, seed=cfg.seed)
        metrics = evaluate_classifier(
            model, ev, device, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.eval_pgd_steps,
            batch_size=cfg.eval_batch_size,
        )
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    # The median epoch excludes one-off warm-up (cuDNN autotuning, allocator growth).
    return TrainResult(history, metrics, seconds, statistics.median(h["seconds"] for h in history))


def evaluate_classifier(
    model: nn.Module, data: ImageData, device: torch.device, *, eps: float, step_size: float,
    steps: int, batch_size: int = 500, seed: int = 0,
) -> dict:
    """Clean and PGD-``steps`` accuracy (fp32, random start) of ``model`` on ``data``, through the
    same checking harness as every benchmark cell."""
    from attacks.base import Clean
    from attacks.pgd import PGD

    model.eval().to(device)
    data = data.to(device)
    x, y = data.as_float(), data.labels
    threat = Threat("linf", eps)
    t0 = time.perf_counter()
    clean = run_attack(Clean(), model, x, y, threat, batch_size=batch_size, seed=seed)
    out = {"n_eval": len(data), "clean_acc": clean.accuracy, "eps": eps, "pgd_steps": steps,
           "pgd_step_size": step_size}
    if steps > 0:
        pgd = run_attack(PGD(steps=steps, step_size=step_size), model, x, y, threat, batch_size=batch_size,
                         seed=seed, name=f"PGD-{steps}")
        out["pgd_acc"] = pgd.accuracy
    out["eval_seconds"] = time.perf_counter() - t0
    return out
