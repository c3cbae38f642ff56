"""BPDA+EOT (Athalye et al., ICML 2018; the attack of Hill et al. and of the seed paper's Table 3).

PGD-40 (2/255, uniform random start) whose gradient is the mean over E draws of the
defense's randomness (EOT, default E = 15 as in the EBM paper's attack), taken through
the defense's BPDA surrogate (identity by default: straight-through) where the defense
is not differentiable or declares that exact gradients are impractical (``prefers_bpda``:
an iterative inner loop such as AID-Purifier's or a long Langevin chain).

``bpda`` and ``eot`` are ``auto`` by default: read from the defense's declarations (BPDA
for non-differentiable or ``prefers_bpda`` defenses; E = ``eot_samples`` for stochastic
ones, 1 otherwise). A config can force either (``bpda: true/false``, ``eot: 1``...).

``gradient`` chooses how the gradient crosses an iterative or non-differentiable purifier
that declares exact gradients (EBM, AID-Purifier, ME-Net): ``bpda`` (the surrogate, as
above), ``exact`` (back-propagate through the purification itself with that draw's
randomness held fixed: ``Defense.purify_exact``, checkpointed), or ``auto``: the BPDA
attack first, then the exact one (as the parts of :func:`attacks.core.run_parts`: where one pass
decides, only on the samples the BPDA attack left correct; where the scoring draws randomness, on
every sample), and the harness keeps per sample the worst of both images under each score, so
``auto`` is never weaker than either. For a defense without exact gradients every choice is
``bpda``. ``loss``: ce (default), dlr or margin.
Registered twice: ``bpda-eot`` (``gradient: bpda`` by default) and ``adaptive`` (every
choice left to the declarations, ``gradient: auto``). What was used is reported in the
record (``attack_info.resolved``: bpda, eot, gradient = bpda / direct / exact / bpda+exact;
direct = the plain white-box gradient of a differentiable defense).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from attacks.base import Attack, IterativeParams, Threat, defended_of
from attacks.core import LOSSES, Objective, linf_search, run_parts, uniform_start
from attacks.pgd import check_loss
from benchmark.config import require, subkey
from benchmark.registry import ATTACKS


@dataclass
class BPDAEOTParams(IterativeParams):
    steps: int = 40
    random_start: bool = True
    bpda: bool | str = "auto"
    eot: int | str = "auto"
    eot_samples: int = 15  # E used by eot: auto against a stochastic defense
    gradient: Literal["bpda", "exact", "auto"] = "bpda"
    loss: str = "ce"  # ce, dlr or margin

    def validate(self, where: str) -> None:
        super().validate(where)
        check_loss(self.loss, where)
        require(self.gradient in ("bpda", "exact", "auto"), subkey(where, "gradient"),
                f"must be bpda, exact or auto, got {self.gradient!r}")
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


@dataclass
class AdaptiveParams(BPDAEOTParams):
    gradient: Literal["bpda", "exact", "auto"] = "auto"


@ATTACKS.register("bpda-eot", label="BPDA+EOT", paper="Athalye et al., ICML 2018",
                  description="PGD-40 with E=15 EOT samples per step through the defense's BPDA surrogate "
                              "(both chosen from the defense's declarations unless forced)")
class BPDAEOT(Attack):
    Params = BPDAEOTParams

    version = 2  # each mode's best iterate scored too; BPDA-then-exact decides with the scoring draws

    def run(self, model, x, y, threat: Threat, generator):
        p = self.params
        defended = defended_of(model)
        bpda, eot = resolve(p, defended.defense)
        exact = defended.defense.exact_gradient and p.gradient != "bpda"
        surrogate = "bpda" if bpda or defended.bpda else "direct"  # direct: the plain white-box gradient
        modes = [surrogate, "exact"] if exact and p.gradient == "auto" else ["exact" if exact else surrogate]

        def part(mode):
            def attack(xs, ys):
                with defended.gradients(bpda=bpda if mode != "exact" else None, exact=mode == "exact"):
                    return self._pgd(model, xs, ys, threat, generator, eot)
            return attack

        result = run_parts([part(m) for m in modes], model, x, y, generator, fresh=True)
        result.info["resolved"] = {"bpda": "bpda" in modes, "eot": eot, "gradient": "+".join(modes)}
        return result

    def _pgd(self, model, x, y, threat: Threat, generator, eot: int):
        p = self.params
        start = uniform_start(x, threat.eps, generator) if p.random_start else None
        return linf_search(Objective(model, y, LOSSES[p.loss], eot), x, eps=threat.eps, step_size=p.step_size,
                           steps=p.steps, start=start).result()


@ATTACKS.register("adaptive", label="Adaptive (BPDA+EOT)", paper="Athalye et al., ICML 2018",
                  description="BPDA+EOT with BPDA and EOT chosen from the defense's declarations")
class Adaptive(BPDAEOT):
    Params = AdaptiveParams
    version = 3  # 2: gradient auto by default (exact gradients after BPDA where a defense has them); 3: as BPDA+EOT's 2
