"""NRP: neural representation purifier (Naseer et al., CVPR 2020), at 32x32.

Purifier (the official ``networks.py``): conv 3x3 C -> 64; ``blocks`` RRDB blocks (each
three residual dense blocks of five 3x3 convs, growth 32, LeakyReLU 0.2, residual
scale 0.2); conv 3x3 64 -> C; no global skip, no output activation (clipped to [0,1]
at inference). ``blocks`` is 5 by default (the DIR group's CIFAR setting; the
ImageNet release uses 23).

Training (ESRGAN-style, as the author points to BasicSR): lambda_feat * L1 of target
features + gamma * L1 of pixels + alpha * relativistic-average GAN loss, with
lambda = 1, gamma = 1e-2, alpha = 5e-3; Adam 1e-4, betas (0.9, 0.999), batch 128, 30
epochs, the first ``warmup_epochs`` (1) on the pixel L1 loss alone, ESRGAN's PSNR-oriented
start (without it a random purifier can lock onto an output the target maps to one class). The feature extractor is the frozen target's ``layer3`` (ImageNet VGG16 cannot
be downloaded here: a deviation from NRP, which uses VGG16 relu3_3). Data: the seed
paper's static PGD-5 pairs; ``pairs: ssp`` trains on SSP examples crafted on the fly
on the same feature extractor (NRP's own recipe). The discriminator is a VGG-style
critic scaled to 32x32 (conv pairs of 64/128/256, stride 2 on the second of each pair).

Inference: ``mode: standard`` is one deterministic pass; ``mode: dynamic`` first adds
Gaussian noise (std 0.05), projects to within 16/255 of the input and clips to [0,1],
then purifies: stochastic (attack it with EOT).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from attacks.ssp import ssp_linf
from benchmark import distributed
from benchmark.config import require, subkey
from benchmark.registry import DEFENSES
from benchmark.trainer import Trainer
from defenses.base import Defense, FitResult, TrainContext
from defenses.pairs import PairSource, PairTrain, pair_source


class DenseBlock(nn.Module):
    """Five 3x3 convs with dense connections; the last maps back to ``width``; x + 0.2 * out."""

    def __init__(self, width: int = 64, growth: int = 32) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(width + i * growth, growth if i < 4 else width, 3, 1, 1)
                                   for i in range(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i, conv in enumerate(self.convs):
            out = conv(torch.cat(feats, dim=1))
            if i < 4:
                feats.append(F.leaky_relu(out, 0.2))
        return x + 0.2 * out


class RRDB(nn.Module):
    def __init__(self, width: int = 64, growth: int = 32) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[DenseBlock(width, growth) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.blocks(x)


class RRDBNet(nn.Module):
    def __init__(self, channels: int = 3, width: int = 64, blocks: int = 5, growth: int = 32) -> None:
        super().__init__()
        self.first = nn.Conv2d(channels, width, 3, 1, 1)
        self.trunk = nn.Sequential(*[RRDB(width, growth) for _ in range(blocks)])
        self.last = nn.Conv2d(width, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.trunk(self.first(x)))


class VGGCritic(nn.Module):
    def __init__(self, channels: int = 3, width: int = 64) -> None:
        super().__init__()
        layers, cin = [], channels
        for i, c in enumerate((width, 2 * width, 4 * width)):
            layers += [nn.Conv2d(cin, c, 3, 1, 1, bias=i == 0), *([] if i == 0 else [nn.BatchNorm2d(c)]),
                       nn.LeakyReLU(0.2, inplace=True),
                       nn.Conv2d(c, c, 4, 2, 1, bias=False), nn.BatchNorm2d(c), nn.LeakyReLU(0.2, inplace=True)]
            cin = c
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(cin, 100), nn.LeakyReLU(0.2, inplace=True), nn.Linear(100, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(1)


@dataclass
class NRPOptions:
    """The RRDB purifier and its critic; ``dynamic``: Gaussian noise (std, clipped to noise_eps)
    added before purification at inference (NRP's dynamic inference)."""

    in_channels: int = 3  # filled from the dataset unless set
    width: int = 64  # RRDB channels
    blocks: int = 5  # RRDB blocks
    growth: int = 32  # dense growth channels inside a block
    mode: Literal["standard", "dynamic"] = "standard"  # dynamic: noise before purifying (stochastic)
    noise_std: float = 0.05  # dynamic: Gaussian noise std
    noise_eps: float = 16 / 255  # dynamic: the noise clipped to this L-inf
    critic_width: int = 64  # the relativistic critic's width (training only)


@dataclass
class NRPTrain(PairTrain):
    lr: float = 1e-4
    feature_weight: float = 1.0
    pixel_weight: float = 1e-2
    gan_weight: float = 5e-3
    layer: str = "default"  # the target layer of the feature loss (ResNet: layer3)
    source: Literal["pgd", "ssp"] = "pgd"  # training inputs: the PGD pairs, or SSP on the fly (NRP's own)
    ssp_steps: int = 100
    ssp_step_size: float = 0.01
    # ESRGAN's start (Wang et al. 2018, whose BasicSR recipe NRP follows): the purifier's first
    # epochs train on the pixel L1 loss alone (a PSNR-oriented model) before the feature and GAN
    # losses join. From a random start the feature loss alone can lock onto an output that the
    # target maps to one class (measured on the smoke digits target: feature loss flat at 0.50,
    # every prediction one class, for 2 of 5 seeds); from a near-identity purifier it cannot (5 of 5
    # trained). One epoch by default: a thirtieth of the paper recipe's 30.
    warmup_epochs: int = 1

    def validate(self, where: str) -> None:
        super().validate(where)
        require(0 <= self.warmup_epochs < self.epochs, subkey(where, "warmup_epochs"),
                f"must be >= 0 and below epochs ({self.epochs}), got {self.warmup_epochs}")
        require(self.source in ("pgd", "ssp"), subkey(where, "source"), f"must be 'pgd' or 'ssp', got {self.source!r}")
        for key in ("feature_weight", "pixel_weight", "gan_weight"):
            require(getattr(self, key) >= 0, subkey(where, key), "must be >= 0")


def relativistic_losses(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(generator loss, discriminator loss) of the relativistic average GAN (ESRGAN)."""
    bce = F.binary_cross_entropy_with_logits
    r, f = real - fake.mean(), fake - real.mean()
    g = (bce(r, torch.zeros_like(r)) + bce(f, torch.ones_like(f))) / 2
    d = (bce(r, torch.ones_like(r)) + bce(f, torch.zeros_like(f))) / 2
    return g, d


@DEFENSES.register("nrp", paper="Naseer et al., CVPR 2020",
                   description="NRP: RRDB purifier (feature + pixel + relativistic GAN loss); standard or dynamic")
class NRP(Defense):
    note = ("feature loss on the target's layer3, not NRP's ImageNet VGG16 (no offline weights); the first "
            "epoch on the pixel loss alone (ESRGAN's PSNR-oriented start)")
    trainable = True
    version = 2  # 2: warmup_epochs (ESRGAN's pixel-loss start), 1 by default
    data_parallel = True
    TrainConfig = NRPTrain
    data_shape_options = ("in_channels",)
    inference_options = ("mode", "noise_std", "noise_eps")  # NRP and NRP-dynamic share one training

    Options = NRPOptions

    def __init__(self, **options: Any) -> None:
        super().__init__()
        o = self.options = self.read_options(options)
        self.mode, self.noise_std, self.noise_eps = o.mode, o.noise_std, o.noise_eps
        self.net = RRDBNet(o.in_channels, o.width, o.blocks, o.growth)
        self.critic = VGGCritic(o.in_channels, o.critic_width)

    def compile_modules(self, training: bool = False) -> list[nn.Module]:
        return [self.net] + ([self.critic] if training else [])

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.mode == "dynamic"

    @classmethod
    def stochastic_with(cls, options: dict) -> bool:
        return options.get("mode", "standard") == "dynamic"

    def declarations(self) -> dict:
        return super().declarations() | {"stochastic": self.stochastic}

    def purify(self, x: torch.Tensor, masks=None) -> torch.Tensor:
        if self.mode == "dynamic":
            noise = torch.randn(x.shape, device=x.device, generator=self._gen(x.device)).to(x.dtype)
            x = torch.min(torch.max(x + self.noise_std * noise, x - self.noise_eps), x + self.noise_eps).clamp(0, 1)
        return self.net(x).clamp(0, 1)

    def fit(self, classifier, train, context: TrainContext, config: NRPTrain | None = None) -> FitResult:
        cfg = config or NRPTrain()
        t_start = time.perf_counter()
        mode = "per-epoch" if cfg.source == "ssp" else None  # SSP batches are crafted in _ssp_batches
        source = pair_source(self, classifier, train, context, cfg, mode=mode)
        g, d = self.net, self.critic
        opt_g = distributed.synchronized(torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=(0.9, 0.999)))
        opt_d = distributed.synchronized(torch.optim.Adam(d.parameters(), lr=cfg.lr, betas=(0.9, 0.999)))
        bf16, device = cfg.use_bf16(context.device), context.device
        gen = torch.Generator(device=device).manual_seed(context.seed + 5)

        epoch_now = [0]  # the epoch being trained (set by the batches; a resumed training sets it too)

        def step(batch) -> dict:
            x, x_adv, _ = batch
            self.train()
            warmup = epoch_now[0] <= cfg.warmup_epochs  # pixel loss alone (ESRGAN's PSNR-oriented start)
            gan = cfg.gan_weight > 0 and not warmup
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                restored = g(x_adv)
                with torch.no_grad():
                    ref = classifier.feature_map(x, cfg.layer).float()
                feat = (classifier.feature_map(restored, cfg.layer).float() - ref).abs().mean()
                pix = (restored.float() - x).abs().mean()
                if gan:
                    gan_g, _ = relativistic_losses(d(x).float(), d(restored).float())
                else:
                    gan_g = torch.zeros((), device=device)
            if warmup:
                loss_g = pix
            else:
                loss_g = cfg.feature_weight * feat + cfg.pixel_weight * pix + cfg.gan_weight * gan_g
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            loss_d = torch.zeros((), device=device)
            if gan:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    _, loss_d = relativistic_losses(d(x).float(), d(restored.detach()).float())
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
            # the feature loss first: the loss the Trainer's stuck check watches (the same in warm-up and after)
            return {"feature": feat, "loss_g": loss_g, "pixel": pix, "loss_d": loss_d}

        epochs = source.epoch if cfg.source == "pgd" else self._ssp_batches(source, classifier, cfg, gen)

        def batches(epoch: int):
            epoch_now[0] = epoch
            yield from epochs(epoch)

        trainer = Trainer(self, "NRP", context, cfg.epochs, optimizers={"g": opt_g, "d": opt_d},
                          gens={**source.generators(), "ssp": gen}, progress=cfg.progress, started=t_start,
                          steps_per_epoch=-(-len(train) // cfg.batch_size))
        return trainer.fit(batches, step)

    def _ssp_batches(self, source: PairSource, classifier, cfg: NRPTrain, gen: torch.Generator):
        """NRP's own data: SSP examples (label-free feature distortion) crafted per batch."""
        def epoch(_e: int):
            order = torch.randperm(len(source.data), generator=source.order_gen).to(source.device)
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                idx = idx[distributed.rank_slice(len(idx))]
                x, y = source.data.as_float(idx), source.data.labels[idx]
                x_adv = ssp_linf(lambda z: classifier.feature_map(z, cfg.layer), x, eps=cfg.eps,
                                 step_size=cfg.ssp_step_size, steps=cfg.ssp_steps, generator=gen)
                yield x, x_adv, y
        return epoch
