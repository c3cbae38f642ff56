"""Defenses. Each module registers its defense in ``benchmark.registry.DEFENSES``."""

from defenses import apegan, base, dir, hgd, jatp, nrp  # noqa: F401
from defenses.base import DefendedModel, Defense  # noqa: F401
