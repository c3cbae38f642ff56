"""Cluster runs through submitit's local executor (the same path as Slurm: job arrays for targets,
then defenses, then cells, in separate processes), and several workers on one results folder."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from purifybench_testing import menet_matrix

from benchmark.cluster import Share, ShareResult, Task, plan_stages, split, work
from benchmark.experiment import load_config
from benchmark.locks import OwnerLock
from benchmark.records import RecordError, valid_record
from benchmark.runner import Runner

pytest.importorskip("submitit")

ROOT = Path(__file__).resolve().parent.parent

CFG = menet_matrix("cluster-test", n=60, batch_size=30, checks_n=20)


def _cfg(tmp_path, cfg=CFG):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env():
    # the workers must import this checkout (it is also installed in CI), one thread each
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / "run_benchmark.py"), "run", *map(str, args), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env())


def _records(out):
    return {p.stem: valid_record(p) for p in sorted((out / "records").glob("*.json"))}


def test_stages_and_shares_follow_the_plan(tmp_path):
    runner = Runner(load_config(_cfg(tmp_path)), tmp_path / "out", progress=False)
    stages = plan_stages(runner)
    assert stages["targets"] == [Task("target", "digits", "at")]
    assert stages["defenses"] == [Task("defense", "digits", "at", "ME-Net")]  # "none" has nothing to train
    cells = stages["cells"]
    assert [t.kind for t in cells] == ["checks", "cell", "cell", "cell"] * 2
    shares = split("cells", cells, None)
    assert [len(s) for s in shares] == [4, 4] and {t.defense for t in shares[1]} == {"ME-Net"}  # one per row
    assert split("cells", cells, 1) == [cells]
    assert len(split("targets", [Task("target", "d", str(i)) for i in range(5)], 2)) == 2


def test_a_share_crosses_as_json_and_a_foreign_one_is_refused_in_one_line(tmp_path):
    runner = Runner(load_config(_cfg(tmp_path)), tmp_path / "out", progress=False)
    tasks = plan_stages(runner)["cells"]
    share = Share("cells", tasks, runner.cfg, str(tmp_path / "out"), "cpu", False, 1, None)
    data = json.loads(json.dumps(share.to_json()))  # plain data: what submitit pickles
    assert data["schema"] == "purifybench-share/1" and data["tasks"][1]["kind"] == "cell"
    back = Share.from_json(data)
    assert back == share and back.tasks[1].cell_id == tasks[1].cell_id
    for change, message in ((lambda d: d.update(schema="purifybench-share/0"), "another version"),
                            (lambda d: d["tasks"][0].update(kind="train"), r"tasks\[0\]: task kind 'train'"),
                            (lambda d: d["tasks"][1].pop("cell_id"), "cell_id"),
                            (lambda d: d["cfg"]["eval"].update(draws=0), "cfg.eval.draws"),
                            (lambda d: d.update(stage="train"), "stage 'train'")):
        bad = json.loads(json.dumps(data))
        change(bad)
        with pytest.raises(RecordError, match=message) as info:
            Share.from_json(bad)
        assert "\n" not in str(info.value)
    # a worker handed a foreign share reports it as a failure instead of running anything
    result = ShareResult.from_json(work(dict(data, schema="purifybench-share/0")))
    assert result.computed == 0 and "another version" in result.failed[0]
    with pytest.raises(RecordError, match="Task|kind"):
        Task("cell", "digits", "at", "none")  # a cell task without its cell


def test_local_executor_runs_the_matrix_and_matches_a_plain_run(tmp_path):
    cfg = _cfg(tmp_path)
    out = tmp_path / "cluster"
    r = _cli(cfg, "--out", out, "--executor", "local", "--jobs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((out / "cluster.json").read_text())
    assert [(s["stage"], s["tasks"], len(s["jobs"])) for s in state["stages"]] == [
        ("targets", 1, 1), ("defenses", 1, 1), ("cells", 8, 2)]
    assert state["summary"]["computed"] == 6 and not state["summary"]["failed"]
    records = _records(out)
    assert len(records) == 6 and all(records.values())
    workers = {rec.worker["pid"] for rec in records.values()}
    assert len(workers) == 2 and os.getpid() not in workers  # two array elements, not the submitter
    assert len(list((out / "checks").glob("*.json"))) == 2
    assert "| Checks |" in (out / "tables" / "results.md").read_text()
    assert not list(out.rglob("*.lock")) and not list(out.rglob("*.tmp"))

    # the same cells from a plain run on the same artifacts: identical per sample
    plain = tmp_path / "plain"
    shutil.copytree(out / "artifacts", plain / "artifacts")
    r2 = _cli(cfg, "--out", plain)
    assert r2.returncode == 0, r2.stderr[-3000:]
    for cell, rec in _records(plain).items():
        assert rec.correct == records[cell].correct and rec.correct_draws == records[cell].correct_draws, cell
        assert (rec.forwards, rec.backwards) == (records[cell].forwards, records[cell].backwards)

    # nothing left to do: no stage is submitted
    r3 = _cli(cfg, "--out", out, "--executor", "local")
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert json.loads((out / "cluster.json").read_text())["stages"] == []
    assert "0 computed" in r3.stderr


def test_two_workers_on_one_folder_compute_each_cell_once(tmp_path):
    cfg = json.loads(json.dumps(CFG))
    cfg["defenses"] = [{"name": "none"}]
    cfg["attacks"] += [{"name": f"pgd{k}", "attack": "pgd", "params": {"steps": 2 + k, "step_size": 0.025}}
                       for k in range(4)]
    path = _cfg(tmp_path, cfg)
    out = tmp_path / "shared"
    cmd = [sys.executable, str(ROOT / "run_benchmark.py"), "run", str(path), "--out", str(out), "--no-progress"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in logs]
    computed = [int(re.search(r"(\d+) computed", err).group(1)) for _, err in logs]
    records = _records(out)
    assert len(records) == 7 and all(records.values())
    assert sum(computed) == 7  # every cell once, none twice
    run_log = (out / "run.log").read_text()
    assert run_log.count("target digits/at: training") == 1  # the other worker waited for the artifact
    assert not list(out.rglob("*.lock"))


def test_a_cell_held_by_a_live_worker_is_left_to_it(tmp_path):
    cfg = json.loads(json.dumps(CFG))
    cfg["defenses"] = [{"name": "none"}]
    cfg["eval"]["checks"] = {"enabled": False}
    runner = Runner(load_config(_cfg(tmp_path, cfg)), tmp_path / "out", progress=False)
    held = OwnerLock(tmp_path / "out" / "locks" / f"{runner.cells[1].cell_id}.lock")
    assert held.acquire()  # another worker (a live process on this host) computes it
    summary = runner.run()
    assert summary["computed"] == 2 and summary["busy"] == [runner.cells[1].cell_id]
    assert not runner.record_path(runner.cells[1]).exists()
    held.release()
    again = Runner(load_config(_cfg(tmp_path, cfg)), tmp_path / "out", progress=False).run()
    assert again["computed"] == 1 and again["busy"] == []
