"""SSP: the self-supervised perturbation of NRP (Naseer et al., CVPR 2020).

Label-free: starting from pure Gaussian noise, ``steps`` signed ascent steps of size
``step_size`` on the mean-squared distance between the features of the perturbed
image and those of the clean image, each followed by the projection onto the eps
ball around the clean image and [0,1]. NRP crafts it on ImageNet VGG16 (relu3_3);
those weights cannot be downloaded here, so the feature extractor is a classifier we
have weights for: by default the target's mid-level layer (ResNet: ``layer3``), or any
classifier checkpoint (``checkpoint``: a safetensors file with its card). That is a
deviation from NRP and is reported in the attack's description.

Used as a transfer attack: crafted on the feature extractor alone (never on the
defense), evaluated on the defended model. Also NRP's original training data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from attacks.base import Attack, IterativeParams, Threat, defended_of
from attacks.core import Objective, batch_noise, linf_attack
from benchmark.registry import ATTACKS


def ssp_linf(features: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, eps: float, step_size: float,
             steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Maximize ||features(x') - features(x)||^2 (mean) from pure N(0, I) noise, projected each step."""
    x = x.detach()
    with torch.no_grad():
        ref = features(x).float()
    start = batch_noise(x.shape, x, generator, normal=True)  # not projected first

    def distortion(f: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return (f - reference).pow(2).mean()

    return linf_attack(Objective(features, ref, distortion), x, eps=eps, step_size=step_size, steps=steps,
                       start=start)


@dataclass
class SSPParams(IterativeParams):
    steps: int = 100
    step_size: float = 0.01  # NRP's ssp.py
    layer: str = "default"  # the extractor's layer (ResNet: layer3); "penultimate" and module names work too
    checkpoint: str | None = None  # a classifier checkpoint to craft on; default: the target itself


@ATTACKS.register("ssp", label="SSP", paper="Naseer et al., CVPR 2020",
                  description="NRP's label-free feature-space attack, transferred: crafted on a classifier's "
                              "features (default the target's layer3, not ImageNet VGG16), evaluated on the defense")
class SSP(Attack):
    Params = SSPParams
    note = "SSP crafted on a classifier's features (default the target's layer3), not NRP's ImageNet VGG16"

    def __init__(self, where: str = "attack", **params) -> None:
        super().__init__(where, **params)
        self._extractor = None

    def extractor(self, model, device: torch.device):
        if self.params.checkpoint is None:
            return defended_of(model).classifier
        if self._extractor is None:
            from benchmark.checkpoint import load_checkpoint

            self._extractor, _ = load_checkpoint(self.params.checkpoint, device)
            self._extractor.eval()
            for p in self._extractor.parameters():
                p.requires_grad_(False)
        return self._extractor

    def run(self, model, x, y, threat: Threat, generator):
        net = self.extractor(model, x.device)
        p = self.params
        return ssp_linf(lambda z: net.feature_map(z, p.layer), x, eps=threat.eps, step_size=p.step_size,
                        steps=p.steps, generator=generator)
