"""torchrun on the CPU (gloo, 2 processes): the sharded run writes the same records as a single
process, stochastic defenses included, with the target trained by DistributedDataParallel."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from purifybench_testing import menet_matrix

from benchmark.records import valid_record

ROOT = Path(__file__).resolve().parent.parent

CFG = menet_matrix("ddp-test", n=100, batch_size=25, checks_n=25)


def _cli(out, cfg, torchrun: bool):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] \
        if torchrun else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd + [str(ROOT / "run_benchmark.py"), "run", str(cfg), "--out", str(out), "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _records(out):
    return {p.stem: valid_record(p) for p in sorted((out / "records").glob("*.json"))}


@pytest.mark.skipif(not shutil.which("true"), reason="needs a POSIX shell")
def test_torchrun_two_cpu_ranks_equal_one_process(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(CFG))
    single, multi = tmp_path / "single", tmp_path / "multi"
    _cli(single, cfg_path, torchrun=False)
    # the same trained target in both runs, so that the comparison is of the sharded evaluation
    shutil.copytree(single / "artifacts", multi / "artifacts")
    _cli(multi, cfg_path, torchrun=True)
    one, two = _records(single), _records(multi)
    assert set(one) == set(two) and len(one) == 6
    for cell, rec in one.items():
        other = two[cell]
        assert other is not None and other.ranks == 2 and rec.ranks is None
        assert other.correct == rec.correct, cell  # per-sample identical, ME-Net's randomness included
        assert (other.correct_draws, other.correct_majority) == (rec.correct_draws, rec.correct_majority), cell
        assert (other.forwards, other.backwards) == (rec.forwards, rec.backwards), cell
        assert other.gradient_check == rec.gradient_check, cell
    checks = sorted((multi / "checks").glob("*.json"))
    assert len(checks) == 2  # written once, by rank 0
    assert not list(multi.rglob("*.tmp"))
    assert "| Checks |" in (multi / "tables" / "results.md").read_text()


def test_torchrun_trains_the_target_with_ddp(tmp_path):
    cfg = json.loads(json.dumps(CFG))
    cfg["defenses"] = [{"name": "none"}]
    cfg["attacks"] = [{"name": "clean"}]
    cfg["eval"]["checks"] = {"enabled": False}
    cfg["targets"][0]["train"].update(epochs=4, lr=0.1)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    r = _cli(out, cfg_path, torchrun=True)
    assert r.stderr.count("training small-cnn") == 1 and "(DDP over 2 ranks)" in r.stderr  # rank 0 reports
    targets = list((out / "artifacts" / "targets").glob("*.safetensors"))
    assert len(targets) == 1
    rec = next(iter(_records(out).values()))
    assert rec.accuracy > 0.5  # the DDP-trained target learned


_DP_WORKER = r"""
import hashlib, json, sys
import torch
from benchmark import distributed
from benchmark.data import load_dataset
from benchmark.models import create_model
from benchmark.registry import DEFENSES
from defenses.base import TrainContext

distributed.init_from_env(torch.device("cpu"))
torch.manual_seed(distributed.rank())  # different starts on purpose: fit() must broadcast rank 0's
data = load_dataset("digits", "train", n=192, seed=0, size=16)
clf = create_model("small-cnn", in_channels=1, mean=data.mean, std=data.std).eval()
distributed.broadcast_module(clf)
out = {}
for name, opts, train in [
    ("hgd", dict(in_channels=1, width_scale=0.125), dict(epochs=1, batch_size=64, eps=0.1, step_size=0.025,
                                                         attack_steps=1, progress=False)),
    ("menet", {}, dict(epochs=1, batch_size=64, lr=0.05, init="target", augment=False, eps=0.1,
                       step_size=0.025, progress=False)),
]:
    cls = DEFENSES.get(name)
    d = cls(**opts)
    if hasattr(d, "attach_classifier"):
        d.attach_classifier(clf)
    d.fit(clf, data, TrainContext("cpu", 0), cls.TrainConfig(**train))
    # parameters: kept in step by the averaged gradients (BatchNorm statistics are each rank's own, as
    # under DDP; the runner hands every rank rank 0's after training)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in d.parameters())).hexdigest()
    out[name] = distributed.gather(digest)
if distributed.is_main():
    print("RESULT " + json.dumps(out), flush=True)
distributed.barrier()
distributed.shutdown()
"""


def test_data_parallel_defense_training_keeps_the_ranks_in_step(tmp_path):
    """HGD (hand-rolled gradient averaging) and ME-Net (DDP) trained by 2 gloo ranks, each on its part
    of every batch and from different initial weights: the ranks end with identical weights."""
    script = tmp_path / "dp.py"
    script.write_text(_DP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.split("RESULT ", 1)[1])
    for name, digests in result.items():
        assert len(digests) == 2 and digests[0] == digests[1], name


def test_torchrun_trains_a_data_parallel_defense_with_every_rank(tmp_path):
    cfg = json.loads(json.dumps(CFG))
    cfg["defenses"] = [{"name": "HGD", "defense": "hgd", "options": {"width_scale": 0.125},
                        "train": {"epochs": 1, "batch_size": 64, "eps": 0.1, "step_size": 0.025, "attack_steps": 1}}]
    cfg["attacks"] = [{"name": "clean"}]
    cfg["eval"]["checks"] = {"enabled": False}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    r = _cli(out, cfg_path, torchrun=True)
    assert "defense digits/HGD: training on cpu (data-parallel over 2 ranks)" in r.stderr
    assert len(list((out / "artifacts" / "defenses").glob("*.safetensors"))) == 1
    assert not list(out.rglob("*.lock")) and all(_records(out).values())
