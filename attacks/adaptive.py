"""Adaptive attacks for randomized and masked purifiers, and the DIR paper's probes.

* ``eot-pgd``: PGD whose gradient is the mean over E fresh draws of the defense's
  randomness (expectation over transformation).
* ``mask-adaptive`` (DIR Eq. 8): the attacker draws and fixes masks, runs PGD with them
  held fixed, and the images are scored like every other cell, under R fresh draws of
  the masks (its number counts toward the row's Worst); with the masks the attacker
  fixed (the seed paper's protocol: the attacker knows the test-time randomness) is a
  diagnostic beside it (``fixed-masks``).
* ``representation`` (DIR Eq. 9): PGD on the restored image x~ = g(x) directly
  against the classifier, inside the eps ball around x~.
* ``noise-discard`` (DIR Fig. 2, App. A): craft PGD or MI-FGSM noise against the
  model, then zero the noise on a random fraction of the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from attacks.base import Attack, IterativeParams, Threat, defended_of
from attacks.core import (
    AttackResult,
    Objective,
    as_result,
    batch_noise,
    linf_attack,
    linf_search,
    uniform_start,
)
from attacks.momentum import MIFGSM, MIParams
from attacks.pgd import PGD, PGDParams
from benchmark.config import require, subkey
from benchmark.registry import ATTACKS


@dataclass
class EOTPGDParams(PGDParams):
    eot: int = 20


@ATTACKS.register("eot-pgd", label="EOT-PGD", paper="Athalye et al., ICML 2018",
                  description="PGD with the gradient averaged over E=20 draws of the defense's randomness")
class EOTPGD(PGD):
    Params = EOTPGDParams


@dataclass
class MaskAdaptiveParams(IterativeParams):
    steps: int = 40
    random_start: bool = True


@ATTACKS.register("mask-adaptive", label="Mask-adaptive", paper="Zhou et al., ICML 2023 (Eq. 8)",
                  description="PGD-40 with masks drawn and fixed by the attacker; scored under fresh masks "
                              "(with the fixed masks: a diagnostic)")
class MaskAdaptive(Attack):
    Params = MaskAdaptiveParams
    version = 2  # scored under fresh masks (the fixed-mask accuracy is a diagnostic); best iterate too
    diagnostic_measures = {"fixed-masks": (
        "the same images scored with the masks the attacker drew and fixed (the seed paper's Eq. 8 protocol: "
        "an attacker who knows the test-time randomness); the headline column scores them under fresh masks")}

    @classmethod
    def applies_to(cls, defense_cls: type) -> bool:
        return bool(getattr(defense_cls, "uses_masks", False))

    def run(self, model, x, y, threat: Threat, generator):
        defended = defended_of(model)
        if not defended.defense.uses_masks:
            raise TypeError(f"mask-adaptive needs a defense that uses masks; "
                            f"{type(defended.defense).__name__} does not")
        p = self.params
        masks = defended.defense.sample_masks(x)
        start = uniform_start(x, threat.eps, generator) if p.random_start else None
        with defended.fixed_masks(masks):
            search = linf_search(Objective(model, y), x, eps=threat.eps, step_size=p.step_size, steps=p.steps,
                                 start=start)

        def fixed(scorer, x_adv):  # with the masks the attacker knew: no fresh randomness
            with defended.fixed_masks(masks):
                return scorer(x_adv)

        return search.result(diagnostics={"fixed-masks": fixed})


@dataclass
class RepresentationParams(IterativeParams):
    source: Literal["clean", "pgd"] = "clean"  # what g restores: the clean input or a PGD-20 example
    source_steps: int = 20

    def validate(self, where: str) -> None:
        super().validate(where)
        require(self.source_steps >= 1, subkey(where, "source_steps"), "must be >= 1")


@ATTACKS.register("representation", label="Representation", paper="Zhou et al., ICML 2023 (Eq. 9)",
                  description="PGD-20 on the restored image against the classifier alone, in the eps ball around it")
class RepresentationAttack(Attack):
    """The threat ball of this attack is centred on x~ = g(x), not on x, and it is scored by the
    classifier alone: its result says so (:class:`~attacks.core.AttackResult`)."""

    Params = RepresentationParams
    centred_on_input = False
    threat_space = "representation"
    measures = ("how far the classifier alone is from adversarial examples around the restored image "
                "(perturbation around g(x), scored without the defense): not robustness of the defended model")

    def run(self, model, x, y, threat: Threat, generator):
        defended = defended_of(model)
        p = self.params
        source = x
        if p.source == "pgd":
            source = as_result(PGD(steps=p.source_steps, step_size=p.step_size).run(model, x, y, threat, generator)).x_adv
        with torch.no_grad():
            restored = defended.purify(source).clamp(0.0, 1.0)  # one draw of the defense's randomness
        adv = linf_attack(Objective(defended.classifier, y), restored, eps=threat.eps, step_size=p.step_size,
                          steps=p.steps)
        return AttackResult(adv, center=restored, random_score=False,
                            score=lambda scorer, x_adv: defended_of(scorer).classifier(x_adv))


@dataclass
class NoiseDiscardParams(IterativeParams):
    base: Literal["pgd", "mi-fgsm"] = "pgd"
    fraction: float = 0.5  # share of pixels whose noise is set to zero
    decay: float = 1.0

    def validate(self, where: str) -> None:
        super().validate(where)
        require(0 <= self.fraction <= 1, subkey(where, "fraction"), f"must be in [0, 1], got {self.fraction}")


@ATTACKS.register("noise-discard", label="Noise-discard", paper="Zhou et al., ICML 2023 (Fig. 2, App. A)",
                  description="PGD or MI-FGSM noise with a random fraction of its pixels zeroed")
class NoiseDiscard(Attack):
    Params = NoiseDiscardParams
    threat_space = "probe"
    measures = ("accuracy after a deliberately weakened attack (a fraction of its noise zeroed, DIR's "
                "Fig. 2 probe): how much noise the model tolerates, not a bound on robustness")

    def run(self, model, x, y, threat: Threat, generator):
        p = self.params
        if p.base == "pgd":
            base = PGD(steps=p.steps, step_size=p.step_size)
        else:
            base = MIFGSM(**{k: getattr(p, k) for k in MIParams.__dataclass_fields__})
        adv = as_result(base.run(model, x, y, threat, generator)).x_adv  # its last iterate
        # per pixel (all channels together), keep the noise with probability 1 - fraction
        keep = batch_noise((x.shape[0], 1, *x.shape[2:]), x, generator) >= p.fraction
        return (x + (adv - x) * keep).clamp(0.0, 1.0)
