"""Attacks. Each module registers its attacks in ``benchmark.registry.ATTACKS``; every module saved
in this folder is imported (a new attack needs no other line), names starting with ``_`` aside."""

from attacks.base import Attack, Threat  # noqa: F401
from attacks.pgd import pgd_linf, project_linf, trades_kl_linf  # noqa: F401
from benchmark.registry import discover

discover(__name__, __path__, ["base", "core", "engine", "adaptive", "autoattack", "bpda_eot", "momentum", "pgd", "ssp",
                              "worst"])
