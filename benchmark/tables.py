"""Tables from result records: rows = defenses, columns = Natural + attacks + Worst.

Pure functions from records (a pandas DataFrame) to Markdown, LaTeX (booktabs,
best per column in bold) and CSV (with the Wilson 95% intervals). ``Worst`` is
the per-sample worst case over every attack of the row (a sample counts only if
it survived all of them), computed from the per-sample flags, not from the
column minima.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmark.io import atomic_write_text
from benchmark.masking import LEGEND, checks_markdown, flag_text, load_checks
from benchmark.records import load_records
from benchmark.stats import wilson_interval

NATURAL = "clean"


def records_frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        cell = r["cell"]
        rows.append({
            "dataset": cell["dataset"], "target": cell["target"], "defense": cell["defense"],
            "attack": cell["attack"], "column": r.get("attack_label", cell["attack"]),
            "attack_registered": r.get("attack_registered", cell["attack"]),
            "defense_registered": r.get("defense_registered", cell["defense"]),
            "n": r["n"], "n_correct": r["n_correct"], "accuracy": r["accuracy"],
            "ci_low": r["ci95"][0], "ci_high": r["ci95"][1], "correct": r["correct"],
            "copy": r.get("dataset_copy"), "profile": r.get("profile"), "eps": r["threat"]["eps"],
            "norm": r["threat"]["norm"], "seconds": r.get("seconds"),
            "images_per_second": r.get("images_per_second"), "forwards": r.get("forwards"),
            "backwards": r.get("backwards"), "peak_gpu_memory_mb": r.get("peak_gpu_memory_mb"),
            "target_arch": r.get("target", {}).get("arch"), "target_method": r.get("target", {}).get("method"),
            "grad_masked": bool((r.get("gradient_check") or {}).get("masked", False)),
        })
    return pd.DataFrame(rows)


def worst_case(bits: list[str]) -> tuple[int, int]:
    """(n_correct, n) of the per-sample AND over several '0'/'1' strings of equal length."""
    n = len(bits[0])
    if any(len(b) != n for b in bits):
        raise ValueError("cells of one row disagree on n; the worst case needs the same samples")
    ints = [int(b, 2) for b in bits]
    acc = ints[0]
    for v in ints[1:]:
        acc &= v
    return bin(acc).count("1"), n


def build_blocks(df: pd.DataFrame, checks: dict | None = None) -> list[dict]:
    """One block per (dataset, target): a table of accuracy cells with intervals. With ``checks``
    (:func:`benchmark.masking.load_checks`), each row also gets its gradient-masking flags."""
    blocks = []
    for (dataset, target), g in df.groupby(["dataset", "target"], sort=False):
        columns = list(dict.fromkeys(g["column"]))
        nat = g.loc[g["attack_registered"] == NATURAL, "column"]
        if len(nat):  # Natural first
            columns.remove(nat.iloc[0])
            columns.insert(0, nat.iloc[0])
        rows = []
        for defense, gd in g.groupby("defense", sort=False):
            cells = {}
            for _, r in gd.iterrows():
                cells[r["column"]] = (r["accuracy"], r["ci_low"], r["ci_high"], r["n"])
            adversarial = gd[gd["attack_registered"] != NATURAL]
            if len(gd) > 1 and len(adversarial):
                k, n = worst_case(list(gd["correct"]))
                lo, hi = wilson_interval(k, n)
                cells["Worst"] = (k / n, lo, hi, n)
            row = {"defense": defense, "cells": cells}
            if checks is not None:
                masked = bool(gd["grad_masked"].any()) if "grad_masked" in gd else False
                row["checks"] = flag_text(checks.get((dataset, target, defense)), masked)
            rows.append(row)
        if any("Worst" in r["cells"] for r in rows):
            columns.append("Worst")
        first = g.iloc[0]
        blocks.append({
            "dataset": dataset, "target": target, "columns": columns, "rows": rows,
            "footer": {
                "copy": first["copy"], "profile": first["profile"], "n": sorted(set(int(v) for v in g["n"])),
                "target": f"{target} ({first['target_arch']}, {first['target_method']})",
                "eps": float(first["eps"]), "norm": first["norm"],
                "notes": component_notes(g) + subset_notes(g) + ([LEGEND] if checks is not None else []),
            },
        })
    return blocks


def _best(block: dict) -> dict[str, float]:
    best = {}
    for col in block["columns"]:
        vals = [r["cells"][col][0] for r in block["rows"] if col in r["cells"]]
        if vals:
            best[col] = max(vals)
    return best


def component_notes(g: pd.DataFrame) -> list[str]:
    """Caveats that registered components declare (``note``), e.g. a reconstructed defense."""
    from benchmark.registry import ATTACKS, DEFENSES

    notes = []
    for registry, col, label in ((DEFENSES, "defense_registered", "defense"), (ATTACKS, "attack_registered", "attack")):
        for name in dict.fromkeys(g[col]):
            try:
                note = getattr(registry.get(name), "note", None)
            except Exception:  # a component no longer installed: no note, the table still builds
                note = None
            if note:
                rows = sorted(set(g[g[col] == name]["defense" if label == "defense" else "column"]))
                notes.append(f"{', '.join(rows)}: {note}.")
    return notes


def subset_notes(g: pd.DataFrame) -> list[str]:
    """Rows evaluated on fewer examples than the others (a defense's ``eval_n``) are named."""
    full = int(g["n"].max())
    small = {d: int(gd["n"].max()) for d, gd in g.groupby("defense", sort=False) if int(gd["n"].max()) < full}
    if not small:
        return []
    rows = ", ".join(f"{d} (n = {n})" for d, n in small.items())
    return [f"Evaluated on the first examples of the same subset only: {rows}; their intervals are wider."]


def footer_text(block: dict) -> str:
    f = block["footer"]
    eps = f["eps"]
    eps_str = f"{eps * 255:.0f}/255" if abs(eps * 255 - round(eps * 255)) < 1e-6 else f"{eps:.4f}"
    n = ", ".join(map(str, f["n"]))
    return (f"Data: {f['copy']}. Profile: {f['profile']}. n = {n} evaluation examples. Target: {f['target']}. "
            f"Threat: {f['norm']} eps = {eps_str}. Accuracy in %; 95% Wilson intervals in results_ci.md and "
            "results.csv; Worst = per-sample worst case over the row's attacks."
            + "".join(" " + n for n in f.get("notes", [])))


def is_best(block: dict, best: dict[str, float], col: str, acc: float) -> bool:
    """Bold only where there is something to compare with."""
    return len(block["rows"]) > 1 and col in best and acc == best[col]


def markdown_block(block: dict, cell, footer: str) -> list[str]:
    """One block as a Markdown table: ``cell(row, column)`` gives each cell's text."""
    flags = any("checks" in r for r in block["rows"])
    out = [f"### {block['dataset']} / target {block['target']}\n",
           "| Defense | " + " | ".join(block["columns"]) + (" | Checks" if flags else "") + " |",
           "|---|" + "---:|" * len(block["columns"]) + ("---|" if flags else "")]
    for r in block["rows"]:
        out.append(f"| {r['defense']} | " + " | ".join(cell(r, c) for c in block["columns"])
                   + (f" | {r.get('checks', 'n/a')}" if flags else "") + " |")
    return out + ["", footer, ""]


def latex_block(block: dict, cell, caption: str) -> list[str]:
    """One block as a booktabs table: ``cell(row, column)`` gives each cell's LaTeX."""
    cols = block["columns"]
    flags = any("checks" in r for r in block["rows"])
    out = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "r" * len(cols) + ("l" if flags else "") + "}",
           r"\toprule",
           "Defense & " + " & ".join(_tex_escape(c) for c in cols) + (" & Checks" if flags else "") + r" \\",
           r"\midrule"]
    for r in block["rows"]:
        out.append(_tex_escape(r["defense"]) + " & " + " & ".join(cell(r, c) for c in cols)
                   + (" & " + _tex_escape(r.get("checks", "n/a")) if flags else "") + r" \\")
    return out + [r"\bottomrule", r"\end{tabular}", r"\caption{" + _tex_escape(caption) + "}", r"\end{table}", ""]


def to_markdown(blocks: list[dict], intervals: bool = False) -> str:
    out = []
    for b in blocks:
        best = _best(b)

        def cell(r, col, b=b, best=best):
            if col not in r["cells"]:
                return "-"
            acc, lo, hi, _ = r["cells"][col]
            text = f"{100 * acc:.2f}" + (f" [{100 * lo:.1f}, {100 * hi:.1f}]" if intervals else "")
            return f"**{text}**" if is_best(b, best, col, acc) else text

        out += markdown_block(b, cell, footer_text(b))
    return "\n".join(out)


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        s = s.replace(a, b)
    return s


def to_latex(blocks: list[dict]) -> str:
    out = []
    for b in blocks:
        best = _best(b)

        def cell(r, col, b=b, best=best):
            if col not in r["cells"]:
                return "--"
            acc = r["cells"][col][0]
            text = f"{100 * acc:.2f}"
            return rf"\textbf{{{text}}}" if is_best(b, best, col, acc) else text

        out += latex_block(b, cell, f"{b['dataset']}, target {b['target']}. " + footer_text(b))
    return "\n".join(out)


def to_csv_frame(blocks: list[dict]) -> pd.DataFrame:
    rows = []
    for b in blocks:
        for r in b["rows"]:
            for col in b["columns"]:
                if col in r["cells"]:
                    acc, lo, hi, n = r["cells"][col]
                    rows.append({"dataset": b["dataset"], "target": b["target"], "defense": r["defense"],
                                 "column": col, "accuracy": acc, "ci_low": lo, "ci_high": hi, "n": n,
                                 "copy": b["footer"]["copy"], "profile": b["footer"]["profile"],
                                 "eps": b["footer"]["eps"]})
    return pd.DataFrame(rows)


def write_tables(run_dir: Path) -> list[Path]:
    """Write ``<run>/tables/results.{md,tex,csv}`` from the run's records; return the paths."""
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    if not records:
        return []
    checks = load_checks(run_dir)
    blocks = build_blocks(records_frame(records), checks if checks else None)
    tdir = run_dir / "tables"
    paths = [
        atomic_write_text(tdir / "results.md", to_markdown(blocks)),
        atomic_write_text(tdir / "results_ci.md", to_markdown(blocks, intervals=True)),
        atomic_write_text(tdir / "results.tex", to_latex(blocks)),
        atomic_write_text(tdir / "results.csv", to_csv_frame(blocks).to_csv(index=False)),
    ]
    if checks:
        paths.append(atomic_write_text(tdir / "checks.md", checks_markdown(checks)))
    return paths
