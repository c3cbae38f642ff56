"""Named table presets: the seed paper's Tables 1-5 rebuilt from any run's records.

A preset picks the records that belong to one of the paper's tables (by the target's training
method, the registered defense and its options, the registered attack), lays them out with the
paper's columns, and prints the paper's number beside ours with the difference. Each preset is
written as Markdown, LaTeX (booktabs) and CSV; a column's best value in bold when it is
significantly better than every other row (ranked by, and tested on, the per-sample mean over
the scoring draws: the Wilcoxon signed-rank test; exact McNemar where every value is 0/1); a
footer states the data copy, profile, n, target and
eps (the same footer as every other table of the suite). A stochastic defense's cells show the
mean accuracy over the scoring draws (the expected single-draw accuracy, which is what the seed
paper measured), and the footer says so.

Presets (``PRESETS``): ``table1`` (AT target: Natural, PGD, AA, MI, VNI; one block per dataset),
``table2`` (TRADES / MART targets: Natural, PGD, AA), ``table3`` (BPDA+EOT rows: Natural, PGD,
BPDA+EOT), ``table4`` (naturally trained target: Natural, PGD and training seconds per epoch),
``table5`` (DIR encoder/decoder depths: Natural, PGD).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from benchmark.io import atomic_write_text
from benchmark.paper import dir_depths, is_depth_variant, paper_value
from benchmark.tables import (
    TableCell,
    bold_cells,
    build_blocks,
    definitions,
    footer_text,
    latex_block,
    markdown_block,
)

SECONDS = "s/epoch"


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    attacks: tuple[str, ...]  # registered attacks, in the paper's column order
    select: Callable[[pd.DataFrame], pd.Series]  # which records (rows of the report frame) belong here
    training_time: bool = False  # add the defense's training seconds per epoch as a column
    need: str | None = None  # a record with this registered attack must exist for the row to be shown


def _not_depth_variant(df: pd.DataFrame) -> pd.Series:
    return pd.Series([not is_depth_variant(d, o) for d, o in zip(df["defense_registered"], df["defense_options"])],
                     index=df.index)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("table1", "Table 1: defenses in front of the adversarially trained target",
           ("clean", "pgd", "autoattack", "mi-fgsm", "vni-fgsm"), lambda df: df["target_method"] == "at"),
    Preset("table2", "Table 2: denoisers in front of TRADES and MART targets",
           ("clean", "pgd", "autoattack"), lambda df: df["target_method"].isin(["trades", "mart"])),
    Preset("table3", "Table 3: BPDA+EOT against random and non-differentiable defenses",
           ("clean", "pgd", "bpda-eot"), lambda df: pd.Series(True, index=df.index), need="bpda-eot"),
    Preset("table4", "Table 4: the naturally trained target, robust accuracy and training cost",
           ("clean", "pgd"), lambda df: df["target_method"] == "natural", training_time=True),
    Preset("table5", "Table 5: DIR encoder / decoder depth",
           ("clean", "pgd"), lambda df: (df["defense_registered"] == "dir") & (df["target_method"] == "at")),
)}


def preset_blocks(df: pd.DataFrame, preset: Preset, reference: dict) -> list[dict]:
    """Blocks (as ``benchmark.tables.build_blocks``) restricted to the preset, each cell carrying
    the paper's number (or None) as a fifth element."""

    chosen = preset.select(df)
    if preset.name != "table5":
        # DIR at other depths than the paper's belongs in Table 5; where a block has no DIR at the paper's
        # depth (the smoke profile's shallower DIR), it stands in, its depth in its name, without the
        # paper's numbers (they are for 8-2)
        variant = ~_not_depth_variant(df)
        shown = df["attack_registered"].isin(preset.attacks)
        if preset.need is not None:  # a row the preset keeps: one that ran the attack the preset needs
            shown &= df["defense"].isin(set(df.loc[df["attack_registered"] == preset.need, "defense"]))
        at_depth = df[chosen & shown & ~variant & (df["defense_registered"] == "dir")]
        paper_dir = set(zip(at_depth["dataset"], at_depth["target"]))
        has_paper_dir = pd.Series([(d, t) in paper_dir for d, t in zip(df["dataset"], df["target"])], index=df.index)
        stand_in = chosen & variant & ~has_paper_dir
        chosen_all = chosen
        chosen = chosen & (~variant | stand_in)
    else:
        stand_in = pd.Series(False, index=df.index)
        chosen_all = chosen
    sel = df[chosen & df["attack_registered"].isin(preset.attacks)]
    # rows left out as Table 5 depth variants (which the preset would otherwise hold), named in the footer
    left_out = df[chosen_all & ~chosen & df["attack_registered"].isin(preset.attacks)]
    if preset.need is not None:
        left_out = left_out[left_out["defense"].isin(set(df.loc[df["attack_registered"] == preset.need, "defense"]))]
        keep = set(sel.loc[sel["attack_registered"] == preset.need, "defense"])
        sel = sel[sel["defense"].isin(keep)]
    if sel.empty:
        return []
    order = {a: i for i, a in enumerate(preset.attacks)}
    blocks = [b for b in build_blocks(sel, value="mean", worst=False) if b["kind"] == "results"]
    for block in blocks:
        g = sel[(sel["dataset"] == block["dataset"]) & (sel["target"] == block["target"])]
        # every column of the preset's attacks, in the paper's order (a registered attack may hold
        # several columns, e.g. BPDA+EOT with BPDA and with exact gradients: all of them)
        firsts = dict(zip(g["column"], g["attack_registered"]))
        block["columns"] = sorted(firsts, key=lambda c: order[firsts[c]])
        standing = set(sel.loc[stand_in[sel.index] & (sel["dataset"] == block["dataset"])
                               & (sel["target"] == block["target"]), "defense"])
        for row in block["rows"]:
            row["cells"].pop("Worst", None)
            gd = g[g["defense"] == row["defense"]]
            for _, r in gd.iterrows():
                hit = None if row["defense"] in standing else paper_value(reference, r)
                row["cells"][r["column"]] = row["cells"][r["column"]]._replace(paper=hit[1] if hit else None)
            if preset.training_time:
                spe = gd["defense_seconds_per_epoch"].dropna()
                paper = None if row["defense"] in standing else reference.get("table4", {}).get(
                    gd["defense_registered"].iloc[0], {}).get("seconds_per_epoch")
                row["seconds_per_epoch"] = (float(spe.iloc[0]) if len(spe) else None, paper)
        if preset.training_time:
            block["columns"].append(SECONDS)
        out = left_out[(left_out["dataset"] == block["dataset"]) & (left_out["target"] == block["target"])]
        if preset.name != "table5" and len(out):
            rows = ", ".join(f"{d} (encoder {e}, decoder {k})" for d, (e, k) in
                             dict(zip(out["defense"], (dir_depths(o) for o in out["defense_options"]))).items())
            block["footer"]["notes"] = block["footer"]["notes"] + [
                f"Not in this table: {rows}, DIR at depths other than the paper's 8-2 (Table 5 holds it)."]
        if standing:
            depths = dict(zip(g["defense"], g["defense_options"]))
            for row in block["rows"]:
                if row["defense"] in standing:
                    e, k = dir_depths(depths[row["defense"]])
                    row["defense"] = f"{row['defense']} (depth {e}-{k})"
            block["footer"]["notes"] = block["footer"]["notes"] + [
                f"{', '.join(sorted(standing))}: DIR at encoder-decoder depth other than the paper's 8-2 (this run "
                "has no DIR at the paper's depth); the paper's numbers, for 8-2, are not shown beside it."]
        if preset.name == "table5":  # the depths are what the table compares: in the row names
            names = dict(zip(g["defense"], g["defense_options"]))
            for row in block["rows"]:
                e, k = dir_depths(names[row["defense"]])
                row["defense"] = f"{row['defense']} ({e}-{k})"
    return blocks


def _cell_text(row: dict, col: str, best: set, compare: bool, intervals: bool,
               bold: Callable[[str], str], na: str) -> str:
    if col == SECONDS:
        ours, paper = row.get("seconds_per_epoch", (None, None))
        text = na if ours is None else f"{ours:.1f}"
        if compare and paper is not None:
            text += f" / {paper:g}"
        return text
    if col not in row["cells"]:
        return na
    c: TableCell = row["cells"][col]
    acc, paper = c.acc, c.paper
    text = f"{100 * acc:.2f}"
    if intervals:
        text += f" [{100 * c.lo:.1f}, {100 * c.hi:.1f}]"
    if (row["defense"], col) in best:
        text = bold(text)
    if compare and paper is not None:
        text += f" / {paper:.2f} ({100 * acc - paper:+.2f})"
    return text


LEGEND = ("Cells: ours / the seed paper's number (ours minus paper, points). "
          "The paper used the original data, 91-epoch targets and its full training budgets.")
NO_PAPER = ("Cells: ours only: the seed paper has no number for these cells (its numbers are for CIFAR-10 and "
            "SVHN at its settings).")


def legend(block: dict, compare: bool) -> str:
    """What a preset's cells show: ours beside the paper's number where the paper has one."""
    if not compare:
        return ""
    papers = any(c.paper is not None for r in block["rows"] for c in r["cells"].values()) or any(
        r.get("seconds_per_epoch", (None, None))[1] is not None for r in block["rows"])
    return " " + (LEGEND if papers else NO_PAPER)


def preset_markdown(preset: Preset, blocks: list[dict], compare: bool = True, intervals: bool = False,
                    defined: bool = True) -> str:
    """A preset's tables, each with its own footer; with ``defined`` the definitions they share, once."""
    out = [f"## {preset.title}", ""]
    for b in blocks:
        best = bold_cells(b)
        out += markdown_block(
            b, lambda r, c, best=best: _cell_text(r, c, best, compare, intervals, lambda t: f"**{t}**", "-"),
            footer_text(b, full=False) + legend(b, compare))
    if defined and blocks:
        out += ["#### Definitions", "", *definitions(blocks), ""]
    return "\n".join(out)


def preset_latex(preset: Preset, blocks: list[dict], compare: bool = True) -> str:
    out = []
    for b in blocks:
        best = bold_cells(b)
        caption = f"{preset.title}. {b['dataset']}, target {b['target']}"
        out += latex_block(
            b, lambda r, c, best=best: _cell_text(r, c, best, compare, False, lambda t: rf"\textbf{{{t}}}", "--"),
            caption, footer_text(b) + legend(b, compare))
    return "\n".join(out)


def preset_frame(preset: Preset, blocks: list[dict]) -> pd.DataFrame:
    rows = []
    for b in blocks:
        for r in b["rows"]:
            for col in b["columns"]:
                if col == SECONDS:
                    ours, paper = r.get("seconds_per_epoch", (None, None))
                    rows.append({"preset": preset.name, "dataset": b["dataset"], "target": b["target"],
                                 "defense": r["defense"], "column": col, "value": ours, "unit": "seconds per epoch",
                                 "paper": paper,
                                 "difference": None if ours is None or paper is None else ours - paper})
                elif col in r["cells"]:
                    c = r["cells"][col]
                    acc, lo, hi, n, paper = c.acc, c.lo, c.hi, c.n, c.paper
                    rows.append({"preset": preset.name, "dataset": b["dataset"], "target": b["target"],
                                 "defense": r["defense"], "column": col, "value": 100 * acc,
                                 "ci_low": 100 * lo, "ci_high": 100 * hi, "unit": "percent", "n": n, "paper": paper,
                                 "difference": None if paper is None else 100 * acc - paper,
                                 "copy": b["footer"]["copy"], "profile": b["footer"]["profile"]})
    return pd.DataFrame(rows)


def resolve_presets(spec: str) -> list[Preset]:
    """``paper`` / ``all``: every preset; else a comma-separated list of preset names."""
    from benchmark.errors import BenchError

    if spec in ("paper", "all"):
        return list(PRESETS.values())
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        raise BenchError(f"--preset {spec!r}: unknown preset(s) {unknown or [spec]}; "
                         f"allowed: paper, all, or a comma list of {', '.join(PRESETS)}")
    return [PRESETS[n] for n in names]


def write_presets(df: pd.DataFrame, out: Path, presets: list[Preset], reference: dict) -> dict[str, list[Path]]:
    """Write ``out/<preset>.{md,tex,csv}`` for every preset that has records; {name: paths}."""
    written: dict[str, list[Path]] = {}
    for p in presets:
        blocks = preset_blocks(df, p, reference)
        if not blocks:
            continue
        written[p.name] = [
            atomic_write_text(out / f"{p.name}.md", preset_markdown(p, blocks)),
            atomic_write_text(out / f"{p.name}_ci.md", preset_markdown(p, blocks, intervals=True)),
            atomic_write_text(out / f"{p.name}.tex", preset_latex(p, blocks)),
            atomic_write_text(out / f"{p.name}.csv", preset_frame(p, blocks).to_csv(index=False)),
        ]
    return written
