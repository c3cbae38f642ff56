"""EBM defense (Hill et al., ICLR 2021): purification by long-run Langevin sampling of a
convergent energy-based model, started at the input; logits averaged over parallel chains.

Energy network (the official ``nets.py``): conv3x3 C->32, then conv4x4 stride 2
32->64->128->256, then conv4x4 256->1 (a scalar energy); LeakyReLU 0.05; inputs in
[-1,1]; 693,569 parameters at 3 channels.

Training (``train_ebm.py``): persistent short-run Langevin. Positives: data + sigma N
(sigma 0.02 on CIFAR-10, 0.03 on SVHN). Negatives: ``mcmc_steps`` (100) steps of
x <- x - grad E(x) + tau N (tau 0.01 / 0.0175) from a persistent bank (one slot per
training image, initialized U[-1,1]). Loss: (mean E(pos) - mean E(neg)) / (tau^2 / 2).
Adam 1e-4 for the first half of the iterations, then SGD with lr = lr_sgd tau^2 / 2. The
paper trains 250k iterations of batch 100; ``iterations`` sets the budget (the quick and
smoke profiles use far fewer: tables say so through the row's name and config).

Purification: ``steps`` Langevin steps (1500 in the paper; noise ``tau``, no clipping
inside the chain, the result clipped to [0,1]) from the input, for each of ``chains``
(150 in the paper) parallel chains; the defended model averages the classifier's logits
over the chains (``chains`` is read by ``DefendedModel``; ``attack_chains``, when set, in the passes
an attack takes a gradient through: Hill et al.'s attack averages 15 single chains per step). The classifier is the run's
target (the paper: a naturally trained WRN-28-10; the configs use a natural ResNet-18).

Declared stochastic and numerically non-differentiable: attacks go through BPDA (the
identity) + EOT, never by unrolling the chain.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from benchmark.config import require, subkey
from benchmark.registry import DEFENSES
from benchmark.trainer import Trainer
from defenses.base import Defense, FitResult, TrainContext
from defenses.unroll import unroll


class EnergyNet(nn.Module):
    def __init__(self, channels: int = 3, width: int = 32) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, 1, 1), nn.LeakyReLU(0.05),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.05),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.LeakyReLU(0.05),
            nn.Conv2d(4 * w, 8 * w, 4, 2, 1), nn.LeakyReLU(0.05),
        )
        self.out = nn.Conv2d(8 * w, 1, 4, 1, 0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Energy of images ``z`` in [-1,1], one scalar per image."""
        h = self.body(z)
        if h.shape[-1] < 4:  # inputs smaller than 32x32: pad to the final 4x4 kernel
            h = nn.functional.pad(h, (0, 4 - h.shape[-1], 0, 4 - h.shape[-2]))
        return self.out(h).mean(dim=(1, 2, 3))


def langevin(energy: nn.Module, z: torch.Tensor, steps: int, tau: float, generator: torch.Generator | None):
    """``steps`` of z <- z - grad E(z) + tau N(0, I) (the code's step size 1 on the gradient)."""
    z = z.detach()
    for _ in range(steps):
        z.requires_grad_(True)
        (g,) = torch.autograd.grad(energy(z).sum(), z)
        noise = torch.randn(z.shape, device=z.device, generator=generator).to(z.dtype)
        z = (z.detach() - g + tau * noise).detach()
    return z


class _Chains(nn.Module):
    """The persistent Langevin chains as a buffer, so that a training's per-epoch state holds them."""

    def __init__(self, bank: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bank", bank)


@dataclass
class EBMOptions:
    """The energy network and its purification: Langevin steps per chain, chains, step size tau."""

    in_channels: int = 3  # filled from the dataset unless set
    width: int = 32  # channels of the energy network's first stage
    steps: int = 1500  # Langevin steps per chain at inference (Hill et al.: 1500)
    chains: int = 150  # chains per image; the defended model averages their logits
    tau: float = 0.01  # Langevin noise (SVHN: 0.0175)
    # Chains per image in a pass that takes an input gradient (an attack's step, one EOT draw); None:
    # ``chains``. Predictions (scoring draws, queries without a gradient) always average ``chains``.
    # Hill et al.'s attack draws each of its 15 EOT replicates as ONE chain (official
    # config_attack/bpda_eot_attack.json: eot_attack_reps 15, eot_defense_reps 150).
    attack_chains: int | None = None

    def validate(self, where: str) -> None:
        require(self.steps >= 0, subkey(where, "steps"), f"must be >= 0, got {self.steps}")
        require(self.chains >= 1, subkey(where, "chains"), f"must be >= 1, got {self.chains}")
        require(self.attack_chains is None or self.attack_chains >= 1, subkey(where, "attack_chains"),
                f"must be >= 1 or null (= chains), got {self.attack_chains}")


@dataclass
class EBMTrain:
    iterations: int = 250_000
    batch_size: int = 100
    mcmc_steps: int = 100
    data_noise: float = 0.02  # sigma of the positives (SVHN: 0.03)
    tau: float = 0.01  # Langevin noise (SVHN: 0.0175)
    lr: float = 1e-4  # Adam, first half
    lr_sgd: float = 5e-5  # SGD afterwards, times tau^2 / 2
    switch_fraction: float = 0.5
    log_every: int = 500
    # per-"epoch" state for resuming after a kill (weights, optimizers, the persistent chains, the
    # generator): every this many iterations, a multiple of log_every
    checkpoint_every: int = 10_000
    compile: bool = False  # torch.compile the energy network in place (the first iterations compile)
    progress: bool = True

    def validate(self, where: str) -> None:
        for key in ("iterations", "batch_size", "mcmc_steps", "log_every", "checkpoint_every"):
            require(getattr(self, key) >= 1, subkey(where, key), f"must be >= 1, got {getattr(self, key)}")
        require(self.checkpoint_every % self.log_every == 0, subkey(where, "checkpoint_every"),
                f"must be a multiple of log_every ({self.log_every}), got {self.checkpoint_every}")
        for key in ("data_noise", "tau", "lr", "lr_sgd"):
            require(getattr(self, key) > 0, subkey(where, key), f"must be > 0, got {getattr(self, key)}")
        require(0 <= self.switch_fraction <= 1, subkey(where, "switch_fraction"), "must be in [0, 1]")


@DEFENSES.register("ebm", paper="Hill et al., ICLR 2021",
                   description="EBM defense: long-run Langevin purification, logits averaged over chains")
class EBM(Defense):
    stochastic = True
    differentiable = False  # BPDA (identity) + EOT by default
    exact_gradient = True  # purify_exact: the chain back-propagated (second order), checkpointed
    trainable = True
    TrainConfig = EBMTrain
    data_shape_options = ("in_channels",)
    inference_options = ("steps", "chains", "tau", "attack_chains")

    Options = EBMOptions

    def __init__(self, **options: Any) -> None:
        super().__init__()
        o = self.options = self.read_options(options)
        self.energy = EnergyNet(o.in_channels, o.width)
        self.steps, self.chains, self.tau = o.steps, o.chains, o.tau
        self.attack_chains = o.attack_chains or o.chains

    def compile_modules(self, training: bool = False) -> list[nn.Module]:
        return [self.energy]

    def purify(self, x: torch.Tensor, masks=None) -> torch.Tensor:
        """One Langevin chain per input row (the defended model repeats each image ``chains`` times)."""
        x = x.detach()
        z = unroll(self._step, x * 2 - 1, x, self.steps, self._gen(x.device))  # the plain loop: no graph
        return ((z + 1) / 2).clamp(0, 1).to(x.dtype)

    def _step(self, z: torch.Tensor, x: torch.Tensor, t: int, generator, create_graph: bool) -> torch.Tensor:
        """One Langevin step as ``langevin`` takes it (same draws), differentiable when asked."""
        (g,) = torch.autograd.grad(self.energy(z).sum(), z, create_graph=create_graph)
        noise = torch.randn(z.shape, device=z.device, generator=generator).to(z.dtype)
        return z - g + self.tau * noise

    def purify_exact(self, x: torch.Tensor, masks=None) -> torch.Tensor:
        """The chain back-propagated exactly (Hessian-vector products through the energy), in
        checkpointed segments of about sqrt(steps) steps (``defenses.unroll``); same draws as purify."""
        z = unroll(self._step, x * 2 - 1, x, self.steps, self._gen(x.device))
        return ((z + 1) / 2).clamp(0, 1).to(x.dtype)

    def fit(self, classifier, train, context: TrainContext, config: EBMTrain | None = None) -> FitResult:
        """Persistent short-run Langevin training on the shared loop (``benchmark.trainer``): each
        "epoch" of the loop is ``log_every`` iterations (a history row), a state is saved every
        ``checkpoint_every`` iterations."""
        device, seed = context.device, context.seed
        cfg = config or EBMTrain()
        torch.manual_seed(seed)
        gen = torch.Generator(device=device).manual_seed(seed)
        data = train.to(device)
        n = len(data)
        chains = _Chains(torch.rand((n, *data.images.shape[1:]), device=device, generator=gen) * 2 - 1)  # U[-1,1]
        scale = cfg.tau ** 2 / 2
        adam = torch.optim.Adam(self.energy.parameters(), lr=cfg.lr)
        sgd = torch.optim.SGD(self.energy.parameters(), lr=cfg.lr_sgd * scale)
        switch = int(cfg.switch_fraction * cfg.iterations)
        periods = -(-cfg.iterations // cfg.log_every)
        trainer = Trainer(self, "EBM", context, periods, optimizers={"adam": adam, "sgd": sgd},
                          gens={"ebm": gen}, modules={"chains": chains}, progress=cfg.progress,
                          steps_per_epoch=cfg.log_every, unit="iteration", total_steps=cfg.iterations,
                          save_every=max(1, cfg.checkpoint_every // cfg.log_every))
        done = 0  # iterations finished (kept by each period's batches, so that a resumed training counts on)

        def batches(period: int):
            nonlocal done
            done = (period - 1) * cfg.log_every
            while done < min(period * cfg.log_every, cfg.iterations):
                yield (torch.randint(0, n, (cfg.batch_size,), device=device, generator=gen),)
                done += 1

        def step(batch) -> dict[str, torch.Tensor]:
            (idx,) = batch
            opt = adam if done < switch else sgd
            pos = data.as_float(idx) * 2 - 1
            pos = pos + cfg.data_noise * torch.randn(pos.shape, device=device, generator=gen)
            neg = langevin(self.energy, chains.bank[idx], cfg.mcmc_steps, cfg.tau, gen)
            chains.bank[idx] = neg
            e_pos, e_neg = self.energy(pos).mean(), self.energy(neg).mean()
            loss = (e_pos - e_neg) / scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss, "energy_pos": e_pos, "energy_neg": e_neg}

        self.train()
        result = trainer.fit(batches, step, lambda: {"iteration": done})
        per_iter = result.seconds / max(1, cfg.iterations - trainer.first * cfg.log_every)
        return replace(result, seconds_per_epoch=per_iter * n / cfg.batch_size,
                       epochs=max(1, round(cfg.iterations * cfg.batch_size / n)))
