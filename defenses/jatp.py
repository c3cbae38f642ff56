"""JATP (Zhou et al., arXiv 2106.05453): a pre-processing denoiser trained only on
"full" adversarial examples (crafted against denoiser + target) with a
feature-similarity adversarial risk, a pixel-wise loss and a misclassification-aware
weight; the target stays frozen.

**This is a reconstruction.** No public code exists and the paper's text beyond its
abstract was not available; every choice below is the benchmark's, and tables label the row as
such:

* Denoiser: the CIFAR DUNET of HGD (the same group's CIFAR denoiser of that period),
  predicting an additive correction.
* Crafting: PGD-5 (eps 8/255, step 2/255, random start) maximizing
  d(phi(g(x')), phi(x)) with phi the target's penultimate features and d = 1 - cosine
  similarity (``attack: ce`` crafts with cross-entropy through g and h instead).
* Loss: ||g(x') - x||_1 + lambda_f d(phi(g(x')), phi(x)) + lambda_m w d(...), with
  w = 1 - p_y(h(g(x'))) (MART-style weight, detached), lambda_f = lambda_m = 1.
* Adam 1e-3, weight decay 2e-4, 100 epochs, lr x0.1 at 60% and 90% (HGD's schedule).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from benchmark import distributed
from benchmark.config import require, subkey
from benchmark.registry import DEFENSES
from benchmark.trainer import Trainer
from defenses.base import FitResult, TrainContext
from defenses.hgd import ResidualDUNetDefense
from defenses.pairs import StepPairTrain, feature_distance, pair_source, step_schedule

RECONSTRUCTION_NOTE = "JATP is a benchmark reconstruction (no public code; see defenses/jatp.py)"


@dataclass
class JATPTrain(StepPairTrain):
    pairs: Literal["static", "per-epoch", "full"] = "full"  # JATP trains on full adversarial examples only
    attack: Literal["feature", "ce"] = "feature"
    layer: str = "penultimate"
    feature_weight: float = 1.0
    misclassification_weight: float = 1.0

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.attack in ("feature", "ce"), subkey(where, "attack"),
                f"must be 'feature' or 'ce', got {self.attack!r}")


@DEFENSES.register("jatp", paper="Zhou et al., arXiv 2106.05453 (reconstruction)",
                   description="JATP (benchmark reconstruction): DUNET trained on full adversarial examples with "
                               "feature-similarity, pixel and misclassification-aware losses")
class JATP(ResidualDUNetDefense):
    """JATP as reconstructed by this benchmark (a reconstruction, not the authors' code)."""

    TrainConfig = JATPTrain
    note = RECONSTRUCTION_NOTE

    def fit(self, classifier, train, context: TrainContext, config: JATPTrain | None = None) -> FitResult:
        cfg = config or JATPTrain()
        t_start = time.perf_counter()

        def phi(z: torch.Tensor) -> torch.Tensor:
            return classifier.feature_map(z, cfg.layer)

        crafting = {} if cfg.attack == "ce" else dict(  # CE through g and h, or the feature distance
            attack_forward=lambda z: phi(self.purify(z)), attack_reference=lambda x, y: phi(x).float(),
            attack_loss=lambda f, ref: feature_distance(f, ref, "cosine").sum())
        source = pair_source(self, classifier, train, context, cfg, **crafting)
        opt = distributed.synchronized(torch.optim.Adam(self.net.parameters(), lr=cfg.lr,
                                                        weight_decay=cfg.weight_decay))
        sched = step_schedule(opt, cfg.epochs * -(-len(train) // cfg.batch_size), cfg.milestones)
        bf16, device = cfg.use_bf16(context.device), context.device

        def step(batch) -> dict:
            x, x_adv, y = batch
            self.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                restored = x_adv + self.net(x_adv)
                with torch.no_grad():
                    ref = phi(x).float()
                dist = feature_distance(phi(restored), ref, "cosine")
                with torch.no_grad():
                    p_true = F.softmax(classifier(restored).float(), 1).gather(1, y[:, None]).squeeze(1)
            pixel = (restored.float() - x).abs().mean()
            weight = 1 - p_true
            loss = pixel + cfg.feature_weight * dist.mean() + cfg.misclassification_weight * (weight * dist).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            return {"loss": loss, "pixel": pixel, "feature": dist.mean()}

        trainer = Trainer(self, "JATP", context, cfg.epochs, optimizers={"adam": opt}, gens=source.generators(),
                          schedulers={"lr": sched}, progress=cfg.progress, started=t_start,
                          steps_per_epoch=-(-len(train) // cfg.batch_size))
        return trainer.fit(source.epoch, step, epoch_info=lambda: {"lr": opt.param_groups[0]["lr"]})
