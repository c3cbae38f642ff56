"""The seed paper's numbers (DIR, ICML 2023: Tables 1-5 and the text, ``reference/dir_paper.json``)
and which of them a cell of ours compares with; read by the report and by the paper presets."""

from __future__ import annotations

import json
from importlib import resources

DIR_DEPTHS = (8, 2)  # the paper's DIR: encoder depth 8, decoder depth 2 (other depths are Table 5 variants)
DIR_ALPHA = 2.0  # the paper's weight of L_rep (Eq. 7)


def dir_depths(options: dict) -> tuple[int, int]:
    """(encoder depth, decoder depth) of a DIR row's options, the paper's where not set."""
    return int(options.get("depth", DIR_DEPTHS[0])), int(options.get("decoder_depth", DIR_DEPTHS[1]))


def is_depth_variant(defense: str, options: dict) -> bool:
    """A DIR row at depths other than the paper's: it belongs in Table 5, not Tables 1-4."""
    return defense == "dir" and dir_depths(options) != DIR_DEPTHS


def reference_numbers() -> dict:
    with resources.files("benchmark").joinpath("reference/dir_paper.json").open() as f:
        return json.load(f)


def paper_value(ref: dict, row) -> tuple[str, float] | None:
    """The seed paper's number for this cell, and where it comes from (None if it has none)."""
    ds, d, a = str(row["dataset"]), row["defense_registered"], row["attack_registered"]
    family = "svhn" if ds.startswith("svhn") else "cifar10" if "cifar10" in ds else None
    if family is None or row.get("gradient") in ("exact", "bpda+exact") or row.get("attack_subset"):
        return None  # no data of the paper's, or not the paper's attack (exact gradients, part of AutoAttack)
    method = row.get("target_method")
    options = row.get("defense_options") or {}
    if is_depth_variant(d, options):
        key = "-".join(map(str, dir_depths(options)))
        v = ref["table5"].get(key, {}).get(a) if family == "cifar10" else None
        return ("Table 5", v) if v is not None else None
    if a == "bpda-eot" and family == "cifar10":
        v = ref["table3"].get(d, {}).get(a)
        return ("Table 3", v) if v is not None else None
    if method in ("trades", "mart") and family == "cifar10":
        v = ref["table2"][method].get(d, {}).get(a)
        return ("Table 2", v) if v is not None else None
    if method == "natural" and family == "cifar10" and a == "pgd":
        v = ref["table4"].get(d, {}).get(a)
        return ("Table 4", v) if v is not None else None
    if method == "at":
        v = ref["table1"][family].get(d, {}).get(a)
        if v is None and family == "cifar10":
            v = ref["text"].get(d, {}).get(a)
            return ("§4.2-4.3", v) if v is not None else None
        return ("Table 1", v) if v is not None else None
    return None
