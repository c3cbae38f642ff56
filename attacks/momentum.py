"""Momentum-based iterative attacks: MI-FGSM (Dong et al. 2018) and VNI-FGSM (Wang & He 2021).

No random start; the gradient is divided by its per-sample mean absolute value before it enters
the momentum (the reference implementations' ``reduce_mean(abs(g))``; the papers write the L1 norm,
which differs by the number of pixels: the same sign for MI, but a vanishing look-ahead for VNI).
VNI (Wang & He 2021, Algorithm 1 with Nesterov): the gradient is taken at the look-ahead point
x_t + step_size * decay * g_t, tuned by the variance v_t of the gradients at N uniform points within
beta * eps of x_t. Each attack returns its last iterate; MI also its best one (VNI's gradients are
taken at look-ahead points, so its iterates are not evaluated).
"""

from __future__ import annotations

from dataclasses import dataclass

from attacks.base import Attack, IterativeParams, Threat
from attacks.core import Momentum, Objective, VarianceTuned, linf_search
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
    version = 2  # its best iterate is scored too

    def run(self, model, x, y, threat: Threat, generator):
        p = self.params  # g_{t+1} = mu g_t + grad / ||grad||_1, from the clean image
        return linf_search(Objective(model, y), x, eps=threat.eps, step_size=p.step_size, steps=p.steps,
                           rule=Momentum(p.decay)).result()


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
    version = 2  # mean-normalised gradients (the look-ahead no longer vanishes)

    def run(self, model, x, y, threat: Threat, generator):
        p = self.params
        rule = VarianceTuned(p.decay, p.step_size, p.neighbors, p.beta * threat.eps, generator)
        return linf_search(Objective(model, y), x, eps=threat.eps, step_size=p.step_size, steps=p.steps,
                           rule=rule).result()
