import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import purifybench_testing  # noqa: F401  (registers the test-only trainable defense)
import pytest
import yaml

from benchmark.config import ConfigError
from benchmark.errors import BenchError
from benchmark.experiment import load_config
from benchmark.records import load_records, read_record, valid_record
from benchmark.runner import Runner
from benchmark.tables import (
    build_blocks,
    records_frame,
    to_csv_frame,
    to_latex,
    to_markdown,
    worst_case,
)

ROOT = Path(__file__).resolve().parent.parent

BASE = {
    "name": "runner-test",
    "profile": "smoke",
    "seed": 0,
    "device": "cpu",
    "datasets": [{"name": "digits", "options": {"size": 16}}],
    "threat": {"eps": 0.1, "step_size": 0.025},
    "eval": {"n": 60, "batch_size": 60},
    "targets": [{"name": "at", "arch": "small-cnn",
                 "train": {"method": "at", "epochs": 2, "batch_size": 64, "lr": 0.05, "augment": False,
                           "eps": 0.1, "step_size": 0.025, "attack_steps": 2, "progress": False}}],
    "defenses": [{"name": "none"},
                 {"name": "den-a", "defense": "test-denoiser", "options": {"width": 4}, "train": {"epochs": 1}},
                 {"name": "den-b", "defense": "test-denoiser", "options": {"width": 4}, "train": {"epochs": 1}}],
    "attacks": [{"name": "clean"}, {"name": "pgd", "params": {"steps": 5, "step_size": 0.025}}],
}


def _write(tmp_path, cfg, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg_path, out, **kw):
    runner = Runner(load_config(cfg_path), out, progress=False, config_path=str(cfg_path), **kw)
    return runner.run()


def _plan(cfg_path, out):
    from benchmark.plan import Planner, format_plan

    runner = Runner(load_config(cfg_path), out, progress=False, config_path=str(cfg_path))
    return format_plan(runner, Planner(runner), str(cfg_path))


def _artifacts(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "artifacts").rglob("*.safetensors")}


def test_matrix_records_tables_and_artifact_reuse(tmp_path):
    out = tmp_path / "run"
    summary = _run(_write(tmp_path, BASE), out)
    assert summary == {"planned": 6, "computed": 6, "busy": [], "tables": summary["tables"]}
    records = load_records(out)
    assert [r.cell.defense for r in records] == ["none", "none", "den-a", "den-a", "den-b", "den-b"]
    for r in records:
        assert r.n == 60 and len(r.correct) == 60 and r.n_correct == r.correct.count("1")
        assert r.ci95[0] <= r.accuracy <= r.ci95[1]
        assert r.manifest["config_hash"] and r.manifest["versions"]["torch"]
        assert r.target["checkpoint_sha256"] and r.draws == 1 and r.scores["all"].accuracy == r.accuracy
    den = [r for r in records if r.cell.defense == "den-a"][0]
    assert den.defense_checkpoint_sha256 and den.defense_declarations["trainable"]
    # the tables show exactly the records' numbers
    md = (out / "tables" / "results.md").read_text()
    for r in records:
        assert f"{100 * r.accuracy:.2f}" in md
    csv = (out / "tables" / "results.csv").read_text().splitlines()
    assert csv[0].startswith("dataset,target,defense,column,accuracy,ci_low,ci_high")
    assert (out / "tables" / "results.tex").read_text().count(r"\toprule") == 1
    assert r"{\scriptsize[" in (out / "tables" / "results_ci.tex").read_text()  # the intervals in LaTeX
    assert r"{\scriptsize[" not in (out / "tables" / "results.tex").read_text()
    # same config again: nothing recomputed, nothing retrained
    stamps = _artifacts(out)
    assert _run(_write(tmp_path, BASE), out)["computed"] == 0
    assert _artifacts(out) == stamps
    assert "cells: 6 planned, 0 to compute, 6 already recorded\nto train: nothing" in _plan(_write(tmp_path, BASE), out)
    # change one defense's config: only that defense is retrained and only its cells recomputed
    changed = json.loads(json.dumps(BASE))
    changed["defenses"][2]["train"] = {"epochs": 2}
    plan = _plan(_write(tmp_path, changed, "cfg2.yaml"), out)  # says so before running
    assert "cells: 6 planned, 2 to compute, 4 already recorded\nto train: defense digits/den-b (2 epochs)" in plan
    assert "| cells | digits/at/den-b |" in plan and "| cells | digits/at/none |" not in plan
    with pytest.raises(BenchError, match="holds a run of another configuration"):  # not silently
        _run(_write(tmp_path, changed, "cfg2.yaml"), out)
    summary = _run(_write(tmp_path, changed, "cfg2.yaml"), out, replace=True)
    assert summary["computed"] == 2
    after = _artifacts(out)
    kept = {k: v for k, v in after.items() if k in stamps}
    assert kept == stamps  # target, den-a and old den-b artifacts untouched
    new = set(after) - set(stamps)
    assert len(new) == 1 and next(iter(new)).startswith("digits-den-b-")
    # --force recomputes every cell
    assert _run(_write(tmp_path, changed, "cfg2.yaml"), out, force=True)["computed"] == 6


def _table_record(defense, attack, bits, registered=None, **extra):
    k = bits.count("1")
    return {"cell": {"dataset": "d", "target": "t", "defense": defense, "attack": attack},
            "attack_label": attack, "attack_registered": registered or attack, "n": len(bits), "n_correct": k,
            "accuracy": k / len(bits), "ci95": [0, 1], "correct": bits, "dataset_copy": "copy X",
            "profile": "smoke", "threat": {"eps": 8 / 255, "norm": "linf"},
            "target": {"arch": "small-cnn", "method": "at"}, **extra}


def test_worst_case_and_bold_best():
    recs = [_table_record(d, a, b) for d, bits in (("a", {"clean": "1111", "pgd": "1100", "mi": "1010"}),
                                                   ("b", {"clean": "1110", "pgd": "1110", "mi": "0110"}))
            for a, b in bits.items()]
    blocks = build_blocks(records_frame(recs))
    assert blocks[0]["columns"] == ["clean", "pgd", "mi", "Worst"]
    rows = {r["defense"]: r["cells"] for r in blocks[0]["rows"]}
    assert rows["a"]["Worst"][0] == 0.25 and rows["b"]["Worst"][0] == 0.5  # per-sample AND, not column minima
    md = to_markdown(blocks)
    assert "| a | 100.00 | 50.00 | 50.00 | 25.00 |" in md  # four samples: no difference is significant
    assert "| b | 75.00 | 75.00 | 50.00 | 50.00 |" in md and "**" not in md.split("#### Definitions")[0]
    assert "copy X" in md and "eps = 8/255" in md and "n = 4" in md and "no significant winner" in md
    assert worst_case(["101", "110"]) == (1, 3)
    # 40 samples: a beats b on pgd in 16 discordant pairs to 0 (McNemar p < 0.001): bold; clean 40 vs
    # 39 (p = 1): no bold; a tie is never bold
    big = [_table_record("a", "clean", "1" * 40), _table_record("a", "pgd", "1" * 30 + "0" * 10),
           _table_record("b", "clean", "1" * 39 + "0"), _table_record("b", "pgd", "1" * 14 + "0" * 26),
           _table_record("c", "pgd", "0" * 40)]
    md = to_markdown(build_blocks(records_frame(big)))
    assert "| a | 100.00 | **75.00** | **75.00** |" in md and "| b | 97.50 | 35.00 | 35.00 |" in md
    assert r"\textbf{75.00}" in to_latex(build_blocks(records_frame(big)))


def test_worst_ignores_diagnostics():
    """A diagnostic far below every input-space attack (DIR's representation attack, the noise-discard
    probe) gets its own block and never reaches Worst."""
    recs = [_table_record("m", "clean", "1" * 8), _table_record("m", "pgd", "11111100"),
            _table_record("m", "bpda-eot", "11110100"),
            _table_record("m", "representation", "00000000", threat_space="representation"),
            _table_record("m", "noise-discard", "10000000")]  # an old record: its space from the registry
    blocks = build_blocks(records_frame(recs))
    assert [b["kind"] for b in blocks] == ["results", "diagnostics"]
    head, diag = blocks
    assert head["columns"] == ["clean", "pgd", "bpda-eot", "Worst"]
    assert head["rows"][0]["cells"]["Worst"].acc == 5 / 8  # pgd AND bpda-eot, not 0 from representation
    assert diag["columns"] == ["representation", "noise-discard"] and "Worst" not in diag["rows"][0]["cells"]
    md = to_markdown(blocks)
    assert "### d, target: t (small-cnn, PGD-AT): diagnostics (not robustness of the defended model)" in md
    assert "never part of its Worst" in md and "restored image" in md
    csv = to_csv_frame(blocks)
    assert set(csv[csv["block"] == "diagnostics"]["column"]) == {"representation", "noise-discard"}


KILL_CFG = {
    **{k: v for k, v in BASE.items() if k not in ("defenses", "attacks", "targets", "eval")},
    "name": "kill-test",
    "eval": {"n": 200, "batch_size": 100,
             "checks": {"n": 50, "steps": 5, "more_steps": 15, "eps_multipliers": [4.0], "square_queries": 100}},
    "targets": [{"name": "nat", "arch": "small-cnn",
                 "train": {"method": "at", "epochs": 4, "batch_size": 64, "lr": 0.05, "eps": 0.1,
                           "step_size": 0.025, "attack_steps": 2, "augment": False, "progress": False}}],
    "defenses": [{"name": "none"}],
    "attacks": [{"name": "clean"}] + [
        {"name": f"pgd{i}", "attack": "pgd", "params": {"steps": 30 + i, "step_size": 0.01}} for i in range(6)],
}


def _files_are_sound(out):
    """After a kill: every record and checks file that exists verifies (temp files may remain)."""
    from benchmark.masking import valid_checks

    for p in (out / "records").glob("*.json") if (out / "records").is_dir() else []:
        assert valid_record(p) is not None, p
    for p in (out / "checks").glob("*.json") if (out / "checks").is_dir() else []:
        assert valid_checks(p) is not None, p
    for p in out.rglob("*.tmp"):  # a killed atomic write may leave a temp file, never a partial result
        assert p.name.startswith(".")


def test_sigkill_at_random_points_then_resume_loses_and_duplicates_nothing(tmp_path):
    import random

    rng = random.Random(int(os.environ.get("PURIFYBENCH_KILL_SEED", "0")))
    cfg = _write(tmp_path, KILL_CFG)
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "run_benchmark.py"), "run", str(cfg), "--out", str(out), "--no-progress"]
    # Kill points: during the target's training (a per-epoch state must be resumed), then after
    # a random number of finished cells, each after a random extra delay.
    plan = [("training", 1), ("cells", rng.randint(1, 3)), ("cells", rng.randint(4, 6))]
    finished: dict[str, tuple] = {}
    resumed = False
    for what, k in plan:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        deadline = time.time() + 300
        try:
            while time.time() < deadline and proc.poll() is None:
                if what == "training":
                    partial = list((out / "artifacts").rglob("state.json")) if (out / "artifacts").is_dir() else []
                    if partial:
                        break
                elif (out / "records").is_dir() and len(list((out / "records").glob("*.json"))) >= k:
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.1 if what == "training" else 0.3))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        resumed = resumed or "resuming after epoch" in err
        _files_are_sound(out)
        for p in (out / "records").glob("*.json") if (out / "records").is_dir() else []:
            finished.setdefault(p.name, (p.stat().st_mtime_ns, read_record(p).created))
    assert resumed, "the second start should have resumed the target's training from its epoch state"
    assert len(finished) < 7, "the runs should have been killed before the end"
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    plan_ids = {c["cell_id"] for c in json.loads((out / "plan.json").read_text())["cells"]}
    records = sorted((out / "records").glob("*.json"))
    assert {p.stem for p in records} == plan_ids and len(records) == 7  # none lost, none extra
    for p in records:
        rec = valid_record(p)
        assert rec is not None and rec.n == 200
    for name, (mtime, created) in finished.items():  # finished cells are never recomputed
        p = out / "records" / name
        assert p.stat().st_mtime_ns == mtime and read_record(p).created == created
    assert len(list((out / "checks").glob("*.json"))) == 1
    assert not list((out / "artifacts").rglob("*.partial"))  # the epoch state is gone once the artifact exists
    assert len(list((out / "artifacts").rglob("*.safetensors"))) == 1


def test_corrupt_record_is_recomputed(tmp_path):
    cfg = json.loads(json.dumps(BASE))
    cfg["defenses"] = [{"name": "none"}]
    path = _write(tmp_path, cfg)
    out = tmp_path / "run"
    _run(path, out)
    victim = sorted((out / "records").glob("*.json"))[0]
    rec = json.loads(victim.read_text())
    rec["accuracy"] = 0.99  # tampered: the checksum no longer matches
    victim.write_text(json.dumps(rec))
    assert valid_record(victim) is None
    assert _run(path, out)["computed"] == 1
    assert valid_record(victim) is not None


def test_a_defense_that_fails_to_train_does_not_stop_the_others(tmp_path):
    cfg = json.loads(json.dumps(BASE))
    cfg["defenses"] = [{"name": "none"}, {"name": "bad", "defense": "test-diverging", "options": {"width": 4}},
                       {"name": "den-a", "defense": "test-denoiser", "options": {"width": 4}, "train": {"epochs": 1}}]
    out = tmp_path / "run"
    with pytest.raises(BenchError, match=r"1 failure\(s\).*digits/at/bad: test-diverging training diverged"):
        _run(_write(tmp_path, cfg), out)
    assert sorted({r.cell.defense for r in load_records(out)}) == ["den-a", "none"]
    assert "den-a" in (out / "tables" / "results.md").read_text()
    assert not list((out / "artifacts" / "defenses").glob("digits-bad-*"))  # nothing saved for it


def test_keep_going_logs_an_unexpected_error_and_finishes_the_other_cells(tmp_path):
    cfg = json.loads(json.dumps(BASE))
    cfg["defenses"] = [{"name": "none"}, {"name": "bomb", "defense": "test-exploding"},
                       {"name": "den-a", "defense": "test-denoiser", "options": {"width": 4}, "train": {"epochs": 1}}]
    path = _write(tmp_path, cfg)
    with pytest.raises(RuntimeError, match="boom"):  # by default the first one stops the run
        _run(path, tmp_path / "strict")
    out = tmp_path / "run"
    with pytest.raises(BenchError, match=r"3 failure\(s\).*checks of digits__at__bomb: RuntimeError: boom: an "
                                         r"unexpected error in purify;.*digits__at__bomb__pgd: RuntimeError: boom"):
        _run(path, out, keep_going=True)
    assert sorted({r.cell.defense for r in load_records(out)}) == ["den-a", "none"]
    assert "bomb" not in (out / "tables" / "results.md").read_text()  # its row is missing, not faked


@pytest.mark.parametrize("name", ["../evil", ".hidden", "a/b", "with space", ""])
def test_names_that_cannot_be_file_names_are_refused(tmp_path, name):
    cfg = json.loads(json.dumps(BASE))
    cfg["defenses"][1]["name"] = name
    with pytest.raises(ConfigError, match=r"defenses\[1\]( \(.*\))?\.name.*is not allowed"):
        load_config(_write(tmp_path, cfg))


def test_a_defense_trained_against_one_target_is_evaluated_in_front_of_another(tmp_path):
    cfg = json.loads(json.dumps(BASE))
    natural = json.loads(json.dumps(cfg["targets"][0]))
    natural["name"], natural["train"]["method"] = "nat", "natural"
    cfg["targets"].append(natural)
    cfg["defenses"] = [{"name": "none"},
                       {"name": "den", "defense": "test-denoiser", "options": {"width": 4}, "train": {"epochs": 1},
                        "trained_against": "at"}]
    cfg["attacks"] = [{"name": "clean"}]
    out = tmp_path / "run"
    _run(_write(tmp_path, cfg), out)
    recs = {(r.cell.target, r.cell.defense): r for r in load_records(out)}
    # one denoiser, trained against the AT target, in front of both targets
    assert recs["at", "den"].defense_checkpoint_sha256 == recs["nat", "den"].defense_checkpoint_sha256
    assert len(list((out / "artifacts" / "defenses").glob("digits-den-*.json"))) == 1
    assert recs["at", "none"].target["checkpoint_sha256"] != recs["nat", "none"].target["checkpoint_sha256"]
    # the UMAP of the denoiser in front of the natural target finds the artifact trained against AT
    from benchmark.umap_report import restored_features

    feats, labels = restored_features(out, ["den"], n=16, steps=1, device="cpu", target="nat")["den"]
    assert feats.shape[0] == 16 == len(labels)
    feats, labels = restored_features(out, ["den"], n=None, steps=1, device="cpu", target="nat")["den"]
    assert len(labels) == 359  # by default at most the split: the whole digits test split
    cfg["defenses"][1]["trained_against"] = "trades"
    with pytest.raises(ConfigError, match=r"defenses\[1\]\.trained_against: 'trades' is not a target"):
        load_config(_write(tmp_path, cfg, "bad.yaml"))


def test_an_artifact_does_not_depend_on_what_ran_before_it(tmp_path):
    both = json.loads(json.dumps(BASE))
    both["attacks"] = [{"name": "clean"}, {"name": "pgd", "params": {"steps": 3, "step_size": 0.025}}]
    alone = json.loads(json.dumps(both))
    alone["defenses"] = [alone["defenses"][2]]  # den-b only: no den-a training or cells before it
    _run(_write(tmp_path, both, "both.yaml"), tmp_path / "both")
    _run(_write(tmp_path, alone, "alone.yaml"), tmp_path / "alone")
    a = {r.cell.defense: r for r in load_records(tmp_path / "both")}
    b = {r.cell.defense: r for r in load_records(tmp_path / "alone")}
    assert a["den-b"].defense_checkpoint_sha256 == b["den-b"].defense_checkpoint_sha256
    assert a["den-b"].target["checkpoint_sha256"] == b["den-b"].target["checkpoint_sha256"]


def test_a_costly_row_can_be_evaluated_on_a_prefix_of_the_subset(tmp_path):
    cfg = json.loads(json.dumps(BASE))
    cfg["defenses"][1]["eval_n"] = 20
    out = tmp_path / "run"
    _run(_write(tmp_path, cfg), out)
    recs = {(r.cell.defense, r.cell.attack): r for r in load_records(out)}
    assert recs["den-a", "pgd"].n == 20 and recs["den-b", "pgd"].n == 60
    # the same examples as the first 20 of every other row
    assert recs["den-a", "clean"].sample_indices == recs["none", "clean"].sample_indices[:20]
    table = (out / "tables" / "results.md").read_text()
    assert "n = 20, 60" in table and "den-a (n = 20)" in table
    cfg["defenses"][1]["eval_n"] = 61
    with pytest.raises(BenchError, match=r"defense 'den-a': eval_n=61 is larger than the evaluation subset"):
        Runner(load_config(_write(tmp_path, cfg, "big.yaml")), tmp_path / "big", progress=False).preflight()
    cfg["defenses"][1]["eval_n"] = 0
    with pytest.raises(ConfigError, match=r"defenses\[1\] \(den-a\)\.eval_n: must be >= 1"):
        load_config(_write(tmp_path, cfg, "zero.yaml"))


def test_a_config_in_parts_runs_part_by_part_and_merges_into_the_whole(tmp_path, capsys):
    """``parts:`` splits the rows into jobs; ``run --part`` runs one (its rows, the targets they need,
    the columns that apply to them); merged, the parts hold every cell of the whole config with the
    identity it has there, and a merge without a part says which part is missing."""
    from benchmark.cli import main
    from benchmark.runner import plan_cells

    cfg = json.loads(json.dumps(BASE))
    cfg["targets"][0]["train"]["deterministic"] = True
    cfg["attacks"].append({"name": "pgd3", "attack": "pgd", "params": {"steps": 3, "step_size": 0.025},
                           "only": ["den-b"]})
    cfg["parts"] = {"first": ["none", "den-a"], "second": ["den-b"]}
    path = _write(tmp_path, cfg)
    assert main(["run", str(path), "--plan"]) == 0
    plan = capsys.readouterr().out
    assert "| first | none, den-a |" in plan and "| second | den-b |" in plan and "--part PART" in plan
    assert main(["run", str(path), "--part", "third", "--plan"]) == 2
    assert "'third' is not a part of config 'runner-test'; parts: first, second" in capsys.readouterr().err
    for part in ("first", "second"):
        assert main(["run", str(path), "--part", part, "--out", str(tmp_path / part), "--no-progress",
                     "--no-report"]) == 0
    assert {r.cell.attack for r in load_records(tmp_path / "first")} == {"clean", "pgd"}  # pgd3: only den-b
    manifest = json.loads((tmp_path / "first" / "manifest.json").read_text())
    assert manifest["config"]["name"] == "runner-test-first"
    assert manifest["config"]["part_of"] == {"config": "runner-test", "part": "first", "parts": ["first", "second"]}

    capsys.readouterr()
    assert main(["report", str(tmp_path / "first"), "--out", str(tmp_path / "half")]) == 0
    index = (tmp_path / "half" / "report" / "index.md").read_text()
    assert "**missing parts** (their rows are not in these tables): runner-test: second" in index
    assert main(["report", str(tmp_path / "first"), str(tmp_path / "second"), "--out", str(tmp_path / "all")]) == 0
    index = (tmp_path / "all" / "report" / "index.md").read_text()
    assert "merged from 2 runs: first (part first of runner-test), second (part second of runner-test)" in index
    assert "missing parts" not in index
    merged = {(r.cell_id, r.cell_hash) for r in map(read_record, (tmp_path / "all" / "records").glob("*.json"))}
    assert merged == {(c.cell_id, c.cell_hash) for c in plan_cells(load_config(path))}
    # a merge merged again with the part it lacked is whole; a run never goes into a merge's folder
    assert main(["report", str(tmp_path / "half"), str(tmp_path / "second"), "--out", str(tmp_path / "again")]) == 0
    assert "missing parts" not in (tmp_path / "again" / "report" / "index.md").read_text()
    assert main(["run", str(path), "--part", "first", "--out", str(tmp_path / "all"), "--no-progress"]) == 2
    assert "holds a merge of runs" in capsys.readouterr().err
    # the binarization test's named column stays in a part without its rows: every row's checks keep their identity
    from benchmark.experiment import select_part
    from benchmark.runner import checks_hash

    named = load_config(path, {"eval.checks.active": {"attack": "pgd3"}})
    part = select_part(named, "first", "test")
    assert [a.only for a in part.attacks if a.name == "pgd3"] == [[]]
    ds, at = named.datasets[0], named.targets[0]
    assert [checks_hash(part, ds, at, d) for d in part.defenses] == [checks_hash(named, ds, at, d)
                                                                      for d in named.defenses[:2]]
    cfg["parts"] = {"first": ["none", "den-a"], "second": ["den-a"]}
    with pytest.raises(ConfigError, match=r"parts\.second: row 'den-a' is in part 'first' already"):
        load_config(_write(tmp_path, cfg, "twice.yaml"))
    cfg["parts"] = {"first": ["none", "den-a"]}
    with pytest.raises(ConfigError, match=r"parts: rows \['den-b'\] are in no part"):
        load_config(_write(tmp_path, cfg, "short.yaml"))
    cfg["parts"] = {"first": ["none", "den-a", "den-c"], "second": ["den-b"]}
    with pytest.raises(ConfigError, match=r"parts\.first: \['den-c'\] are not defenses of this config"):
        load_config(_write(tmp_path, cfg, "unknown.yaml"))
    del cfg["parts"]
    assert main(["run", str(_write(tmp_path, cfg, "whole.yaml")), "--part", "first", "--plan"]) == 2
    assert "has no parts" in capsys.readouterr().err


def test_report_merges_parts_that_share_their_target_and_refuses_others(tmp_path):
    """Parts of one matrix run as separate jobs, each retraining the same deterministic target;
    ``report A B --out M`` builds one set of tables. Parts whose target differs, or that computed
    one cell differently, are refused in one line, and a merge never writes into a run."""

    def report(*args):
        return subprocess.run([sys.executable, "run_benchmark.py", "report", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    base = json.loads(json.dumps(BASE))
    base["targets"][0]["train"]["deterministic"] = True
    part_a = base | {"name": "part-a", "defenses": [{"name": "none"}]}
    part_b = base | {"name": "part-b", "defenses": [BASE["defenses"][1]]}
    _run(_write(tmp_path, part_a, "a.yaml"), tmp_path / "a")
    _run(_write(tmp_path, part_b, "b.yaml"), tmp_path / "b")
    sha = {r.target["checkpoint_sha256"] for run in ("a", "b") for r in load_records(tmp_path / run)}
    assert len(sha) == 1  # retrained in another "job", bit-identical
    merged = tmp_path / "merged"
    r = report(tmp_path / "a", tmp_path / "b", "--out", merged)
    assert r.returncode == 0, r.stderr
    md = (merged / "tables" / "results.md").read_text()
    assert "| none |" in md and "| den-a |" in md
    assert sorted(r.cell.defense for r in load_records(merged)) == ["den-a", "den-a", "none", "none"]
    assert (merged / "report" / "index.md").is_file() and len(list((merged / "checks").glob("*.json"))) == 2
    assert json.loads((merged / "manifest.json").read_text())["merged_from"][1]["run"] == str(tmp_path / "b")
    # merging again into the same folder is fine (it is a merge), into a run is not
    assert report(tmp_path / "a", tmp_path / "b", "--out", merged).returncode == 0

    def refused(*args, expected):
        r = report(*args)
        err = r.stderr.strip()
        assert r.returncode == 2 and len(err.splitlines()) == 1 and expected in err, err

    refused(tmp_path / "a", tmp_path / "b", "--out", tmp_path / "a", expected="is one of the runs being merged")
    refused(tmp_path / "a", tmp_path / "b", expected="give --out DIR")
    # one cell computed with other settings in another part
    other_cell = json.loads(json.dumps(part_a)) | {"name": "part-a2"}
    other_cell["attacks"] = [{"name": "pgd", "params": {"steps": 3, "step_size": 0.025}}]
    _run(_write(tmp_path, other_cell, "a2.yaml"), tmp_path / "a2")
    refused(tmp_path / "a", tmp_path / "a2", "--out", tmp_path / "m1",
            expected="cell digits__at__none__pgd was computed differently")
    # a part whose target was trained differently: its rows cannot join the table
    other = json.loads(json.dumps(part_b)) | {"name": "part-c"}
    other["targets"][0]["train"]["epochs"] = 1
    _run(_write(tmp_path, other, "c.yaml"), tmp_path / "c")
    refused(tmp_path / "a", tmp_path / "c", "--out", tmp_path / "m2", expected="target digits/at differs between")
    assert not (tmp_path / "m2" / "records").exists()
