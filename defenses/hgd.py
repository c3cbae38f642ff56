"""HGD: high-level representation guided denoiser (Liao et al., CVPR 2018), at 32x32.

The denoiser is the CIFAR "DUNET" of the DIR authors' group (CAFD): a U-Net that
predicts an additive correction, x^ = x + D(x).

* Encoder: five groups of widths 64/128/256/256/256 with 2/3/3/3/3 conv3x3-BN-ReLU
  blocks; the first conv of each 3-block group has stride 2 (32/16/8/4/2 at 32x32).
* Decoder: bilinear upsampling to the skip's size, concatenation with the skip, then
  3/3/3/2 blocks of widths 256/256/128/64; a 1x1 conv to C channels.

Training: the frozen target's representation of the denoised adversarial image is
pulled to that of the clean image with an L1 loss: LGD on the logits (default), FGD
on a feature layer (``guide: fgd``, ``layer``: the target's ``layer4`` by default),
CGD with the cross-entropy of the label (``guide: cgd``). Adam 1e-3, weight decay 2e-4
(CAFD's CIFAR setting), lr x0.1 at 60% and x0.01 at 90% of 100 epochs (the official
code's schedule shape), batch 128, on the static PGD-5 pairs; ``clean_fraction``
mixes in clean ("noop") pairs as the original did.
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
from defenses.pairs import StepPairTrain, pair_source, step_schedule


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _group(cin: int, cout: int, n: int, first_stride: int) -> nn.Sequential:
    return nn.Sequential(*[conv_bn_relu(cin if i == 0 else cout, cout, first_stride if i == 0 else 1)
                           for i in range(n)])


class DUNet(nn.Module):
    """The CIFAR DUNET: returns the additive correction D(x) (same shape as x)."""

    ENC = ((64, 2), (128, 3), (256, 3), (256, 3), (256, 3))
    DEC = ((256, 3), (256, 3), (128, 3), (64, 2))

    def __init__(self, channels: int = 3, width_scale: float = 1.0) -> None:
        super().__init__()

        def w(c: int) -> int:
            return max(4, int(round(c * width_scale)))

        self.encoder = nn.ModuleList()
        cin = channels
        for c, n in self.ENC:
            self.encoder.append(_group(cin, w(c), n, 1 if n == 2 else 2))
            cin = w(c)
        skips = [w(c) for c, _ in self.ENC[:-1]][::-1]  # 256, 256, 128, 64 at 4, 8, 16, 32
        self.decoder = nn.ModuleList()
        for (c, n), skip in zip(self.DEC, skips):
            self.decoder.append(_group(cin + skip, w(c), n, 1))
            cin = w(c)
        self.out = nn.Conv2d(cin, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        h = x
        for group in self.encoder:
            h = group(h)
            feats.append(h)
        for group, skip in zip(self.decoder, feats[-2::-1]):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = group(torch.cat([h, skip], dim=1))
        return self.out(h)


@dataclass
class DUNetOptions:
    """The DUNET denoiser's input channels and width (1.0: HGD's)."""

    in_channels: int = 3  # filled from the dataset unless set
    width_scale: float = 1.0  # DUNET widths times this (1.0: HGD's)


@dataclass
class HGDTrain(StepPairTrain):
    guide: Literal["lgd", "fgd", "cgd"] = "lgd"
    layer: str = "layer4"  # FGD: the target layer whose features guide (ResNet: the top conv stage)
    clean_fraction: float = 0.0  # share of each batch replaced by clean ("noop") pairs

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.guide in ("lgd", "fgd", "cgd"), subkey(where, "guide"),
                f"must be 'lgd', 'fgd' or 'cgd', got {self.guide!r}")
        require(0 <= self.clean_fraction < 1, subkey(where, "clean_fraction"), "must be in [0, 1)")


def guided_loss(classifier, restored: torch.Tensor, x: torch.Tensor, y: torch.Tensor, cfg: HGDTrain) -> torch.Tensor:
    if cfg.guide == "cgd":
        return F.cross_entropy(classifier(restored).float(), y)
    layer = "logits" if cfg.guide == "lgd" else cfg.layer
    with torch.no_grad():
        ref = classifier.feature_map(x, layer).float()
    return (classifier.feature_map(restored, layer).float() - ref).abs().mean()


class ResidualDUNetDefense(Defense):
    """x^ = x + DUNet(x), clipped to [0,1]: the purifier of HGD and of the JATP reconstruction."""

    trainable = True
    data_parallel = True
    data_shape_options = ("in_channels",)

    Options = DUNetOptions

    def __init__(self, **options: Any) -> None:
        super().__init__()
        o = self.options = self.read_options(options)
        self.net = DUNet(o.in_channels, o.width_scale)

    def purify(self, x: torch.Tensor, masks=None) -> torch.Tensor:
        return (x + self.net(x)).clamp(0, 1)


@DEFENSES.register("hgd", paper="Liao et al., CVPR 2018",
                   description="HGD: U-Net (DUNET) correction trained with a representation-guided L1 loss")
class HGD(ResidualDUNetDefense):
    TrainConfig = HGDTrain

    def fit(self, classifier, train, context: TrainContext, config: HGDTrain | None = None) -> FitResult:
        cfg = config or HGDTrain()
        t_start = time.perf_counter()
        source = pair_source(self, classifier, train, context, cfg)
        opt = distributed.synchronized(torch.optim.Adam(self.net.parameters(), lr=cfg.lr,
                                                        weight_decay=cfg.weight_decay))
        sched = step_schedule(opt, cfg.epochs * -(-len(train) // cfg.batch_size), cfg.milestones)
        bf16, device = cfg.use_bf16(context.device), context.device
        mix = torch.Generator(device=device).manual_seed(context.seed + 3)

        def step(batch) -> dict:
            x, x_adv, y = batch
            if cfg.clean_fraction > 0:
                keep = torch.rand(len(x), device=device, generator=mix) < cfg.clean_fraction
                x_adv = torch.where(keep[:, None, None, None], x, x_adv)
            self.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                restored = x_adv + self.net(x_adv)  # unclamped in training, as the original
                loss = guided_loss(classifier, restored, x, y, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            return {"loss": loss}

        trainer = Trainer(self, "HGD", context, cfg.epochs, optimizers={"adam": opt},
                          gens={**source.generators(), "mix": mix}, schedulers={"lr": sched}, progress=cfg.progress,
                          started=t_start, steps_per_epoch=-(-len(train) // cfg.batch_size))
        return trainer.fit(source.epoch, step, epoch_info=lambda: {"lr": opt.param_groups[0]["lr"]})
