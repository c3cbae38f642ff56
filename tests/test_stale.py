"""Reports that never change silently: records of another plan (stale) and records that fail their
checksum (corrupt) are left out of the tables and named; a footer never mixes settings; a run
into a folder of another configuration is refused; bold means better than every other row."""

from __future__ import annotations

import json

import pytest
from test_runner import BASE, _run, _write

from benchmark.errors import BenchError
from benchmark.records import load_records
from benchmark.tables import FEWER, SHARED, TableCell, bold_cells, build_blocks, records_frame


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stale")
    cfg = json.loads(json.dumps(BASE))
    cfg["defenses"] = [{"name": "none"}, {"name": "den-a", "defense": "test-denoiser", "options": {"width": 4},
                                          "train": {"epochs": 1}}]
    cfg["eval"] = {"n": 40, "batch_size": 40, "checks": {"enabled": False}}
    # the MI column on the target alone: the rows face different attack sets
    cfg["attacks"] = cfg["attacks"] + [{"name": "mi-fgsm", "params": {"steps": 3}, "only": ["none"]}]
    path = _write(tmp, cfg)
    out = tmp / "run"
    _run(path, out)
    return path, out, cfg


def _copy(out, dest):
    import shutil

    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("artifacts"))
    return dest


def test_a_corrupt_record_is_left_out_and_named(small_run, tmp_path, caplog):
    from benchmark.reports import write_report

    _, out, _ = small_run
    run = _copy(out, tmp_path / "run")
    path = run / "records" / "digits__at__den-a__pgd.json"
    data = json.loads(path.read_text())
    data["correct"] = ("0" if data["correct"][0] == "1" else "1") + data["correct"][1:]  # one bit flipped
    path.write_text(json.dumps(data))
    records = load_records(run)
    assert len(records) == 4 and any("corrupt" in x and str(path) in x and "fails its checksum" in x
                                     for x in records.excluded)
    with caplog.at_level("WARNING", logger="purifybench"):
        write_report(run)
    assert "fails its checksum" in caplog.text
    index = (run / "report" / "index.md").read_text()
    assert "Left out of these tables" in index and "digits__at__den-a__pgd.json" in index
    assert "Left out of these tables" in (run / "tables" / "results.md").read_text()


def test_a_stale_record_is_left_out_named_and_shown_when_asked(small_run, tmp_path):
    from benchmark.reports import write_report

    _, out, _ = small_run
    run = _copy(out, tmp_path / "run")
    plan = json.loads((run / "plan.json").read_text())
    for c in plan["cells"]:  # the plan moved on (eps changed) and the rerun of this cell never happened
        if c["cell_id"] == "digits__at__den-a__pgd":
            c["cell_hash"] = "0" * 16
    (run / "plan.json").write_text(json.dumps(plan))
    records = load_records(run)
    assert "pgd" not in {r.cell.attack for r in records if r.cell.defense == "den-a"}
    assert any(x.startswith("stale: record") and "a run of the config recomputes it" in x for x in records.excluded)
    write_report(run)
    results = (run / "tables" / "results.md").read_text()
    assert "stale: record" in results
    shown = load_records(run, include_stale=True)
    assert len(shown) == 5 and shown.excluded  # kept, and still named
    write_report(run, include_stale=True)
    assert "shown, as asked" in (run / "report" / "index.md").read_text()


def test_a_footer_never_mixes_eps(small_run):
    _, out, _ = small_run
    records = list(load_records(out))
    other = records[0].to_json()
    other["threat"] = {"norm": "linf", "eps": 0.05}
    other["cell"] = dict(other["cell"], attack="pgd-small")
    from benchmark.records import as_record

    with pytest.raises(BenchError, match=r"digits/at: the records mix eps \(0.1, 0.05\)"):
        build_blocks(records_frame(records + [as_record(other)]))


def test_worst_compares_only_over_shared_attacks(small_run):
    _, out, _ = small_run
    block = build_blocks(records_frame(list(load_records(out))))[0]
    assert block["uneven"] and SHARED in block["columns"]
    rows = {r["defense"]: r for r in block["rows"]}
    assert rows["den-a"]["cells"]["Worst"].mark == FEWER and rows["none"]["cells"]["Worst"].mark == ""
    assert any("MI only on none" in n and "faced (PGD)" in n for n in block["footer"]["notes"])
    assert not any(col == "Worst" for _, col in bold_cells(block))


def test_bold_needs_a_win_over_every_row_not_only_the_runner_up():
    n = 200
    a = "1" * 100 + "0" * 100
    b = "1" * 90 + "0" * 110  # a's subset: a beats it on 10 samples, loses on none (significant)
    c = "1" * 40 + "0" * 60 + "1" * 45 + "0" * 55  # 85 correct: 60 only a, 45 only c (not significant)
    cells = {"A": a, "B": b, "C": c}
    block = {"columns": ["PGD"], "rows": [
        {"defense": d, "cells": {"PGD": TableCell(bits.count("1") / n, 0, 1, n, bits=bits)}} for d, bits in cells.items()]}
    assert bold_cells(block) == set()  # A beats the runner-up B, not C
    block["rows"] = block["rows"][:2]
    assert bold_cells(block) == {("A", "PGD")}


def test_a_run_into_a_folder_of_another_configuration_is_refused(small_run, tmp_path):
    path, out, cfg = small_run
    run = _copy(out, tmp_path / "run")
    changed = json.loads(json.dumps(cfg))
    changed["threat"]["eps"] = 0.05  # a copy of the config with only eps changed, into the same folder
    other = _write(tmp_path, changed, "changed.yaml")
    with pytest.raises(BenchError, match=r"holds a run of another configuration \(runner-test from .*cfg.yaml, config "
                                         r"hash .*: give --out another folder, or --replace"):
        _run(other, run)
    assert json.loads((run / "manifest.json").read_text())["config_path"] == str(path)  # nothing written


def test_a_row_that_hides_its_randomness_is_refused_and_the_others_run(small_run, tmp_path):
    import purifybench_testing  # noqa: F401  (registers test-secretly-random)

    _, _, cfg = small_run
    cfg = json.loads(json.dumps(cfg))
    cfg["defenses"] = [{"name": "none"}, {"name": "plugin", "defense": "test-secretly-random"}]
    out = tmp_path / "run"
    with pytest.raises(BenchError, match=r"1 failure\(s\).*digits/at/plugin: defense 'plugin' declares stochastic = "
                                         r"False, but two passes over the same 40 images disagree"):
        _run(_write(tmp_path, cfg), out)
    assert {r.cell.defense for r in load_records(out)} == {"none"}  # never scored once without EOT
