"""Defenses. Each module registers its defense in ``benchmark.registry.DEFENSES``."""
