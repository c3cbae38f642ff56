"""BPDA+EOT (Athalye et al., ICML 2018; the attack of Hill et al. and of the seed paper's Table 3).

PGD-40 (2/255, uniform random start) whose gradient is the mean over E draws of the
defense's randomness (EOT, default E = 15 as in the EBM paper's attack), taken through
the defense's BPDA surrogate (identity by default: straight-through) where the defense
is not differentiable or declares that exact gradients are impractical (``prefers_bpda``:
an iterative inner loop such as AID-Purifier's or a long Langevin chain).

``bpda`` and ``eot`` are ``auto`` by default: read from the defense's declarations (BPDA
for non-differentiable or ``prefers_bpda`` defenses; E = ``eot_samples`` for stochastic
ones, 1 otherwise). A config can force either (``bpda: true/false``, ``eot: 1``...).
Registered twice: ``bpda-eot`` and ``adaptive`` (the same attack with every choice left to
the declarations).
"""

from __future__ import annotations

from dataclasses import dataclass

from attacks.base import Attack, IterativeParams, Threat, defended_of
from attacks.pgd import ce_sum, eot_gradient, project_linf, uniform_start
from benchmark.config import require, subkey
from benchmark.registry import ATTACKS


@dataclass
class BPDAEOTParams(IterativeParams):
    steps: int = 40
    random_start: bool = True
    bpda: bool | str = "auto"
    eot: int | str = "auto"
    eot_samples: int = 15  # E used by eot: auto against a stochastic defense

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.bpda in ("auto", True, False), subkey(where, "bpda"), f"must be auto, true or false, got {self.bpda!r}")
        require(self.eot == "auto" or (isinstance(self.eot, int) and self.eot >= 1), subkey(where, "eot"),
                f"must be auto or an integer >= 1, got {self.eot!r}")
        require(self.eot_samples >= 1, subkey(where, "eot_samples"), "must be >= 1")


def resolve(params: BPDAEOTParams, defense) -> tuple[bool, int]:
    """(use BPDA, EOT samples) for this defense."""
    bpda = params.bpda
    if bpda == "auto":
        bpda = (not defense.differentiable) or bool(getattr(defense, "prefers_bpda", False))
    eot = params.eot
    if eot == "auto":
        eot = params.eot_samples if defense.stochastic else 1
    return bool(bpda), int(eot)


@ATTACKS.register("bpda-eot", label="BPDA+EOT", paper="Athalye et al., ICML 2018",
                  description="PGD-40 with E=15 EOT samples per step through the defense's BPDA surrogate "
                              "(both chosen from the defense's declarations unless forced)")
class BPDAEOT(Attack):
    Params = BPDAEOTParams

    def describe(self) -> dict:
        return super().describe() | {"resolved": getattr(self, "_resolved", None)}

    def run(self, model, x, y, threat: Threat, generator):
        p = self.params
        defended = defended_of(model)
        bpda, eot = resolve(p, defended.defense)
        self._resolved = {"bpda": bpda, "eot": eot}
        saved = defended.bpda
        defended.bpda = bpda or saved  # a non-differentiable defense keeps its forced BPDA
        try:
            adv = uniform_start(x, threat.eps, generator) if p.random_start else x.clone()
            for _ in range(p.steps):
                grad = eot_gradient(model, adv, y, ce_sum, eot)
                adv = project_linf(adv.detach() + p.step_size * grad.sign(), x, threat.eps)
        finally:
            defended.bpda = saved
        return adv


@ATTACKS.register("adaptive", label="Adaptive (BPDA+EOT)", paper="Athalye et al., ICML 2018",
                  description="BPDA+EOT with BPDA and EOT chosen from the defense's declarations")
class Adaptive(BPDAEOT):
    pass
