"""Defenses. Each module registers its defense in ``benchmark.registry.DEFENSES``."""

from defenses import aid, apegan, base, dir, dir_official, ebm, hgd, jatp, menet, nrp  # noqa: F401
from defenses.base import DefendedModel, Defense  # noqa: F401
