"""The seed paper's table presets built from synthetic records with known values."""

import io

import pandas as pd
import pytest

from benchmark.cli import main as cli_main
from benchmark.errors import BenchError
from benchmark.paper import reference_numbers
from benchmark.presets import (
    PRESETS,
    preset_blocks,
    preset_frame,
    preset_latex,
    preset_markdown,
    resolve_presets,
)
from benchmark.records import write_record
from benchmark.reports import _frame, write_report


def rec(defense, attack, bits, reg_def=None, method="at", target="t", options=None, spe=None, label=None):
    k = bits.count("1")
    return {"cell": {"dataset": "cifar10-jpeg", "target": target, "defense": defense, "attack": attack},
            "attack_label": label or attack, "attack_registered": attack,
            "defense_registered": reg_def or defense, "defense_options": options or {},
            "n": len(bits), "n_correct": k, "accuracy": k / len(bits), "ci95": [0.1, 0.9], "correct": bits,
            "dataset_copy": "copy X", "profile": "quick", "threat": {"eps": 8 / 255, "norm": "linf"},
            "target": {"arch": "resnet18", "method": method}, "seconds": 1.0, "images_per_second": 4.0,
            "forwards": 1, "backwards": 1, "peak_gpu_memory_mb": None,
            "defense_training": {"seconds": 10.0, "seconds_per_epoch": spe} if spe else None}


RECORDS = [
    rec("none", "clean", "1111"), rec("none", "pgd", "1100", label="PGD-20"), rec("none", "autoattack", "1000"),
    rec("DIR", "clean", "1110", "dir"), rec("DIR", "pgd", "1110", "dir", label="PGD-20"),
    rec("DIR", "autoattack", "1100", "dir"), rec("DIR", "eot-pgd", "1100", "dir"),
    rec("DIR-4-1", "clean", "1111", "dir", options={"depth": 4, "decoder_depth": 1}),
    rec("DIR-4-1", "pgd", "1000", "dir", options={"depth": 4, "decoder_depth": 1}),
    rec("ME-Net", "clean", "1111", "menet"), rec("ME-Net", "bpda-eot", "0000", "menet"),
    rec("none", "pgd", "0000", method="natural", target="nat"),
    rec("HGD", "pgd", "1000", "hgd", method="natural", target="nat", spe=12.5),
]


def test_table1_layout_values_bold_and_paper_differences():
    ref = reference_numbers()
    blocks = preset_blocks(_frame(RECORDS), PRESETS["table1"], ref)
    assert len(blocks) == 1
    b = blocks[0]
    assert b["columns"] == ["clean", "PGD-20", "autoattack"]  # the paper's order; no Worst, no EOT column
    rows = {r["defense"]: r["cells"] for r in b["rows"]}
    assert set(rows) == {"none", "DIR", "ME-Net"}  # the depth variant belongs to Table 5
    assert rows["DIR"]["PGD-20"][0] == 0.75 and rows["DIR"]["PGD-20"][4] == ref["table1"]["cifar10"]["dir"]["pgd"]
    md = preset_markdown(PRESETS["table1"], blocks)
    # four samples: no difference is significant, so nothing is bold
    assert "| DIR | 75.00 / 85.11 (-10.11) | 75.00 / 54.27 (+20.73) | 50.00 / 51.34 (-1.34) |" in md
    assert "| none | 100.00 / 85.20 (+14.80) | 50.00 / 45.72 (+4.28) |" in md and "**" not in md.split("#### Definitions")[0]
    assert "Data: copy X. Profile: quick. n = 4" in md
    tex = preset_latex(PRESETS["table1"], blocks)
    assert r"\toprule" in tex and "75.00 / 54.27 (+20.73)" in tex and r"\textbf" not in tex
    # a short caption above; the footer's notes in small type under the table; wide tables span both columns
    caption = tex.split(r"\caption{")[1].split("}")[0]
    assert r"\begin{table}[t]" in tex and len(caption) < 120 and r"\footnotesize" in tex
    from benchmark.tables import latex_block

    wide = {"columns": [f"c{i}" for i in range(8)], "rows": [{"defense": "x", "cells": {}}]}
    lines = latex_block(wide, lambda r, c: "--", "A caption", "notes")
    assert lines[0] == r"\begin{table*}[t]" and lines[-2] == r"\end{table*}"
    csv = preset_frame(PRESETS["table1"], blocks).to_csv(index=False)
    back = pd.read_csv(io.StringIO(csv)).set_index(["defense", "column"])
    assert back.loc[("DIR", "PGD-20"), "value"] == 75.0 and back.loc[("DIR", "PGD-20"), "unit"] == "percent"
    assert abs(back.loc[("DIR", "PGD-20"), "difference"] - (75.0 - 54.27)) < 1e-9


def test_tables_3_4_5_pick_their_rows():
    ref = reference_numbers()
    df = _frame(RECORDS)
    t3 = preset_blocks(df, PRESETS["table3"], ref)
    assert [r["defense"] for r in t3[0]["rows"]] == ["ME-Net"]  # only rows attacked with BPDA+EOT
    assert t3[0]["rows"][0]["cells"]["bpda-eot"][4] == ref["table3"]["menet"]["bpda-eot"]
    exact = rec("ME-Net", "bpda-eot-exact", "0001", "menet", label="BPDA+EOT (exact)")
    exact["attack_registered"] = "bpda-eot"  # a second column of the same attack: both are shown
    exact |= {"defense_declarations": {"exact_gradient": True}, "attack_info": {"resolved": {"gradient": "exact"}}}
    both = preset_blocks(_frame(RECORDS + [exact]), PRESETS["table3"], ref)
    assert both[0]["columns"][-2:] == ["bpda-eot", "BPDA+EOT (exact)"]
    cells = both[0]["rows"][0]["cells"]  # only the paper's attack (BPDA) is compared with the paper
    assert cells["bpda-eot"][4] == ref["table3"]["menet"]["bpda-eot"] and cells["BPDA+EOT (exact)"][4] is None
    t4 = preset_blocks(df, PRESETS["table4"], ref)
    assert t4[0]["columns"] == ["pgd", "s/epoch"]
    hgd = next(r for r in t4[0]["rows"] if r["defense"] == "HGD")
    assert hgd["seconds_per_epoch"] == (12.5, ref["table4"]["hgd"]["seconds_per_epoch"])
    assert "12.5 / 291" in preset_markdown(PRESETS["table4"], t4)
    t5 = preset_blocks(df, PRESETS["table5"], ref)
    cells = {r["defense"]: r["cells"] for r in t5[0]["rows"]}  # the depths in the row names
    assert cells["DIR-4-1 (4-1)"]["pgd"][4] == ref["table5"]["4-1"]["pgd"] and cells["DIR (8-2)"]["clean"][4] == 85.11
    t1 = preset_blocks(df, PRESETS["table1"], ref)  # the depth variant is named, not silently dropped
    assert "DIR-4-1" not in [r["defense"] for r in t1[0]["rows"]]
    assert "Not in this table: DIR-4-1 (encoder 4, decoder 1)" in " ".join(t1[0]["footer"]["notes"])
    assert preset_blocks(df, PRESETS["table2"], ref) == []  # no TRADES / MART target in these records


def test_preset_names_are_checked():
    assert [p.name for p in resolve_presets("paper")] == list(PRESETS)
    assert [p.name for p in resolve_presets("table3, table1")] == ["table3", "table1"]
    with pytest.raises(BenchError, match=r"--preset 'table9': unknown preset\(s\) \['table9'\]; allowed: paper, all"):
        resolve_presets("table9")


def _run_dir(tmp_path):
    run = tmp_path / "run"
    for r in RECORDS:
        cid = f"{r['cell']['target']}__{r['cell']['defense']}__{r['cell']['attack']}"
        write_record(run / "records" / f"{cid}.json", dict(r, cell_id=cid, cell_hash="h-" + cid))
    return run


def test_report_presets_on_disk_and_through_the_cli(tmp_path, capsys):
    run = _run_dir(tmp_path)
    names = {p.name for p in write_report(run, preset="paper")}
    assert {"table1.md", "table1.tex", "table1.csv", "table1_ci.md", "table3.md", "table4.md", "table5.md",
            "paper_comparison.md", "index.md", "index.html"} <= names
    assert "table2.md" not in names and "timing.md" not in names and "adaptive.md" not in names
    index = (run / "report" / "index.md").read_text()
    assert "presets/table1.md" in index and "report preset: paper" in index
    assert cli_main(["report", str(run), "--preset", "table5"]) == 0
    assert cli_main(["report", str(run), "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    names = {p.name for p in write_report(run)}  # default: all
    assert {"timing.md", "adaptive.md", "table1.md"} <= names


def test_the_papers_dir_settings_are_the_defense_defaults():
    from benchmark.paper import DIR_ALPHA, DIR_DEPTHS
    from defenses.dir import DIROptions, DIRTrain

    assert (DIROptions().depth, DIROptions().decoder_depth) == DIR_DEPTHS
    assert DIRTrain().alpha == DIR_ALPHA


def test_a_run_without_dir_at_the_papers_depth_shows_its_dir_in_table1_with_its_depth():
    ref = reference_numbers()
    records = [r for r in RECORDS if r["cell"]["defense"] != "DIR"]
    blocks = preset_blocks(_frame(records), PRESETS["table1"], ref)
    rows = {r["defense"]: r["cells"] for r in blocks[0]["rows"]}
    assert "DIR-4-1 (depth 4-1)" in rows  # the paper's own method is in its table, its depth named
    assert all(c.paper is None for c in rows["DIR-4-1 (depth 4-1)"].values())  # the 8-2 numbers do not apply
    assert rows["none"]["clean"].paper == ref["table1"]["cifar10"]["none"]["clean"]
    notes = " ".join(blocks[0]["footer"]["notes"])
    assert "DIR-4-1: DIR at encoder-decoder depth other than the paper's 8-2" in notes
    assert "Not in this table" not in notes
    md = preset_markdown(PRESETS["table1"], blocks)
    assert "Cells: ours / the seed paper's number" in md
    natural = [rec("DIR-4-1", "clean", "1111", "dir", method="natural", target="nat", spe=3.0,
                   options={"depth": 4, "decoder_depth": 1}),
               rec("DIR-4-1", "pgd", "1000", "dir", method="natural", target="nat", spe=3.0,
                   options={"depth": 4, "decoder_depth": 1})]
    t4 = preset_blocks(_frame(records + natural), PRESETS["table4"], ref)
    stand_in = next(r for r in t4[0]["rows"] if r["defense"] == "DIR-4-1 (depth 4-1)")
    assert stand_in["seconds_per_epoch"] == (3.0, None)  # the paper's 8-2 epoch time is not its number
    digits = [dict(r, cell=dict(r["cell"], dataset="digits")) for r in records]
    md = preset_markdown(PRESETS["table1"], preset_blocks(_frame(digits), PRESETS["table1"], ref))
    assert "### digits, target: t (resnet18, PGD-AT)" in md
    assert " / " not in md.split("Data:")[0] and "Cells: ours only" in md  # the footer says what the cells show

