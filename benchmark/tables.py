"""Tables from result records: rows = defenses, columns = Natural + attacks + Worst.

Pure functions from records (a pandas DataFrame) to Markdown, LaTeX (booktabs)
and CSV (with the Wilson 95% intervals). Each (dataset, target) gets a headline
block of the attacks in the input threat space (perturbation inside the eps ball
around the clean image, scored by the whole defended model) with ``Worst``, the
per-sample worst case over those attacks (a sample counts only if it survived all
of them), computed from the per-sample flags, not from the column minima; and,
when the run has any, a separate diagnostics block for attacks that perturb or
score something else (DIR's representation attack, the noise-discard probe).
A stochastic defense's cells show "correct under all R scoring draws".
A column's best value is bold only when it is significantly better than every other
row on the same samples (5%, two-sided: the exact McNemar test on correct/incorrect,
the Wilcoxon signed-rank test on per-sample means over draws), ranked by the same
score the test compares. When the rows of a table faced different attack sets (an
attack run on some rows only), ``Worst`` is not comparable across rows: the table
adds ``Worst (shared)`` over the attacks every row faced, marks the rows whose own
Worst rests on fewer attacks, and bolds only the shared one. Every footer value (data
copy, profile, threat, scoring draws) is read from all the table's records; a mix is
refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from attacks.base import INPUT_SPACE
from benchmark.errors import BenchError
from benchmark.io import atomic_write_text
from benchmark.masking import LEGEND, RowKey, checks_markdown, flag_text, load_checks
from benchmark.records import OLD_SCHEMAS, CellRecord, as_record, load_records
from benchmark.stats import paired_p, wilson_interval

log = logging.getLogger("purifybench")

NATURAL = "clean"
DIAGNOSTIC_SCORING = "scoring"  # the space of a cell's other scoring (e.g. mask-adaptive with its fixed masks)
WORST = "Worst"
SHARED = "Worst (shared)"
ALPHA = 0.05  # significance level of the bold
FEWER = "\u2020"  # marks a Worst over fewer attacks than another row's


class TableCell(NamedTuple):
    acc: float
    lo: float
    hi: float
    n: int
    paper: float | None = None  # the seed paper's number (presets)
    bits: str | None = None  # per-sample correctness behind the cell ('0'/'1')
    scores: tuple | None = None  # per-sample values whose mean is ``acc``, what the bold's paired test compares
    mark: str = ""  # shown after the value (FEWER)

    def tested(self) -> tuple | None:
        """The per-sample values the paired tests compare: ``scores``, else the bits."""
        if self.scores is not None:
            return self.scores
        return tuple(int(b) for b in self.bits) if self.bits is not None else None


def threat_space(record: CellRecord) -> str:
    """The record's threat space; records written before it was stored take the registry's."""
    if record.threat_space:
        return record.threat_space
    from benchmark.registry import ATTACKS

    try:
        return ATTACKS.get(record.attack).threat_space
    except Exception:  # an attack no longer installed: counted in the input space, as it was run
        return INPUT_SPACE


def random_score(record: CellRecord) -> bool:
    """Whether the cell's scoring drew randomness; for records from before it was stored: a
    stochastic defense's, unless the attack held its masks fixed."""
    if record.random_score is not None:
        return record.random_score
    return bool(record.defense_declarations.get("stochastic", False)) and record.attack != "mask-adaptive"


def records_frame(records: list[CellRecord | dict]) -> pd.DataFrame:
    rows = []
    for i, r in enumerate(map(as_record, records)):
        mean = r.scores["mean"]
        rows.append({
            "record": i,  # the record a row comes from (a record's diagnostic scorings add rows)
            "dataset": r.cell.dataset, "target": r.cell.target, "defense": r.cell.defense,
            "attack": r.cell.attack, "column": r.column, "attack_registered": r.attack,
            "defense_registered": r.defense, "space": threat_space(r), "draws": r.draws,
            "old_schema": r.old_schema, "stochastic": bool(r.defense_declarations.get("stochastic", False)),
            "random_score": random_score(r),
            "n": r.n, "n_correct": r.n_correct, "accuracy": r.accuracy,
            "ci_low": r.ci95[0], "ci_high": r.ci95[1], "correct": r.correct,
            "mean_accuracy": mean.accuracy, "mean_low": mean.ci95[0], "mean_high": mean.ci95[1],
            "single": r.single_draw_bits(), "per_sample_mean": tuple(c / r.draws for c in r.draw_counts()),
            "copy": r.dataset_copy, "profile": r.profile, "eps": r.threat["eps"],
            "norm": r.threat["norm"], "seconds": r.seconds,
            "images_per_second": r.images_per_second, "forwards": r.forwards,
            "backwards": r.backwards, "peak_gpu_memory_mb": r.peak_gpu_memory_mb,
            "target_arch": r.target.get("arch"), "target_method": r.target.get("method"),
            "grad_masked": r.gradient_check is not None and r.gradient_check.masked,
            "scoring": None,
        })
        for name, d in (r.diagnostic_scores or {}).items():  # another scoring of the cell's images: a diagnostic
            bits = d["correct"]
            rows.append(dict(rows[-1], column=f"{r.column} ({name})", space=DIAGNOSTIC_SCORING, scoring=name,
                             draws=1, random_score=False, n_correct=d["n_correct"], accuracy=d["accuracy"],
                             ci_low=d["ci95"][0], ci_high=d["ci95"][1], correct=bits, mean_accuracy=d["accuracy"],
                             mean_low=d["ci95"][0], mean_high=d["ci95"][1], single=bits,
                             per_sample_mean=tuple(int(b) for b in bits), grad_masked=False))
    return pd.DataFrame(rows)


def worst_case(bits: list[str]) -> tuple[int, int]:
    """(n_correct, n) of the per-sample AND over several '0'/'1' strings of equal length."""
    return and_bits(bits).count("1"), len(bits[0])


def and_bits(bits: list[str]) -> str:
    """The per-sample AND of several '0'/'1' strings of equal length."""
    n = len(bits[0])
    if any(len(b) != n for b in bits):
        raise ValueError("cells of one row disagree on n; the worst case needs the same samples")
    return "".join("1" if all(b[i] == "1" for b in bits) else "0" for i in range(n))


def attack_columns(g: pd.DataFrame) -> set[str]:
    """The input-space adversarial columns of one row's records (Natural excluded)."""
    inputs = g[(g["space"] == INPUT_SPACE) & (g["attack_registered"] != NATURAL)]
    return set(inputs["column"])


def input_space_worst(g: pd.DataFrame, columns: set[str] | None = None) -> TableCell | None:
    """``Worst`` of one row's records: the per-sample AND over its input-space attacks (Natural
    included; only ``columns`` of them when given) of each cell's headline bits (all draws correct,
    for a stochastic defense); None when the row has no input-space adversarial attack."""
    inputs = g[g["space"] == INPUT_SPACE]
    if columns is not None:
        inputs = inputs[(inputs["attack_registered"] == NATURAL) | inputs["column"].isin(columns)]
    if not (inputs["attack_registered"] != NATURAL).any():
        return None
    bits = and_bits(list(inputs["correct"]))
    k, n = bits.count("1"), len(bits)
    lo, hi = wilson_interval(k, n)
    return TableCell(k / n, lo, hi, n, bits=bits)


def _ordered_columns(g: pd.DataFrame) -> list[str]:
    columns = list(dict.fromkeys(g["column"]))
    nat = g.loc[g["attack_registered"] == NATURAL, "column"]
    if len(nat):  # Natural first
        columns.remove(nat.iloc[0])
        columns.insert(0, nat.iloc[0])
    return columns


def consistent(g: pd.DataFrame, where: str) -> dict:
    """The values a table's footer states, read from all its records: one data copy, profile, norm and
    eps, and one R among the rows scored under several draws; a mix is refused (one line)."""
    out = {}
    for key, what in (("copy", "data copies"), ("profile", "profiles"), ("norm", "norms"), ("eps", "eps")):
        values = list(dict.fromkeys(v for v in g[key] if not pd.isna(v)))
        if len(values) > 1:
            raise BenchError(f"{where}: the records mix {what} ({', '.join(map(str, values))}): their numbers "
                             "cannot share a table; rerun the config (records of another plan are left out) or "
                             "report the runs apart")
        out[key] = values[0] if values else None
    draws = sorted(set(int(v) for v in g.loc[g["random_score"] & (g["draws"] > 1), "draws"]))
    if len(draws) > 1:
        raise BenchError(f"{where}: the stochastic rows' records were scored under different numbers of draws "
                         f"({', '.join(map(str, draws))}): rerun them under one eval.draws")
    return out


def build_blocks(df: pd.DataFrame, checks: dict | None = None, value: str = "headline",
                 worst: bool = True) -> list[dict]:
    """Per (dataset, target): a headline block of input-space attacks with ``Worst``, then (if any)
    a diagnostics block (``kind``: "results" / "diagnostics"). With ``checks``
    (:func:`benchmark.masking.load_checks`), each headline row also gets its gradient-masking flags.
    ``value``: "headline" (a stochastic defense's cells: correct under every scoring draw) or
    "mean" (the mean over draws, the expected single-draw accuracy, compared per sample). ``worst``:
    add the Worst columns (the paper presets, which have none, pass False)."""
    blocks = []
    for (dataset, target), g in df.groupby(["dataset", "target"], sort=False):
        first = g.iloc[0]
        same = consistent(g, f"{dataset}/{target}")
        footer = {"copy": same["copy"], "profile": same["profile"], "n": sorted(set(int(v) for v in g["n"])),
                  "target": f"{target} ({first['target_arch']}, {METHODS.get(first['target_method'], first['target_method'])})",
                  "eps": float(same["eps"]), "norm": same["norm"], "value": value}
        for kind, part in (("results", g[g["space"] == INPUT_SPACE]), ("diagnostics", g[g["space"] != INPUT_SPACE])):
            if part.empty:
                continue
            rows = []
            sets = {d: attack_columns(gd) for d, gd in part.groupby("defense", sort=False)}
            shared = set.intersection(*sets.values()) if sets else set()
            union = set.union(*sets.values()) if sets else set()
            uneven = worst and kind == "results" and len(sets) > 1 and shared != union
            for defense, gd in part.groupby("defense", sort=False):
                cells = {}
                for _, r in gd.iterrows():
                    if value == "mean":
                        cells[r["column"]] = TableCell(r["mean_accuracy"], r["mean_low"], r["mean_high"], r["n"],
                                                       bits=r["single"], scores=r["per_sample_mean"])
                    else:
                        cells[r["column"]] = TableCell(r["accuracy"], r["ci_low"], r["ci_high"], r["n"],
                                                       bits=r["correct"])
                if worst and kind == "results" and len(gd) > 1 and (least := input_space_worst(gd)) is not None:
                    fewer = uneven and any(sets[defense] < other for other in sets.values())
                    cells[WORST] = least._replace(mark=FEWER if fewer else "")
                    if uneven and shared and (common := input_space_worst(gd, shared)) is not None:
                        cells[SHARED] = common
                row = {"defense": defense, "cells": cells}
                if checks is not None and kind == "results":
                    masked = bool(gd["grad_masked"].any()) if "grad_masked" in gd else False
                    row["checks"] = flag_text(checks.get(RowKey(dataset, target, defense)), masked)
                rows.append(row)
            columns = _ordered_columns(part)
            if any(WORST in r["cells"] for r in rows):
                columns.append(WORST)
            if any(SHARED in r["cells"] for r in rows):
                columns.append(SHARED)
            components = component_notes(part)
            notes = subset_notes(part)
            if kind == "results":
                notes = draw_notes(part, value) + (worst_notes(sets, shared, union) if uneven else []) + notes
            else:
                notes = diagnostic_notes(part) + notes
            blocks.append({"dataset": dataset, "target": target, "kind": kind, "columns": columns, "rows": rows,
                           "footer": dict(footer, notes=notes, components=components), "uneven": uneven,
                           "checked": checks is not None and kind == "results"})
    return blocks


def worst_notes(sets: dict[str, set], shared: set[str], union: set[str]) -> list[str]:
    """Why a table's rows' Worst values do not compare, and what does."""
    only = {c: sorted(d for d, cols in sets.items() if c in cols) for c in sorted(union - shared)}
    some = "; ".join(f"{c} only on {', '.join(ds)}" for c, ds in only.items())
    fewer = [d for d, cols in sets.items() if any(cols < other for other in sets.values())]
    marked = f" {FEWER} marks a Worst over a strict subset of another row's attacks ({', '.join(fewer)})." if fewer else ""
    return [f"The rows faced different attacks ({some}): each row's Worst is over its own attacks and is not "
            f"compared across rows (no bold).{marked} {SHARED} is the per-sample worst case over the attacks every "
            f"row faced ({', '.join(sorted(shared)) or 'none'}): the one to compare."]


def bold_cells(block: dict) -> set[tuple[str, str]]:
    """(defense, column) of each column's best value, kept only where it is significantly better than
    every other row of the column (a paired test at ``ALPHA`` on the samples both were scored on, of
    the per-sample values the ranking uses). Never in a Worst column whose rows faced different attacks."""
    out = set()
    if len(block["rows"]) < 2:
        return out
    for col in block["columns"]:
        if col == WORST and block.get("uneven"):
            continue
        ranked = sorted(((r["cells"][col], r["defense"]) for r in block["rows"] if col in r["cells"]),
                        key=lambda t: -t[0].acc)
        if len(ranked) < 2 or ranked[0][0].acc == ranked[1][0].acc:
            continue
        (best, name), others = ranked[0], ranked[1:]
        ours = best.tested()
        if ours is None or any(o.tested() is None for o, _ in others):
            continue
        wins = True
        for other, _ in others:
            theirs = other.tested()
            m = min(len(ours), len(theirs))  # a row with eval_n: the same subset's first examples
            if not (sum(ours[:m]) > sum(theirs[:m]) and paired_p(list(ours[:m]), list(theirs[:m])) < ALPHA):
                wins = False
                break
        if wins:
            out.add((name, col))
    return out


BOLD_NOTE = ("Bold: best in its column and better than every other row at 5% (paired tests on the same "
             "samples: exact McNemar on correct/incorrect, Wilcoxon signed-rank on per-sample means over draws); "
             "a column without bold has no significant winner.")


def draw_notes(g: pd.DataFrame, value: str) -> list[str]:
    """How the cells of stochastic rows were scored (several draws of the defense's randomness)."""
    notes = []
    many = g[g["draws"] > 1]
    if len(many):
        rows = ", ".join(dict.fromkeys(many["defense"]))
        r = ", ".join(map(str, sorted(set(int(v) for v in many["draws"]))))
        if value == "mean":
            notes.append(f"Stochastic rows ({rows}): mean accuracy over R = {r} independent draws of the defense's "
                         "randomness per adversarial image (the expected single-draw accuracy, as the seed paper "
                         "measured); the suite's results tables give the stricter all-draws accuracy.")
        else:
            notes.append(f"Stochastic rows ({rows}): a sample counts as correct only if all R = {r} independent "
                         "draws of the defense's randomness classify it correctly (robust against resubmission); "
                         "the seed paper's tables (presets) show the mean over draws, as the paper measured, hence "
                         "higher numbers there; tables/draws.md has the mean, the majority vote and the first draw.")
    once = g[(g["draws"] == 1) & g["random_score"] & (g["space"] == INPUT_SPACE)]
    if len(once):
        rows = ", ".join(dict.fromkeys(once["defense"]))
        old = " (records written before per-draw scoring)" if once["old_schema"].any() else ""
        notes.append(f"Stochastic rows scored on a single draw of their randomness{old}: {rows}; "
                     "their numbers may overstate robustness.")
    return notes


def diagnostic_notes(g: pd.DataFrame) -> list[str]:
    """What each diagnostic column measures (its attack's declaration)."""
    from benchmark.registry import ATTACKS

    notes = ["Diagnostics: not in the threat model of the headline table and never part of its Worst."]
    scorings = g["scoring"] if "scoring" in g else [None] * len(g)
    for name, column, scoring in dict.fromkeys(zip(g["attack_registered"], g["column"], scorings)):
        try:
            cls = ATTACKS.get(name)
            measures = cls.diagnostic_measures.get(scoring, "") if isinstance(scoring, str) else cls.measures
        except Exception:
            measures = ""
        notes.append(f"{column}: {measures or 'a diagnostic outside the input threat space'}.")
    return notes


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


ACCURACY_NOTE = "Accuracy in %; 95% Wilson intervals in results_ci.md and results.csv."
WORST_NOTE = "Worst = per-sample worst case over the row's input-space attacks (a sample counts if it survived all)."


def footer_text(block: dict, full: bool = True) -> str:
    """What a table rests on (data copy, profile, n, target, threat) and its own notes; ``full``: also what
    every table's footer says (accuracy, Worst, bold, the Checks legend), for a table that stands alone
    (LaTeX). A Markdown file or page says those once: :func:`definitions`."""
    f = block["footer"]
    eps = f["eps"]
    eps_str = f"{eps * 255:.0f}/255" if abs(eps * 255 - round(eps * 255)) < 1e-6 else f"{eps:.4f}"
    n = ", ".join(map(str, f["n"]))
    common = ""
    if full:
        common = (f" {ACCURACY_NOTE}" + (f" {WORST_NOTE}" if WORST in block["columns"] else "") + f" {BOLD_NOTE}"
                  + (f" {LEGEND}" if block.get("checked") else ""))
    notes = f.get("notes", []) + (f.get("components", []) if full else [])
    return (f"Data: {f['copy']}. Profile: {f['profile']}. n = {n} evaluation examples. Target: {f['target']}. "
            f"Threat: {f['norm']} eps = {eps_str}.{common}" + "".join(" " + n for n in notes))


def definitions(blocks: list[dict]) -> list[str]:
    """What every table's footer would repeat, said once: a Markdown definition list (bold term, its meaning)."""
    items = [("Accuracy", "% of the n evaluation examples classified correctly; in brackets, or in results_ci.md "
                          "and results.csv, its 95% Wilson interval.")]
    columns = {c for b in blocks for c in b["columns"]}
    if WORST in columns:
        items.append(("Worst", "the per-sample worst case over the row's input-space attacks: a sample counts only "
                               "if it survived every one of them (computed from the per-sample results, not from "
                               "the column minima). The headline number."))
    if SHARED in columns:
        items.append((SHARED, "the same over the attacks every row of the table faced: compare rows on this one "
                              f"when they faced different attacks ({FEWER} marks a Worst over fewer attacks)."))
    items.append(("Bold", BOLD_NOTE.removeprefix("Bold: ")))
    if any(b.get("checked") for b in blocks):
        items.append(("Checks", LEGEND.removeprefix("Checks: ")))
    for note in dict.fromkeys(n for b in blocks for n in b["footer"].get("components", [])):
        rows, _, text = note.partition(": ")  # what a row's defense (or a column's attack) declares about itself
        items.append((rows, text))
    return [f"- **{term}**: {text}" for term, text in items]


METHODS = {"at": "PGD-AT", "trades": "TRADES", "mart": "MART", "natural": "natural training"}


def block_title(block: dict) -> str:
    target = block.get("footer", {}).get("target", block["target"])
    title = f"{block['dataset']}, target: {target}"
    return title + (": diagnostics (not robustness of the defended model)" if block.get("kind") == "diagnostics"
                    else "")


def markdown_block(block: dict, cell, footer: str) -> list[str]:
    """One block as a Markdown table: ``cell(row, column)`` gives each cell's text."""
    flags = any("checks" in r for r in block["rows"])
    out = [f"### {block_title(block)}\n",
           "| Defense | " + " | ".join(block["columns"]) + (" | Checks" if flags else "") + " |",
           "|---|" + "---:|" * len(block["columns"]) + ("---|" if flags else "")]
    for r in block["rows"]:
        out.append(f"| {r['defense']} | " + " | ".join(cell(r, c) for c in block["columns"])
                   + (f" | {r.get('checks', 'n/a')}" if flags else "") + " |")
    return out + ["", footer, ""]


WIDE = 6  # more columns than this: a two-column-wide table (table*)


def latex_block(block: dict, cell, caption: str, notes: str = "") -> list[str]:
    """One block as a booktabs table: ``cell(row, column)`` gives each cell's LaTeX; a short
    ``caption`` and, under the table in small type, the ``notes`` (what the footer of every table says)."""
    cols = block["columns"]
    flags = any("checks" in r for r in block["rows"])
    env = "table*" if len(cols) + flags > WIDE else "table"
    out = [rf"\begin{{{env}}}[t]", r"\centering", r"\caption{" + _tex_escape(caption) + "}",
           r"\begin{tabular}{l" + "r" * len(cols) + ("l" if flags else "") + "}",
           r"\toprule",
           "Defense & " + " & ".join(_tex_escape(c) for c in cols) + (" & Checks" if flags else "") + r" \\",
           r"\midrule"]
    for r in block["rows"]:
        out.append(_tex_escape(r["defense"]) + " & " + " & ".join(cell(r, c) for c in cols)
                   + (" & " + _tex_escape(r.get("checks", "n/a")) if flags else "") + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if notes:
        out.append(r"\par\smallskip\parbox{\linewidth}{\footnotesize " + _tex_escape(notes) + "}")
    return out + [rf"\end{{{env}}}", ""]


def to_markdown(blocks: list[dict], intervals: bool = False, defined: bool = True) -> str:
    """The blocks as Markdown tables, each with its own footer; then, with ``defined``, the definitions
    every footer shares, once (a page that states them elsewhere passes False)."""
    out = []
    for b in blocks:
        bold = bold_cells(b)

        def cell(r, col, bold=bold):
            if col not in r["cells"]:
                return "-"
            c = r["cells"][col]
            text = f"{100 * c.acc:.2f}"
            text = (f"**{text}**" if (r["defense"], col) in bold else text) + c.mark
            return text + (f" [{100 * c.lo:.1f}, {100 * c.hi:.1f}]" if intervals else "")

        out += markdown_block(b, cell, footer_text(b, full=False))
    if defined and blocks:
        out += ["#### Definitions", "", *definitions(blocks), ""]
    return "\n".join(out)


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 (FEWER, r"$^\dagger$")):
        s = s.replace(a, b)
    return s


def to_latex(blocks: list[dict], intervals: bool = False) -> str:
    """booktabs tables; ``intervals``: each value followed by its 95% Wilson interval in small type."""
    out = []
    for b in blocks:
        bold = bold_cells(b)

        def cell(r, col, bold=bold):
            if col not in r["cells"]:
                return "--"
            c = r["cells"][col]
            text = f"{100 * c.acc:.2f}"
            text = rf"\textbf{{{text}}}" if (r["defense"], col) in bold else text
            text += r"$^\dagger$" if c.mark else ""
            return text + (rf"\,{{\scriptsize[{100 * c.lo:.1f}, {100 * c.hi:.1f}]}}" if intervals else "")

        f = b["footer"]
        caption = f"{block_title(b)}: accuracy (%), n = {', '.join(map(str, f['n']))}, {f['norm']} eps = {f['eps']:.4f}"
        out += latex_block(b, cell, caption, footer_text(b))
    return "\n".join(out)


def to_csv_frame(blocks: list[dict]) -> pd.DataFrame:
    rows = []
    for b in blocks:
        for r in b["rows"]:
            for col in b["columns"]:
                if col in r["cells"]:
                    c = r["cells"][col]
                    rows.append({"dataset": b["dataset"], "target": b["target"], "defense": r["defense"],
                                 "column": col, "accuracy": c.acc, "ci_low": c.lo, "ci_high": c.hi,
                                 "unit": "fraction", "n": c.n, "block": b.get("kind", "results"), "copy": b["footer"]["copy"],
                                 "profile": b["footer"]["profile"], "eps": b["footer"]["eps"]})
    return pd.DataFrame(rows)


def draws_markdown(records: list[CellRecord]) -> str:
    """Per cell of a row scored under several draws: the four ways of scoring it."""
    out = ["# Scoring draws of stochastic defenses", "",
           "Each adversarial image of a stochastic defense is scored under R independent draws of the "
           "defense's randomness. All R = correct under every draw (robust against resubmission; the "
           "results tables and Worst use it). Mean = mean accuracy over the draws (the expected "
           "single-draw accuracy; the paper presets use it). Majority = the plurality vote of the R "
           "predictions is the true label (a tie is not). Single = the first draw alone. "
           "95% Wilson intervals in brackets.", "",
           "| Dataset | Target | Defense | Attack | R | n | Single | Mean | Majority | All R | extra passes |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    many = [r for r in records if r.draws > 1]
    for r in many:
        def pct(k, s=r.scores):
            return f"{100 * s[k].accuracy:.2f} [{100 * s[k].ci95[0]:.1f}, {100 * s[k].ci95[1]:.1f}]"

        c = r.cell
        out.append(f"| {c.dataset} | {c.target} | {c.defense} | {r.column} | {r.draws} | {r.n} | {pct('single')} | "
                   f"{pct('mean')} | {pct('majority')} | {pct('all')} | {(r.score_forwards or 0) - r.n} |")
    if not many:
        out.append("| - | - | - | - | - | - | - | - | - | - | - |")
    out += ["", "extra passes: forward image-passes spent on scoring beyond one per image."]
    return "\n".join(out) + "\n"


def left_out(records, checks=None) -> list[str]:
    """One line per record or checks file a run's tables leave out, and why (stale, corrupt)."""
    lines = list(getattr(records, "excluded", []))
    lines += list(getattr(checks, "excluded", []) if checks is not None else [])
    off = getattr(records, "off_plan", 0)
    if off:
        lines.append(f"{off} record(s) of cells no longer in the run's plan: left out (kept on disk)")
    return lines


def left_out_markdown(lines: list[str]) -> str:
    if not lines:
        return ""
    return "\n".join(["**Left out of these tables** (each line: what and why):", ""] + [f"- {x}" for x in lines]) + "\n\n"


def write_tables(run_dir: Path, include_stale: bool = False) -> list[Path]:
    """Write ``<run>/tables/results.{md,tex,csv}`` (and ``checks.md``, ``draws.md``) from the run's
    records; return the paths. Stale and corrupt records and checks files are left out (stale ones
    kept with ``include_stale``), each named on the console and at the top of ``results.md``."""
    run_dir = Path(run_dir)
    records = load_records(run_dir, include_stale=include_stale)
    checks = load_checks(run_dir)
    excluded = left_out(records, checks)
    for line in excluded:
        log.warning("%s", line)
    if not records:
        return []
    old = sum(1 for r in records if r.old_schema)
    if old:
        log.warning("%s: %d record(s) predate per-draw scoring (schema %s): a stochastic defense's cells in them "
                    "rest on one draw; rerun to rescore", run_dir, old, ", ".join(OLD_SCHEMAS))
    blocks = build_blocks(records_frame(records), checks if checks else None)
    tdir = run_dir / "tables"
    paths = [
        atomic_write_text(tdir / "results.md", left_out_markdown(excluded) + to_markdown(blocks)),
        atomic_write_text(tdir / "results_ci.md", to_markdown(blocks, intervals=True)),
        atomic_write_text(tdir / "results.tex", to_latex(blocks)),
        atomic_write_text(tdir / "results_ci.tex", to_latex(blocks, intervals=True)),
        atomic_write_text(tdir / "results.csv", to_csv_frame(blocks).to_csv(index=False)),
        atomic_write_text(tdir / "draws.md", draws_markdown(records)),
    ]
    if checks:
        paths.append(atomic_write_text(tdir / "checks.md", checks_markdown(checks)))
    return paths
