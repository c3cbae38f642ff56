"""Defenses. Each module registers its defense in ``benchmark.registry.DEFENSES``; every module
saved in this folder is imported (a new defense needs no other line), names starting with ``_`` aside."""

from benchmark.registry import discover
from defenses.base import DefendedModel, Defense  # noqa: F401

discover(__name__, __path__, ["base", "unroll", "pairs", "aid", "apegan", "dir", "dir_official", "ebm", "hgd", "jatp",
                              "menet", "nrp"])
