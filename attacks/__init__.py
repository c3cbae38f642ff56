"""Attacks. Each module registers its attacks in ``benchmark.registry.ATTACKS``."""

from attacks import adaptive, autoattack, base, bpda_eot, engine, momentum, pgd, ssp, worst  # noqa: F401
from attacks.base import Attack, Threat  # noqa: F401
from attacks.pgd import pgd_linf, project_linf, trades_kl_linf  # noqa: F401
