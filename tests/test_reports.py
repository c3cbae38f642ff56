"""Reports from records: adaptive table, paper comparison, timing, figures, index."""

import json

import pandas as pd

from benchmark.cli import main as cli_main
from benchmark.reports import (
    _frame,
    adaptive_table,
    paper_comparison,
    reference_numbers,
    timing_table,
    write_report,
)


def rec(defense, attack, bits, registered=None, dataset="cifar10-jpeg", seconds=1.0, label=None, reg_def=None):
    k = bits.count("1")
    return {"cell": {"dataset": dataset, "target": "t", "defense": defense, "attack": attack},
            "attack_label": label or attack, "attack_registered": registered or attack,
            "defense_registered": reg_def or defense, "n": len(bits), "n_correct": k, "accuracy": k / len(bits),
            "ci95": [0.0, 1.0], "correct": bits, "dataset_copy": "copy X", "profile": "smoke",
            "threat": {"eps": 8 / 255, "norm": "linf"}, "target": {"arch": "resnet18", "method": "at"},
            "seconds": seconds, "images_per_second": len(bits) / seconds, "forwards": 10, "backwards": 5,
            "peak_gpu_memory_mb": None, "defense_training": {"seconds": 12.0, "seconds_per_epoch": 3.0}}


RECORDS = [
    rec("none", "clean", "1111"), rec("none", "pgd", "1100"),
    rec("DIR", "clean", "1111", reg_def="dir"), rec("DIR", "pgd", "1110", reg_def="dir"),
    rec("DIR", "eot-pgd", "1100", reg_def="dir"), rec("DIR", "mask-adaptive", "1000", reg_def="dir"),
]


def test_adaptive_table_takes_the_strongest_declared_attack():
    t = adaptive_table(_frame(RECORDS)).set_index("defense")
    assert t.loc["DIR", "plain"] == 0.75 and t.loc["DIR", "adaptive"] == 0.25
    assert t.loc["DIR", "adaptive_attack"] == "mask-adaptive" and abs(t.loc["DIR", "drop"] - 0.5) < 1e-12
    assert t.loc["none", "plain"] == 0.5 and pd.isna(t.loc["none", "adaptive"])


def test_paper_comparison_differences():
    ref = reference_numbers()
    assert ref["table1"]["cifar10"]["dir"]["pgd"] == 54.27 and ref["table3"]["ebm"]["bpda-eot"] == 51.43
    t = paper_comparison(_frame(RECORDS)).set_index(["defense", "column"])
    assert abs(t.loc[("none", "pgd"), "difference"] - (50.0 - 45.72)) < 1e-9
    assert abs(t.loc[("DIR", "clean"), "paper"] - 85.11) < 1e-9
    assert ("DIR", "eot-pgd") not in t.index  # the paper has no such column
    other = paper_comparison(_frame([rec("none", "pgd", "10", dataset="digits")]))
    assert other.empty


def test_timing_table_and_report_files(tmp_path):
    run = tmp_path / "run"
    (run / "records").mkdir(parents=True)
    for r in RECORDS:  # write through the real record format (checksums, plan)
        from benchmark.records import write_record

        cid = f"{r['cell']['defense']}__{r['cell']['attack']}"
        r = dict(r, cell_id=cid, cell_hash="h-" + cid)
        write_record(run / "records" / f"{cid}.json", r)
    (run / "plan.json").write_text(json.dumps({"cells": [
        {"cell_id": f"{r['cell']['defense']}__{r['cell']['attack']}", "cell_hash": "h-" + r['cell']['defense']
         + "__" + r['cell']['attack'], **r["cell"]} for r in RECORDS]}))
    (run / "manifest.json").write_text(json.dumps({"profile": "smoke", "device": "cpu", "config_hash": "abc",
                                                   "versions": {"torch": "x", "git_commit": "deadbeef"},
                                                   "config": {"name": "synthetic"}}))
    t = timing_table(_frame(RECORDS))
    assert list(t["seconds"]) == [1.0] * len(RECORDS)
    paths = write_report(run)
    names = {p.name for p in paths}
    assert {"index.md", "adaptive.md", "paper_comparison.md", "timing.md", "timing.csv",
            "timing.png", "timing.pdf", "cost_robustness.png", "results.md"} <= names
    for p in paths:
        assert p.stat().st_size > 0
    png = run / "report" / "figures" / "timing.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = (run / "report" / "index.md").read_text()
    assert "deadbeef" in index and "figures/timing.png" in index and "| DIR |" in index
    assert "+4.28" in (run / "report" / "paper_comparison.md").read_text()  # 50.00 - 45.72
    assert cli_main(["report", str(run)]) == 0
