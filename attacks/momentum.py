"""Momentum-based iterative attacks: MI-FGSM (Dong et al. 2018) and VNI-FGSM (Wang & He 2021).

Update rules as in ../shared/docs/defenses.md §A3-A4: no random start; the
gradient is normalized by its per-sample L1 norm before it enters the momentum.
"""

from __future__ import annotations

from dataclasses import dataclass

from attacks.base import Attack, IterativeParams, Threat
from attacks.core import Momentum, Objective, VarianceTuned, linf_attack
from benchmark.config import require, subkey
from benchmark.registry import ATTACKS


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
        p = self.params  # g_{t+1} = mu g_t + grad / ||grad||_1, from the clean image
        return linf_attack(Objective(model, y), x, eps=threat.eps, step_size=p.step_size, steps=p.steps,
                           rule=Momentum(p.decay))


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
        rule = VarianceTuned(p.decay, p.step_size, p.neighbors, p.beta * threat.eps, generator)
        return linf_attack(Objective(model, y), x, eps=threat.eps, step_size=p.step_size, steps=p.steps, rule=rule)
