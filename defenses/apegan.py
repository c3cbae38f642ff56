"""APE-GAN (Jin et al., ICASSP 2019): a conv/deconv generator GAN-trained to map
adversarial images back to clean ones.

Generator (the official TensorFlow model, which fits 32x32 as is): conv 5x5 s2 (64)
-BN-LReLU 0.2, conv 5x5 s2 (128)-BN-LReLU, deconv 5x5 s2 (64)-BN-ReLU, deconv 5x5 s2
(C)-tanh: 32 -> 16 -> 8 -> 16 -> 32. Inputs are scaled to [-1,1] inside, the tanh
output is mapped back by (t + 1) / 2. Discriminator: a DCGAN critic (strided 4x4
convs 64/128/256, BN, LReLU, one logit). Loss: 0.7 MSE + 0.3 adversarial (BCE), Adam
2e-4 with beta1 0.5, two generator steps per discriminator step, batch 128, 30
epochs (the PyTorch re-implementation; the TF code's 0.9 RMSE + 0.02 adversarial is
the ``loss: tf`` option). Training pairs: the static PGD-5 pairs of the seed paper.

``bn_batch_stats: true`` reproduces the TF code's test-time batch normalization with
batch statistics (the output then depends on the batch); the default uses running
statistics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from benchmark import distributed
from benchmark.config import require, subkey
from benchmark.registry import DEFENSES
from benchmark.trainer import Trainer
from defenses.base import Defense, FitResult, TrainContext
from defenses.pairs import PairTrain, pair_source


class APEGenerator(nn.Module):
    def __init__(self, channels: int = 3, width: int = 64) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(channels, w, 5, 2, 2, bias=False), nn.BatchNorm2d(w), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w, 2 * w, 5, 2, 2, bias=False), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2, inplace=True),
            nn.ConvTranspose2d(2 * w, w, 5, 2, 2, output_padding=1, bias=False), nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w, channels, 5, 2, 2, output_padding=1), nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [0,1] -> [0,1]
        return (self.net(x * 2 - 1) + 1) / 2


class DCGANCritic(nn.Module):
    def __init__(self, channels: int = 3, width: int = 64) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * w), nn.LeakyReLU(0.2, inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2 - 1).squeeze(1)  # a logit; BCE-with-logits = sigmoid + BCE


@dataclass
class APEGANOptions:
    """Generator and critic widths; ``bn_batch_stats``: batch statistics in the generator's BN at
    inference (as the released code runs it)."""

    in_channels: int = 3  # filled from the dataset unless set
    width: int = 64  # generator channels
    critic_width: int = 64  # critic channels (training only)
    bn_batch_stats: bool = False  # batch statistics in the generator's BN at inference (the code's)


@dataclass
class APEGANTrain(PairTrain):  # PairTrain's 30 epochs of batch 128 at lr 2e-4: APE-GAN's code
    beta1: float = 0.5
    loss: Literal["pytorch", "tf"] = "pytorch"  # 0.7 MSE + 0.3 BCE, or the TF code's 0.9 RMSE + 0.02 BCE
    generator_steps: int = 2  # generator updates per discriminator update

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.loss in ("pytorch", "tf"), subkey(where, "loss"), f"must be 'pytorch' or 'tf', got {self.loss!r}")
        require(self.generator_steps >= 1, subkey(where, "generator_steps"), "must be >= 1")


@DEFENSES.register("apegan", paper="Jin et al., ICASSP 2019",
                   description="APE-GAN: conv/deconv generator trained with MSE + GAN loss on adversarial pairs")
class APEGAN(Defense):
    trainable = True
    data_parallel = True
    Options, TrainConfig = APEGANOptions, APEGANTrain  # constructor and training options
    data_shape_options = ("in_channels",)
    inference_options = ("bn_batch_stats",)

    @classmethod
    def batch_dependent_with(cls, options: dict) -> bool:
        return bool((options or {}).get("bn_batch_stats", False))

    def __init__(self, **options: Any) -> None:
        super().__init__()
        o = self.options = self.read_options(options)
        self.generator_net = APEGenerator(o.in_channels, o.width)
        self.critic = DCGANCritic(o.in_channels, o.critic_width)  # training only; saved for completeness
        self.bn_batch_stats = o.bn_batch_stats

    def compile_modules(self, training: bool = False) -> list[nn.Module]:
        return [self.generator_net] + ([self.critic] if training else [])

    def purify(self, x: torch.Tensor, masks=None) -> torch.Tensor:
        if self.bn_batch_stats and not self.training:
            bns = [m for m in self.generator_net.modules() if isinstance(m, nn.BatchNorm2d)]
            saved = [(m.training, m.track_running_stats) for m in bns]
            for m in bns:  # batch statistics without touching the running ones
                m.train()
                m.track_running_stats = False
            try:
                out = self.generator_net(x)
            finally:
                for m, (tr, trs) in zip(bns, saved):
                    m.train(tr)
                    m.track_running_stats = trs
            return out.clamp(0, 1)
        return self.generator_net(x).clamp(0, 1)

    def fit(self, classifier, train, context: TrainContext, config: APEGANTrain | None = None) -> FitResult:
        cfg = config or APEGANTrain()
        t_start = time.perf_counter()
        source = pair_source(self, classifier, train, context, cfg)
        g, d = self.generator_net, self.critic
        opt_g = distributed.synchronized(torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999)))
        opt_d = distributed.synchronized(torch.optim.Adam(d.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999)))
        w_rec, w_adv = (0.7, 0.3) if cfg.loss == "pytorch" else (0.9, 0.02)
        bf16, device = cfg.use_bf16(context.device), context.device

        def step(batch) -> dict:
            x, x_adv, _ = batch
            self.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                # discriminator: real clean images vs restorations
                fake = g(x_adv).detach()
                real_logit, fake_logit = d(x).float(), d(fake).float()
            loss_d = (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
                      + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            for _ in range(cfg.generator_steps):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    restored = g(x_adv)
                    logit = d(restored).float()
                mse = F.mse_loss(restored.float(), x)
                rec = mse if cfg.loss == "pytorch" else mse.clamp_min(1e-12).sqrt()
                gan = F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
                loss_g = w_rec * rec + w_adv * gan
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
            return {"loss_g": loss_g, "mse": mse, "loss_d": loss_d}

        trainer = Trainer(self, "APE-GAN", context, cfg.epochs, optimizers={"g": opt_g, "d": opt_d},
                          gens=source.generators(), progress=cfg.progress, started=t_start,
                          steps_per_epoch=-(-len(train) // cfg.batch_size))
        return trainer.fit(source.epoch, step)
