"""Reports built from a run's records (pure functions from records to files).

* the result tables (``benchmark.tables``);
* the **adaptive table**: per defense, the plain white-box PGD number next to the strongest
  attack the run built from the defense's declarations (EOT for stochastic, BPDA for
  non-differentiable, mask-adaptive for masked, AutoAttack), and the drop;
* the **paper comparison**: our numbers beside the seed paper's (``reference/dir_paper.json``)
  for the rows and columns both have, with the difference;
* the **timing report**: per cell wall time, images/s, forward/backward passes, peak GPU
  memory; per defense training time per epoch; totals; a bar chart;
* a cost/robustness scatter;
* ``report/index.md`` linking everything, with the run's manifest at the top.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from benchmark.io import atomic_write_text
from benchmark.masking import active_markdown, load_checks
from benchmark.paper import DIR_ALPHA, paper_value, reference_numbers
from benchmark.records import CellRecord, as_record, load_records
from benchmark.stats import mcnemar
from benchmark.tables import (
    attack_columns,
    build_blocks,
    definitions,
    input_space_worst,
    left_out,
    left_out_markdown,
    records_frame,
    to_markdown,
    write_tables,
)

ADAPTIVE_ATTACKS = ("eot-pgd", "bpda-eot", "adaptive", "mask-adaptive", "autoattack")
PLAIN = "pgd"


def _frame(records: list[CellRecord | dict]) -> pd.DataFrame:
    records = [as_record(r) for r in records]
    df = records_frame(records)
    df = df[df["scoring"].isna()].reset_index(drop=True)  # one row per cell: other scorings are the tables' business
    of = [records[i] for i in df["record"]]
    df["defense_options"] = [r.defense_options or {} for r in of]
    df["defense_seconds_per_epoch"] = [(r.defense_training or {}).get("seconds_per_epoch") for r in of]
    df["defense_train_seconds"] = [(r.defense_training or {}).get("seconds") for r in of]
    df["gradient_masked"] = [r.gradient_check is not None and r.gradient_check.masked for r in of]
    df["gradient"] = [gradient_mode(r) for r in of]
    df["attack_subset"] = [bool((r.attack_params or {}).get("attacks")) for r in of]  # part of AutoAttack
    return df


def gradient_mode(record: CellRecord) -> str | None:
    """How a BPDA+EOT / adaptive cell's gradient crossed a purifier that declares exact gradients:
    bpda, exact or bpda+exact (None for other cells and defenses)."""
    if record.attack not in ("bpda-eot", "adaptive") or not record.defense_declarations.get("exact_gradient"):
        return None
    return (record.attack_info.get("resolved") or {}).get("gradient")


# ----------------------------------------------------------------------------- adaptive table
def adaptive_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, target, defense): plain PGD, the strongest adaptive attack and the drop;
    the row's Worst over its input-space attacks, and that Worst against the ``none`` row of the same
    target on the same samples (difference with Newcombe's 95% interval, exact McNemar p)."""
    rows = []
    for (ds, target), gt in df.groupby(["dataset", "target"], sort=False):
        none = gt[gt["defense_registered"] == "none"]
        none_worst = input_space_worst(none) if len(none) and none["defense"].nunique() == 1 else None
        for defense, g in gt.groupby("defense", sort=False):
            plain = g[g["attack_registered"] == PLAIN]
            adaptive = g[g["attack_registered"].isin(ADAPTIVE_ATTACKS)]
            if plain.empty and adaptive.empty:
                continue
            row = {"dataset": ds, "target": target, "defense": defense,
                   "plain": float(plain["accuracy"].min()) if len(plain) else None}
            if len(adaptive):
                best = adaptive.loc[adaptive["accuracy"].idxmin()]
                row |= {"adaptive": float(best["accuracy"]), "adaptive_attack": best["column"],
                        "adaptive_ci": (float(best["ci_low"]), float(best["ci_high"]))}
            else:
                row |= {"adaptive": None, "adaptive_attack": None, "adaptive_ci": None}
            row["drop"] = (row["plain"] - row["adaptive"]) if row["plain"] is not None and row["adaptive"] is not None \
                else None
            for mode in ("bpda", "exact"):
                cells = g[g["gradient"] == mode] if "gradient" in g else g.iloc[:0]
                row[mode] = float(cells["accuracy"].min()) if len(cells) else None
            worst = input_space_worst(g)
            row["worst"] = worst.acc if worst else None
            row["vs_none"] = None
            if worst and none_worst and defense not in set(none["defense"]):
                # over the attacks both rows faced: a Worst over fewer attacks is not comparable
                shared = attack_columns(g) & attack_columns(none)
                ours, theirs = input_space_worst(g, shared), input_space_worst(none, shared)
                if ours and theirs:
                    m = min(len(ours.bits), len(theirs.bits))
                    row["vs_none"] = mcnemar(ours.bits[:m], theirs.bits[:m]) | {"attacks": len(shared)}
            masked = g[g["gradient_masked"]] if "gradient_masked" in g else g.iloc[:0]
            row["masking_flags"] = ", ".join(dict.fromkeys(masked["column"])) or None
            rows.append(row)
    return pd.DataFrame(rows)


def _pct(v) -> str:
    return "-" if v is None or pd.isna(v) else f"{100 * v:.2f}"


def _paired(c, with_n: bool = False) -> str:
    """A paired comparison (:func:`benchmark.stats.mcnemar`) in points: difference [95% interval], p."""
    if not isinstance(c, dict):
        return "-"
    p = f"p = {c['p_value']:.3f}" if c["p_value"] >= 0.001 else "p < 0.001"
    n = f" (n = {c['n']})" if with_n else ""
    k = f", k = {c['attacks']}" if "attacks" in c else ""
    return f"{100 * c['difference']:+.2f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}], {p}{k}{n}"


def adaptive_markdown(table: pd.DataFrame) -> str:
    out = ["| Dataset | Target | Defense | PGD (plain white-box) | Strongest adaptive | attack | Drop | "
           "BPDA+EOT: BPDA | BPDA+EOT: exact | Worst | Worst vs none | Zero-gradient flag |",
           "|---|---|---|---:|---:|---|---:|---:|---:|---:|---|---|"]
    for _, r in table.iterrows():
        ci = r["adaptive_ci"]
        adaptive = _pct(r["adaptive"]) + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
        flags = r.get("masking_flags")
        out.append(f"| {r['dataset']} | {r['target']} | {r['defense']} | {_pct(r['plain'])} | {adaptive} | "
                   f"{r['adaptive_attack'] if isinstance(r['adaptive_attack'], str) else '-'} | {_pct(r['drop'])} | "
                   f"{_pct(r.get('bpda'))} | {_pct(r.get('exact'))} | {_pct(r['worst'])} | {_paired(r['vs_none'])} | {flags if isinstance(flags, str) else '-'} |")
    out.append("")
    out.append("Strongest adaptive = the lowest accuracy among the attacks built from the defense's declarations "
               f"({', '.join(ADAPTIVE_ATTACKS)}) that the run holds; Drop = PGD minus that, in points. A large drop "
               "means plain PGD overestimated the defense. BPDA+EOT: BPDA / exact = the BPDA+EOT cells whose gradient crossed the "
               "purifier through its BPDA surrogate / exactly (back-propagated through the purification with the "
               "draw's randomness held fixed), for the defenses that declare exact gradients. Worst = per-sample worst case over the row's input-space "
               "attacks (diagnostics such as the representation attack excluded; a stochastic defense's samples "
               "count only if correct under every scoring draw). Worst vs none = the row's Worst minus the target "
               "alone's Worst on the same samples, both over the attacks the two rows faced (their number after k), in points, with Newcombe's 95% interval for paired proportions "
               "and the exact McNemar p-value: an interval that contains 0 shows no significant gain. "
               "Zero-gradient flag: the attacks (columns) whose input "
               "gradient at the clean images was zero for at least half of them, or not finite (gradient masking: "
               "their numbers overstate robustness; attack through BPDA).")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- DIR as released: ablation
ABLATION = ("none", "joint-at", "dir-official", "dir")
# (row, against, what the difference measures)
ABLATION_PAIRS = (("joint-at", "none", "the joint recipe and its KL term (from scratch) over AT"),
                  ("dir-official", "joint-at", "the released denoiser"),
                  ("dir-official", "none", "the released DIR over the AT target"),
                  ("dir", "none", "the paper's DIR (frozen target) over the AT target"))


def _row_bits(g: pd.DataFrame) -> dict[str, str | None]:
    """{"clean": the clean cell's bits, "worst": the row's Worst bits} (None where missing)."""
    clean = g[g["attack_registered"] == "clean"]
    worst = input_space_worst(g)
    return {"clean": clean["correct"].iloc[0] if len(clean) else None, "worst": worst.bits if worst else None}


def ablation_table(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """For each (dataset, target) with a ``joint-at`` and a ``dir-official`` row: the rows of the DIR
    ablation (the target alone, the joint control, DIR as released, the paper's DIR) with their
    natural and Worst accuracy, and the paired differences of :data:`ABLATION_PAIRS` on the same
    samples (Newcombe's 95% interval, exact McNemar p). Empty frames when no group has both."""
    rows, diffs = [], []
    for (ds, target), g in df.groupby(["dataset", "target"], sort=False):
        present = set(g["defense_registered"])
        if not {"joint-at", "dir-official"} <= present:
            continue
        bits: dict[str, list[tuple[str, dict]]] = {}
        for defense, gd in g[g["defense_registered"].isin(ABLATION)].groupby("defense", sort=False):
            b = _row_bits(gd)
            kind = gd["defense_registered"].iloc[0]
            bits.setdefault(kind, []).append((defense, b, gd))
            rows.append({"dataset": ds, "target": target, "defense": defense, "registered": kind,
                         "clean": None if b["clean"] is None else b["clean"].count("1") / len(b["clean"]),
                         "worst": None if b["worst"] is None else b["worst"].count("1") / len(b["worst"]),
                         "n": int(gd["n"].max())})
        for a, b, meaning in ABLATION_PAIRS:
            for name_a, bits_a, g_a in bits.get(a, []):
                for name_b, bits_b, g_b in bits.get(b, []):
                    row = {"dataset": ds, "target": target, "comparison": f"{name_a} - {name_b}", "measures": meaning}
                    u, v = bits_a["clean"], bits_b["clean"]
                    row["clean"] = mcnemar(u[:min(len(u), len(v))], v[:min(len(u), len(v))]) if u and v else None
                    shared = attack_columns(g_a) & attack_columns(g_b)  # Worst over the attacks both faced
                    wa, wb = input_space_worst(g_a, shared), input_space_worst(g_b, shared)
                    row["worst"] = None
                    if shared and wa and wb:
                        m = min(len(wa.bits), len(wb.bits))
                        row["worst"] = mcnemar(wa.bits[:m], wb.bits[:m]) | {"attacks": len(shared)}
                    diffs.append(row)
    return pd.DataFrame(rows), pd.DataFrame(diffs)


def ablation_markdown(rows: pd.DataFrame, diffs: pd.DataFrame) -> str:
    out = ["| Dataset | Target | Row | Defense | n | Natural | Worst |", "|---|---|---|---|---:|---:|---:|"]
    for _, r in rows.iterrows():
        out.append(f"| {r['dataset']} | {r['target']} | {r['defense']} | {r['registered']} | {r['n']} | "
                   f"{_pct(r['clean'])} | {_pct(r['worst'])} |")
    out += ["", "| Dataset | Target | Difference | Measures | Natural | Worst |", "|---|---|---|---|---|---|"]
    for _, r in diffs.iterrows():
        out.append(f"| {r['dataset']} | {r['target']} | {r['comparison']} | {r['measures']} | {_paired(r['clean'], True)} | "
                   f"{_paired(r['worst'], True)} |")
    out += ["", "DIR as its released code trains it (dir-official: its own classifier from scratch, trained jointly "
            "with the denoiser) against the same joint training without a denoiser (joint-at), the target alone "
            "(none) and the paper's DIR on the frozen target (dir). Worst = per-sample worst case over the row's "
            "input-space attacks (a stochastic row's sample counts only if correct under every scoring draw). "
            "Differences in points on the same samples, with Newcombe's 95% interval for paired proportions and "
            "the exact McNemar p-value: an interval that contains 0 shows no significant difference. A difference "
            "of Worst is over the attacks both rows faced (their number after k; a mask-adaptive column exists only "
            "for the masked rows), so that it compares like with like."]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- paper comparison
def paper_comparison(df: pd.DataFrame, reference: dict | None = None) -> pd.DataFrame:
    """Our accuracies next to the seed paper's (Tables 1-5 and the text, matched by dataset family,
    target training method, registered defense and options, registered attack), in points."""
    ref = reference or reference_numbers()
    rows = []
    for _, r in df.iterrows():
        hit = paper_value(ref, r)
        if hit is None:
            continue
        where, paper = hit
        ours = 100 * float(r["mean_accuracy"])  # the paper scored one draw: the expected single-draw accuracy
        rows.append({"dataset": r["dataset"], "target": r["target"], "defense": r["defense"],
                     "column": r["column"], "ours": ours, "paper": paper, "difference": ours - paper,
                     "source": where, "copy": r["copy"], "profile": r["profile"], "n": int(r["n"])})
    return pd.DataFrame(rows)


def comparison_markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "No cell of this run has a counterpart in the seed paper.\n"
    out = ["| Dataset | Target | Defense | Column | Ours | Paper | Ours - paper | Paper source |",
           "|---|---|---|---|---:|---:|---:|---|"]
    for _, r in table.iterrows():
        out.append(f"| {r['dataset']} | {r['target']} | {r['defense']} | {r['column']} | {r['ours']:.2f} | "
                   f"{r['paper']:.2f} | {r['difference']:+.2f} | {r['source']} |")
    copies = ", ".join(sorted(set(table["copy"].astype(str))))
    profiles = ", ".join(sorted(set(table["profile"].astype(str))))
    out += ["", f"Ours: {copies}; profile {profiles}; n = {', '.join(map(str, sorted(set(table['n']))))}. "
            "Stochastic defenses: ours is the mean accuracy over the scoring draws (the expected single-draw "
            "accuracy). Paper: original CIFAR-10 / SVHN, full test sets, 91-epoch targets. "
            "Differences of a few points are expected from the data copy and the training budget alone."]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- timing
def timing_table(df: pd.DataFrame) -> pd.DataFrame:
    cols = ["dataset", "target", "defense", "column", "n", "seconds", "images_per_second", "forwards",
            "backwards", "peak_gpu_memory_mb"]
    return df[cols].copy()


def training_table(df: pd.DataFrame) -> pd.DataFrame:
    g = df.dropna(subset=["defense_train_seconds"]).drop_duplicates(["dataset", "target", "defense"])
    return g[["dataset", "target", "defense", "defense_seconds_per_epoch", "defense_train_seconds"]].copy()


def _num(v, fmt: str) -> str:
    return "-" if v is None or pd.isna(v) else format(v, fmt)


def timing_markdown(cells: pd.DataFrame, training: pd.DataFrame) -> str:
    out = ["### Evaluation cells", "",
           "| Dataset | Target | Defense | Attack | n | wall s | images/s | forwards | backwards | peak GPU MiB |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for _, r in cells.iterrows():
        out.append(f"| {r['dataset']} | {r['target']} | {r['defense']} | {r['column']} | {int(r['n'])} | "
                   f"{_num(r['seconds'], '.1f')} | {_num(r['images_per_second'], '.0f')} | "
                   f"{_num(r['forwards'], ',.0f')} | {_num(r['backwards'], ',.0f')} | "
                   f"{_num(r['peak_gpu_memory_mb'], '.0f')} |")
    total = cells["seconds"].fillna(0).sum()
    out += ["", f"Total evaluation time: {total:.1f} s over {len(cells)} cells.", "", "### Defense training", "",
            "| Dataset | Target | Defense | s per epoch | total s |", "|---|---|---|---:|---:|"]
    for _, r in training.iterrows():
        out.append(f"| {r['dataset']} | {r['target']} | {r['defense']} | {_num(r['defense_seconds_per_epoch'], '.1f')}"
                   f" | {_num(r['defense_train_seconds'], '.1f')} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- figures
def _save(fig, stem: Path, caption: str) -> list[Path]:
    """The figure as PNG and PDF (no caption inside: a paper sets its own), its caption as text (the HTML
    report shows it under the image) and as a LaTeX figure snippet (``\\input`` it beside the PDF)."""
    from benchmark.tables import _tex_escape

    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = stem.with_suffix(f".{ext}")
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # workers that finish together write side by side
        # no creation date: the same records give byte-identical figures (published reports do not churn)
        meta = {"CreationDate": None} if ext == "pdf" else {}
        fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight", metadata=meta)
        tmp.replace(path)
        paths.append(path)
    paths.append(atomic_write_text(stem.parent / f"{stem.name}.txt", caption + "\n"))
    paths.append(atomic_write_text(stem.parent / f"{stem.name}.tex", "\n".join([
        r"\begin{figure}[t]", r"\centering", rf"\includegraphics[width=\linewidth]{{figures/{stem.name}.pdf}}",
        r"\caption{" + _tex_escape(caption) + "}", rf"\label{{fig:{stem.name}}}", r"\end{figure}", ""])))
    return paths


def caption_of(png: Path) -> str:
    """A figure's caption (written beside it by :func:`_save`), or "" for a figure without one."""
    text = png.with_suffix(".txt")
    return text.read_text(encoding="utf-8").strip() if text.is_file() else ""


def timing_figure(cells: pd.DataFrame, stem: Path) -> list[Path]:
    """Evaluation seconds per defense, stacked by attack: rows that ran different attack sets are
    compared attack by attack, never by their totals alone."""
    plt = _plt()

    per = cells.pivot_table(index="defense", columns="column", values="seconds", aggfunc="sum", sort=False)
    per = per.reindex(list(dict.fromkeys(cells["defense"]))).fillna(0.0)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.6 * len(per) + 3), 3.4))
    bottom = pd.Series(0.0, index=per.index)
    cmap = plt.get_cmap("tab10")  # ten distinct hues, then the same hues hatched: no two segments look alike
    for k, col in enumerate(per.columns):
        ax.bar(range(len(per)), per[col].values, bottom=bottom.values, color=cmap(k % 10), label=col,
               hatch=("", "///", "...", "xxx")[(k // 10) % 4], edgecolor="white", linewidth=0.3)
        bottom += per[col]
    ax.set_xticks(range(len(per)), per.index, rotation=45, ha="right")
    ax.set_ylabel("evaluation wall time (s)")
    ax.set_title("Evaluation cost per defense, by attack")
    ax.legend(fontsize=6, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    n = ", ".join(map(str, sorted(set(int(v) for v in cells["n"])))) if "n" in cells else "-"
    paths = _save(fig, stem, f"Wall time of each evaluation cell (attack and scoring) on n = {n} images, stacked "
                             "by attack; a segment is missing where the row did not run that attack.")
    plt.close(fig)
    return paths


def cost_robustness_figure(df: pd.DataFrame, stem: Path) -> list[Path]:
    """Each row's evaluation cost against its Worst, the results table's headline (first dataset and target)."""
    from matplotlib.ticker import LogLocator, ScalarFormatter

    g = df[(df["dataset"] == df["dataset"].iloc[0]) & (df["target"] == df["target"].iloc[0])]
    # cost over the attacks every row has (an attack run on some rows only would skew the comparison)
    common = set.intersection(*[set(gd["attack"]) for _, gd in g.groupby("defense", sort=False)])
    shared = g[g["attack"].isin(common)]
    cost = shared.groupby("defense", sort=False).apply(
        lambda gd: 1000 * gd["seconds"].fillna(0).sum() / max(1, gd["n"].max()), include_groups=False)
    worst = {d: input_space_worst(gd) for d, gd in g.groupby("defense", sort=False)}
    names = [d for d in cost.index if worst.get(d) is not None and cost[d] > 0]
    if not names:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for d in names:
        ax.scatter(cost[d], 100 * worst[d].acc, s=30)
        ax.annotate(d, (cost[d], 100 * worst[d].acc), textcoords="offset points", xytext=(4, 3), fontsize=8)
    low, high = min(cost[d] for d in names), max(cost[d] for d in names)
    if high / low > 20:  # a log axis with ticks at 1, 2 and 5 of every decade, written as plain numbers
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel(f"evaluation seconds per 1000 images ({len(common)} attacks every row has)")
    ax.set_ylabel("Worst (%)")
    ax.grid(alpha=0.3)
    first = g.iloc[0]
    paths = _save(fig, stem, f"Evaluation cost against robustness, {first['dataset']}, target {first['target']}: "
                             "x, the wall time of the attacks every row faced, per 1000 images; y, the row's Worst "
                             "as in the results table (per-sample worst case over its input-space attacks).")
    plt.close(fig)
    return paths


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # TrueType (42) fonts embedded in PDF/PS, not matplotlib's default Type 3 (rejected by IEEE/ACM checks)
    matplotlib.rcParams.update({"pdf.fonttype": 42, "ps.fonttype": 42})
    return plt


def _finish_lines(plt, fig, ax, xlabel: str, stem: Path, caption: str) -> list[Path]:
    """Common look of the accuracy-curve figures; saves PNG and PDF."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths = _save(fig, stem, caption)
    plt.close(fig)
    return paths


def noise_discard_figure(records: list[CellRecord], stem: Path) -> list[Path]:
    """Figure 2: robust accuracy vs the fraction of adversarial noise discarded, one line per
    (target, base attack)."""
    rows = [(r.cell.target, r.attack_params.get("base"), r.attack_params.get("fraction"), r.accuracy)
            for r in map(as_record, records) if r.attack == "noise-discard"]
    if not rows:
        return []
    plt = _plt()
    df = pd.DataFrame(rows, columns=["target", "base", "fraction", "accuracy"]).sort_values("fraction")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for (target, base), g in df.groupby(["target", "base"]):
        ax.plot(100 * g["fraction"], 100 * g["accuracy"], marker="o", label=f"{target}, {base}")
    return _finish_lines(plt, fig, ax, "noise discarded (% of pixels)", stem,
                         "Robust accuracy against the share of the adversarial noise discarded before the "
                         "classifier (the seed paper's Figure 2 probe), one line per target and base attack.")


def alpha_figure(records: list[CellRecord], stem: Path) -> list[Path]:
    """Figure 6a: natural and robust (PGD) accuracy of DIR rows against their alpha."""
    rows = []
    for r in map(as_record, records):
        if r.defense != "dir" or r.attack not in ("clean", "pgd"):
            continue
        alpha = (r.defense_train or {}).get("alpha", DIR_ALPHA)
        rows.append((float(alpha), r.attack, r.accuracy))
    df = pd.DataFrame(rows, columns=["alpha", "attack", "accuracy"])
    if df.empty or df["alpha"].nunique() < 2:
        return []
    plt = _plt()
    df = df.groupby(["alpha", "attack"], as_index=False)["accuracy"].mean().sort_values("alpha")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for attack, label in (("clean", "natural"), ("pgd", "PGD")):
        g = df[df["attack"] == attack]
        ax.plot(g["alpha"], 100 * g["accuracy"], marker="o", label=label)
    return _finish_lines(plt, fig, ax, "alpha (weight of L_rep)", stem,
                         "Natural and PGD accuracy of the DIR rows against alpha, the weight of the "
                         "representation loss (the seed paper's Figure 6a); rows with the same alpha averaged.")


def worst_bars_figure(df: pd.DataFrame, stem: Path) -> list[Path]:
    """Figure 6b style, on the honest number: each row's per-sample worst case over its input-space
    attacks (95% Wilson interval), the target alone as a dashed line (first dataset and target)."""
    if df.empty:
        return []
    (ds, target), g = next(iter(df.groupby(["dataset", "target"], sort=False)))
    worst = {d: input_space_worst(gd) for d, gd in g.groupby("defense", sort=False)}
    worst = {d: w for d, w in worst.items() if w is not None}
    if not worst:
        return []
    registered = dict(zip(g["defense"], g["defense_registered"]))
    rows = [d for d in worst if registered[d] != "none"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(rows) + 2), 3.4))
    acc = [100 * worst[d].acc for d in rows]
    ax.bar(range(len(rows)), acc, yerr=[[a - 100 * worst[d].lo for a, d in zip(acc, rows)],
                                        [100 * worst[d].hi - a for a, d in zip(acc, rows)]],
           color="#55a868", capsize=3)
    none = [d for d in worst if registered[d] == "none"]
    if none:
        ax.axhline(100 * worst[none[0]].acc, color="k", ls="--", lw=1, label="none (target alone)")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(rows)), rows, rotation=45, ha="right")
    ax.set_ylabel("worst-case accuracy (%)")
    ax.set_title(f"{ds}, target: {target}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    first = g.iloc[0]
    paths = _save(fig, stem, f"Bars: per-sample worst case over each row's input-space attacks (a stochastic row's "
                             f"image counts only if correct under every scoring draw), n = "
                             f"{max(w.n for w in worst.values())}, {first['norm']} eps = {float(first['eps']):.4f}; "
                             "error bars: 95% Wilson interval; dashed: the target alone. Rows that ran different "
                             "attacks are worst cases over different sets (the results table lists them).")
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------- HTML
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1400px;margin:0 auto;padding:0 1em 3em;
     line-height:1.45;color:#222}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:.5em 0;font-size:90%;z-index:1;
    white-space:nowrap;overflow-x:auto}
nav a{margin-right:1em;text-decoration:none}
.wide{overflow-x:auto;max-width:100%;margin:1em 0}
#how-to-read-this + ul{background:#f4f7fb;border:1px solid #d5dde8;border-radius:4px;padding:.6em 1em .6em 2.2em}
.wide table{margin:0}
.wide td:first-child,.wide th:first-child{position:sticky;left:0;background:#fff;white-space:nowrap}
.wide th:first-child{background:#f3f3f3}
table{border-collapse:collapse;margin:1em 0;font-variant-numeric:tabular-nums}
td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
.wide table{font-size:92%}
main > p,main > ul,main > ol,h1,h2,h3,h4{max-width:1100px}
th{background:#f3f3f3}
.ci{display:block;font-size:75%;color:#666;white-space:nowrap}
table + p{font-size:88%;color:#444}
figure{margin:1.5em 0}
figure img{max-width:100%}
figcaption{font-size:90%;color:#444}
code{background:#f6f6f6;padding:0 .2em}
</style></head>
<body>
{% if nav %}<nav>{% for id, text in nav %}<a href="#{{ id }}">{{ text }}</a>{% endfor %}</nav>{% endif %}
<main>
{{ body }}
</main>
</body></html>
"""


NAV_LABELS = {"How to read this": "Reading", "The seed paper's tables": "Paper tables",
              "Adaptive evaluation": "Adaptive", "Against the seed paper": "vs paper", "Left out": "Left out"}


def nav_label(heading: str) -> str:
    """A short label for the navigation bar: "Table 1: defenses in ..." -> "Table 1"."""
    if heading in NAV_LABELS:
        return NAV_LABELS[heading]
    head = heading.split(":")[0].strip()
    words = head.split()
    return " ".join(words[:3]) if len(words) > 3 else head


def markdown_to_html(md: str, title: str) -> str:
    """A report page's Markdown as a self-contained HTML page: markdown-it-py (CommonMark with
    tables) renders it and a jinja2 template adds the style and a navigation bar over the page's
    sections. Links to ``.md`` files point to their ``.html`` renderings; a line that is an image
    becomes a figure with its caption; a table cell's trailing interval sits under its value."""
    import re

    import jinja2
    from markdown_it import MarkdownIt
    from markupsafe import Markup

    parser = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = parser.parse(md)
    nav, seen = [], set()
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open":
            text = tokens[i + 1].content
            base = slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
            k = 0
            while slug in seen:  # a repeated heading: "results-1", "results-2", ...
                k += 1
                slug = f"{base}-{k}"
            seen.add(slug)
            tok.attrSet("id", slug)
            if tok.tag == "h2":
                nav.append((slug, nav_label(re.sub(r"[*`]", "", text))))
        for child in tok.children or []:
            href = child.attrGet("href") if child.type == "link_open" else None
            if href and re.fullmatch(r"[^:#?]+\.md(#.*)?", href):  # a relative link to a page we render
                child.attrSet("href", re.sub(r"\.md(?=#|$)", ".html", href))
    body = parser.renderer.render(tokens, parser.options, {})
    # a table wider than the window scrolls on its own, never cut off
    body = body.replace("<table>", '<div class="wide"><table>').replace("</table>", "</table></div>")
    # a paragraph that is an image (and its PDF link): a figure with a caption
    body = re.sub(r'<p><img src="([^"]+)" alt="([^"]*)" />(.*?)</p>',
                  r'<figure><img src="\1" alt="\2" loading="lazy"><figcaption>\2\3</figcaption></figure>', body)
    # "75.00 [63.2, 84.0]" ending a cell: the interval on its own small line
    body = re.sub(r"(\d(?:</strong>)?\u2020?) \[([-+\d.]+, [-+\d.]+)\](</strong>)?</td>",
                  r'\1\3<span class="ci">[\2]</span></td>', body)
    page = jinja2.Environment(autoescape=True).from_string(_PAGE)
    return page.render(title=title, nav=nav, body=Markup(body))


# ----------------------------------------------------------------------------- the report
SMOKE_NOTE = ("A smoke run shows that every path runs and how the rows order, not the science. Its numbers "
              "are reproducible on one machine, not across CPUs: AVX-512 and AVX2 kernels add in different orders "
              "and short trainings amplify that (measured between two machines: a median difference of 1.6 points "
              "per cell, one image of 64; 90% of cells within 6.3 points). Compare rows within one run.")


def autoattack_members_markdown(records: list) -> str:
    """AutoAttack's robust accuracy after each member, per cell, as AutoAttack's own log reports it (a
    deterministic row: pyautoattack's count; a random row: correct under every scoring draw of every
    image so far), beside the cell's accuracy; "" when no cell has them."""
    from attacks.autoattack import ROBUST_AFTER

    rows, members = [], []
    for r in map(as_record, records):
        after = {k.removeprefix(ROBUST_AFTER): v for k, v in (r.attack_info or {}).items()
                 if k.startswith(ROBUST_AFTER)}
        if not after:
            continue
        members += [m for m in after if m not in members]
        rows.append((r, after))
    if not rows:
        return ""
    head = ["Dataset", "Target", "Defense", "Column", "n", *(("clean" if m == "clean" else f"after {m.upper()}")
                                                               for m in members), "cell"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    for r, after in rows:
        out.append(f"| {r.cell.dataset} | {r.cell.target} | {r.cell.defense} | {r.column} | {r.n} | "
                   + " | ".join(f"{100 * after[m] / r.n:.2f}" if m in after else "-" for m in members)
                   + f" | {100 * r.accuracy:.2f} |")
    return "\n".join(out) + ("\n\nRobust accuracy (%) after each AutoAttack member in turn, as AutoAttack's own "
                             "log reports it (a random row: correct under every scoring draw of every image so "
                             "far); `cell` is the cell's accuracy, scored again from the returned images.\n")


PROFILES = {
    "smoke": SMOKE_NOTE,
    "quick": "A quick run: the paper's rows and attacks with short training on one GPU; it says how the rows "
             "order at that budget, not the paper's numbers.",
    "paper": "A paper run: the seed paper's settings (the footers name each departure).",
}


def how_to_read(df: pd.DataFrame, blocks: list[dict], profile: str | None, checks: dict,
                presets: bool = True) -> list[str]:
    """The box at the top of a report: the profile, which column is the headline, how random rows are
    scored here and in the presets (with this run's own example), what the Checks column says, and where
    the definitions every table's footer would otherwise repeat are."""
    from benchmark.tables import INPUT_SPACE

    out = ["## How to read this", ""]
    if profile in PROFILES:
        out.append(f"- **Profile: {profile}.** {PROFILES[profile]}")
    out.append("- **The headline** is `Worst` in Results: per row, the per-sample worst case over every "
               "input-space attack it faced. Where rows faced different attacks, compare `Worst (shared)`.")
    many = df[(df["draws"] > 1) & (df["space"] == INPUT_SPACE) & (df["attack_registered"] != "clean")]
    if len(many):
        rows = ", ".join(dict.fromkeys(many["defense"]))
        shown = many[many["attack_registered"].isin(("pgd", "autoattack", "mi-fgsm", "vni-fgsm", "bpda-eot"))]
        pool = shown if len(shown) else many  # a cell the paper's tables show too, where the two differ most
        r = pool.loc[(pool["mean_accuracy"] - pool["accuracy"]).idxmax()]
        draws = ", ".join(map(str, sorted({int(v) for v in many["draws"]})))
        where = "the seed paper's tables below give" if presets else "the seed paper's table layouts (`--preset`) give"
        out.append(f"- **Random defenses** ({rows}) are scored under R = {draws} draws of their "
                   "randomness per adversarial image. Results and `Worst` count an image only if every draw "
                   f"classifies it correctly; {where} the mean over draws, as the paper "
                   f"measured, so the same cell reads higher there (here: {r['defense']} under {r['column']}, "
                   f"{100 * r['accuracy']:.2f} in Results, {100 * r['mean_accuracy']:.2f} as a mean over draws). "
                   "Every score of every such cell: [draws](../tables/draws.md).")
    if checks:
        n = sorted({c.results.n for c in checks.values()})
        on = f" on the first {', '.join(map(str, n))} images" if n else ""
        out.append(f"- **Checks** runs the gradient-masking checks per row{on}: `no flag (n=...)` means none of "
                   "them raised a flag on those images, not that the row is robust; a flag names what failed. "
                   "Figures: [checks](../tables/checks.md).")
        tested = [c.results.active for c in checks.values() if c.results.active is not None]
        if tested:
            out.append("- **The binarization test** (flag `active`) gives each row's attack a problem on the row's "
                       "own features where an adversarial example exists by construction: an attack that misses "
                       "it significantly often is too weak for that defense, and the row's numbers overstate its "
                       "robustness (the section after Results).")
    out.append("- **Every adversarial input** of every cell was verified inside the threat ball (L-inf distance "
               "to its clean image at most eps) and inside [0, 1] before it was scored; accuracies are "
               "recomputed from those images.")
    out.append("- **Terms** every table uses (Worst, bold, the Checks flags, each row's caveats): "
               "[Definitions](#definitions), at the end.")
    return out + [""]


def merged_lines(manifest: dict) -> list[str]:
    """What a merged folder was made of (``report RUN... --out``): its runs (a config's parts by name),
    and the parts of a config that were not merged."""
    runs = manifest.get("merged_from")
    if not runs:
        return []
    names = [f"{Path(r['run']).name}" + (f" (part {r['part']['part']} of {r['part']['config']})" if r.get("part") else "")
             for r in runs]
    lines = [f"- merged from {len(runs)} runs: {', '.join(names)}"]
    lines += [f"- **missing parts** (their rows are not in these tables): {m}" for m in manifest.get("missing_parts", [])]
    return lines


def _index_lines(run_dir: Path, records: list[dict], preset: str, presets: list, preset_files: dict,
                 parts: dict[str, str], figures: list[Path], preset_texts: dict | None = None) -> list[str]:
    """The report index (Markdown lines): what ran, the result blocks, the presets, the adaptive
    evaluation and the comparison with the seed paper (where ``parts`` holds them), the figures."""
    everything, paper = "adaptive.md" in parts, "paper_comparison.md" in parts
    manifest = {}
    if (run_dir / "manifest.json").is_file():
        manifest = json.loads((run_dir / "manifest.json").read_text())
    versions = manifest.get("versions", {})
    checks = load_checks(run_dir)
    frame = records_frame(records)
    blocks = build_blocks(frame, checks or None)
    index = [f"# Report: {manifest.get('config', {}).get('name', run_dir.name)}", "",
             f"- profile: {manifest.get('profile')}; device: {manifest.get('device')} "
             f"({versions.get('device_name', '-')}); git commit: {versions.get('git_commit')}; "
             f"torch {versions.get('torch')}; config hash {manifest.get('config_hash')}",
             f"- {len(records)} cells; report preset: {preset}", *merged_lines(manifest), "",
             left_out_markdown(left_out(records, checks)),
             *how_to_read(frame, blocks, manifest.get("profile"), checks, presets=bool(preset_files)),
             "## Results", "", "Accuracy (%) with its 95% Wilson interval.", "",
             to_markdown(blocks, intervals=True, defined=False),
             "Tables: [markdown](../tables/results.md), [with 95% intervals](../tables/results_ci.md), "
             "[LaTeX](../tables/results.tex) ([with intervals](../tables/results_ci.tex)), [CSV](../tables/results.csv); "
             "[gradient-masking checks](../tables/checks.md); [scores per draw](../tables/draws.md)", ""]
    active = active_markdown(checks) if checks else ""
    if active:
        index += ["### Does the attack find what exists? The binarization test", "", active]
    members = autoattack_members_markdown(records)
    if members:
        index += ["### AutoAttack, member by member", "", members]
    if preset_files:
        index += ["## The seed paper's tables", ""]
        for name, paths in preset_files.items():
            links = ", ".join(f"[{p.suffix[1:] if not p.stem.endswith('_ci') else 'with 95% intervals'}]"
                              f"(presets/{p.name})" for p in paths)
            index.append(f"- {name}: {links}")
        index.append("")
        for name, paths in preset_files.items():
            index.append((preset_texts or {}).get(name) or paths[0].read_text())
    elif presets:
        index += ["## The seed paper's tables", "",
                  "No record of this run fits a preset (" + ", ".join(p.name for p in presets) + ").", ""]
    if everything:
        index += ["## Adaptive evaluation", "", parts["adaptive.md"]]
    if "ablation.md" in parts:
        index += ["## DIR as released: what the denoiser adds", "", parts["ablation.md"]]
    if paper:
        index += ["## Against the seed paper", "", parts["paper_comparison.md"]]
    if everything:
        index += ["## Cost", "", "[timing table](timing.md), [CSV](timing.csv)", ""]
    pngs = [f for f in figures if f.suffix == ".png"]
    if pngs:
        index += ["## Figures", ""]
    for f in pngs:  # each under its own heading, its caption (what it plots) under the image
        caption = caption_of(f) or FIGURE_TITLES.get(f.stem, f.stem)
        other = ", ".join(f"[{kind}](figures/{f.stem}{ext})" for kind, ext in (("PDF", ".pdf"), ("LaTeX", ".tex"))
                          if f.with_suffix(ext).is_file())
        index += [f"### {FIGURE_TITLES.get(f.stem, f.stem)}", "",
                  f"![{caption}](figures/{f.name})" + (f" ({other})" if other else ""), ""]
    return index + ["## Definitions", "", *definitions(blocks), ""]


FIGURE_TITLES = {
    "timing": "Evaluation cost per row, by attack",
    "cost_robustness": "Evaluation cost against robust accuracy",
    "robust_worst": "Worst-case robust accuracy per row",
    "noise_discard": "Noise discard (the seed paper's Figure 2)",
    "alpha": "The weight of the representation loss (the seed paper's Figure 6b)",
    "umap_restored": "Restored representations under white-box PGD (UMAP, the seed paper's Figure 5)",
}


def write_report(run_dir: Path, preset: str = "all", include_stale: bool = False) -> list[Path]:
    """Write ``<run>/report/``: the result tables, the seed paper's table presets
    (``report/presets/``), the paper comparison and figures, and with ``preset="all"`` also the
    adaptive table, the timing report and the cost figures; ``index.md`` / ``index.html`` link them.
    ``preset`` is ``all``, ``paper`` or a comma list of preset names (then only those tables).
    Stale and corrupt records are left out (stale ones kept with ``include_stale``) and named at the
    top of the index."""
    from benchmark.presets import resolve_presets, write_presets

    run_dir = Path(run_dir)
    presets = resolve_presets(preset)  # bad names fail before anything is written
    everything, paper = preset == "all", preset in ("all", "paper")
    records = load_records(run_dir, include_stale=include_stale)
    if not records:
        return []
    out = run_dir / "report"
    df = _frame(records)
    written = list(write_tables(run_dir, include_stale=include_stale))
    reference = reference_numbers()
    preset_files = write_presets(df, out / "presets", presets, reference)
    for paths in preset_files.values():
        written += paths
    adaptive = adaptive_table(df)
    comparison = paper_comparison(df, reference)
    cells, training = timing_table(df), training_table(df)
    parts = {"paper_comparison.md": comparison_markdown(comparison)} if paper else {}
    if everything:
        parts |= {"adaptive.md": adaptive_markdown(adaptive), "timing.md": timing_markdown(cells, training)}
        ablation_rows, ablation_diffs = ablation_table(df)
        if len(ablation_rows):
            parts["ablation.md"] = ablation_markdown(ablation_rows, ablation_diffs)
    for name, text in parts.items():
        written.append(atomic_write_text(out / name, text))
    if everything:
        written.append(atomic_write_text(out / "timing.csv", cells.to_csv(index=False)))
    if paper and len(comparison):
        written.append(atomic_write_text(out / "paper_comparison.csv", comparison.to_csv(index=False)))
    figures: list[Path] = []
    if everything:
        figures += timing_figure(cells, out / "figures" / "timing")
        figures += cost_robustness_figure(df, out / "figures" / "cost_robustness")
        figures += worst_bars_figure(df, out / "figures" / "robust_worst")
    if paper:
        figures += noise_discard_figure(records, out / "figures" / "noise_discard")
        figures += alpha_figure(records, out / "figures" / "alpha")
    written += figures
    umap_png = out / "figures" / "umap_restored.png"
    if paper and umap_png.is_file():  # made by `run_benchmark.py umap RUN_DIR` (needs the models, not only records)
        figures.append(umap_png)
    from benchmark.presets import PRESETS, preset_blocks, preset_markdown

    preset_texts = {name: preset_markdown(PRESETS[name], preset_blocks(df, PRESETS[name], reference), defined=False)
                    for name in preset_files}
    index = _index_lines(run_dir, records, preset, presets, preset_files, parts, figures, preset_texts)
    index.append("")
    written.append(atomic_write_text(out / "index.md", "\n".join(index)))
    html_text = markdown_to_html("\n".join(index), f"Report: {run_dir.name}")
    written.append(atomic_write_text(out / "index.html", html_text))
    for page in [p for p in written if p.suffix == ".md" and p.name != "index.md"]:  # what the index links to
        written.append(atomic_write_text(page.with_suffix(".html"), markdown_to_html(
            page.read_text(encoding="utf-8"), f"{run_dir.name}: {page.stem}")))
    return written
