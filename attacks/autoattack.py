"""AutoAttack (Croce & Hein 2020) through the ``pyautoattack`` package, unchanged.

``version: auto`` runs ``standard`` (APGD-CE, APGD-T, FAB-T, Square) on
deterministic models and ``rand`` (APGD-CE and APGD-DLR with 20 EOT iterations)
on models that declare randomness, as AutoAttack's authors prescribe.
``attacks`` runs only some members of the version's sequence, with the version's
settings (e.g. ``[apgd-ce, apgd-t]``, the usual cheap subset for small runs); the
config should then give the attack a label that says so.
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
    attacks: list[str] | None = None  # members of the version's sequence to run (None: all of them)
    seed: int = 0

    def validate(self, where: str) -> None:
        from benchmark.config import require, subkey

        if self.attacks is not None:
            known = sorted(set().union(*SEQUENCES.values()))
            bad = [a for a in self.attacks if a not in known]
            require(not bad and len(self.attacks) > 0, subkey(where, "attacks"),
                    f"must be a non-empty list of {', '.join(known)}; got {self.attacks}")
            if self.version != "auto":
                check_members(self.version, self.attacks, subkey(where, "attacks"))


def check_members(version: str, attacks: list[str], where: str, row: str | None = None) -> None:
    """``attacks`` must all be members of ``version`` (the one a row gets, for ``version: auto``)."""
    from benchmark.config import ConfigError

    missing = [a for a in attacks if a not in SEQUENCES[version]]
    if missing:
        gets = f" that {row} gets" if row else ""
        raise ConfigError(f"{where}: {', '.join(missing)} not in the {version} version{gets} "
                          f"({', '.join(SEQUENCES[version])})")


# each version's attacks, in the order pyautoattack runs them
SEQUENCES = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "rand": ("apgd-ce", "apgd-dlr"),
             "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")}


def version_for(version: str, stochastic: bool) -> str:
    """The version a model gets: ``auto`` is ``rand`` for a stochastic one, else ``standard``."""
    if version != "auto":
        return version
    return "rand" if stochastic else "standard"


def resolve_version(version: str, model) -> str:
    return version_for(version, getattr(model, "stochastic", False))


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
        if self.params.attacks is not None:  # (a config has checked this per row already)
            check_members(version, self.params.attacks, "autoattack params.attacks", "this defense")
            adversary.attacks_to_run = [a for a in SEQUENCES[version] if a in self.params.attacks]
        with torch.no_grad():
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv.detach()


@dataclass
class SquareParams:
    n_queries: int = 5000
    p_init: float = 0.8
    restarts: int = 1
    seed: int = 0

    def validate(self, where: str) -> None:
        from benchmark.config import require, subkey

        require(self.n_queries >= 1, subkey(where, "n_queries"), f"must be >= 1, got {self.n_queries}")
        require(0 < self.p_init <= 1, subkey(where, "p_init"), f"must be in (0, 1], got {self.p_init}")
        require(self.restarts >= 1, subkey(where, "restarts"), f"must be >= 1, got {self.restarts}")


@ATTACKS.register("square", label="Square", paper="Andriushchenko et al., ECCV 2020",
                  description="Square Attack (score-based, no gradients) via pyautoattack, margin loss")
class Square(Attack):
    """The gradient-free member of AutoAttack on its own: the reference the gradient-masking
    checks compare white-box attacks with (a black-box attack must not beat them)."""

    Params = SquareParams
    uses_gradients = False

    def run(self, model, x, y, threat: Threat, generator):
        from pyautoattack.square import SquareAttack

        p = self.params
        adversary = SquareAttack(model, norm="Linf", eps=threat.eps, n_queries=p.n_queries, p_init=p.p_init,
                                 n_restarts=p.restarts, seed=p.seed, device=x.device)
        # perturb() reseeds the global generators: keep its seeding from leaking into what follows
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad():
            x_adv = adversary.perturb(x, y)
        # Square rounds nothing but may step a hair past the ball in float arithmetic: clamp to it.
        return torch.min(torch.max(x_adv.detach(), x - threat.eps), x + threat.eps).clamp(0, 1)
