"""AutoAttack (Croce & Hein 2020) through the ``pyautoattack`` package, unchanged.

``version: auto`` runs ``standard`` (APGD-CE, APGD-T, FAB-T, Square) on
deterministic models and ``rand`` (APGD-CE and APGD-DLR with 20 EOT iterations)
on models that declare randomness, as AutoAttack's authors prescribe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from attacks.base import Attack, Threat
from benchmark.registry import ATTACKS


@dataclass
class AutoAttackParams:
    version: Literal["auto", "standard", "rand", "plus"] = "auto"
    seed: int = 0


def resolve_version(version: str, model) -> str:
    if version != "auto":
        return version
    return "rand" if getattr(model, "stochastic", False) else "standard"


@ATTACKS.register("autoattack", label="AA", paper="Croce & Hein, ICML 2020",
                  description="AutoAttack via pyautoattack: standard, or rand (EOT) for stochastic defenses")
class AutoAttackWrapper(Attack):
    Params = AutoAttackParams

    def run(self, model, x, y, threat: Threat, generator):
        from pyautoattack import AutoAttack

        version = resolve_version(self.params.version, model)
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        adversary = AutoAttack(model, norm="Linf", eps=threat.eps, version=version, seed=self.params.seed,
                               device=x.device)
        adversary.verbose = False
        with torch.no_grad():
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv.detach()
