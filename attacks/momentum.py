"""Momentum-based iterative attacks: MI-FGSM (Dong et al. 2018) and VNI-FGSM (Wang & He 2021).

Update rules as in ../shared/docs/defenses.md §A3-A4: no random start; the
gradient is normalized by its per-sample L1 norm before it enters the momentum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attacks.base import Attack, IterativeParams, Threat
from attacks.pgd import ce_sum, input_gradient, project_linf, summed_gradients
from benchmark.config import require, subkey
from benchmark.registry import ATTACKS


def _l1_normalize(g: torch.Tensor) -> torch.Tensor:
    return g / g.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))


@dataclass
class MIParams(IterativeParams):
    decay: float = 1.0

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.decay >= 0, subkey(where, "decay"), f"must be >= 0, got {self.decay}")


@ATTACKS.register("mi-fgsm", label="MI", paper="Dong et al., CVPR 2018",
                  description="momentum iterative FGSM (decay 1.0, 20 steps of 2/255)")
class MIFGSM(Attack):
    Params = MIParams

    def run(self, model, x, y, threat: Threat, generator):
        p = self.params
        g = torch.zeros_like(x)
        adv = x.clone()
        for _ in range(p.steps):
            grad, _ = input_gradient(model, adv, y, ce_sum)
            g = p.decay * g + _l1_normalize(grad)  # g_{t+1} = mu g_t + grad / ||grad||_1
            adv = project_linf(adv.detach() + p.step_size * g.sign(), x, threat.eps)
        return adv


@dataclass
class VNIParams(MIParams):
    neighbors: int = 20  # N
    beta: float = 1.5  # neighborhood radius in units of eps

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.neighbors >= 1, subkey(where, "neighbors"), f"must be >= 1, got {self.neighbors}")
        require(self.beta > 0, subkey(where, "beta"), f"must be > 0, got {self.beta}")


@ATTACKS.register("vni-fgsm", label="VNI", paper="Wang & He, CVPR 2021",
                  description="variance-tuned Nesterov iterative FGSM (N=20, beta=1.5)")
class VNIFGSM(Attack):
    Params = VNIParams

    def run(self, model, x, y, threat: Threat, generator):
        p = self.params
        g = torch.zeros_like(x)
        v = torch.zeros_like(x)
        adv = x.clone()
        radius = p.beta * threat.eps
        for _ in range(p.steps):
            nes = adv + p.step_size * p.decay * g  # Nesterov look-ahead
            grad, _ = input_gradient(model, nes, y, ce_sum)
            g = p.decay * g + _l1_normalize(grad + v)
            # gradient variance around x_t: the draws in a fixed order, the passes batched by the engine
            around = [adv + (torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator) * 2 - 1) * radius
                      for _ in range(p.neighbors)]
            v = summed_gradients(model, around, y, ce_sum) / p.neighbors - grad
            adv = project_linf(adv.detach() + p.step_size * g.sign(), x, threat.eps)
        return adv
