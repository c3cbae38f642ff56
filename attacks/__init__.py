"""Attacks. Each module registers its attacks in ``benchmark.registry.ATTACKS``."""

from attacks.pgd import pgd_linf, project_linf, trades_kl_linf  # noqa: F401
