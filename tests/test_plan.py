"""The plan's cost model: a pass never costs less than the defense's latency, a target's epoch never
less than its steps at the per-step floor, and determinism is charged."""

from pathlib import Path

from benchmark.experiment import load_config
from benchmark.plan import Costs, Planner
from benchmark.runner import Runner

ROOT = Path(__file__).resolve().parent.parent


def _planner(tmp_path) -> Planner:
    cfg = load_config(ROOT / "configs" / "smoke" / "cuda.yaml")
    return Planner(Runner(cfg, tmp_path / "never-written", device="cpu"))


def test_a_pass_costs_the_larger_of_its_latency_and_its_images(tmp_path):
    planner = _planner(tmp_path)
    aid = next(d for d in planner.cfg.defenses if d.name == "AID")
    costs = planner.costs.table
    latency = costs["pass_ms"]["aid"]["ms"] * 1e-3
    per_image = costs["pass_us"]["aid"]["us"] * 1e-6
    assert planner.pass_seconds(aid, 1).value == latency  # a small batch waits on the loop
    big = int(10 * latency / per_image)
    assert abs(planner.pass_seconds(aid, big).value - big * per_image) < 1e-9
    ebm = next(d for d in planner.cfg.defenses if d.name == "EBM")  # per Langevin step: the chains are one batch
    floor = costs["pass_ms"]["ebm"]["ms"] * 1e-3 * ebm.options["steps"]
    assert abs(planner.pass_seconds(ebm, 1).value - floor) < 1e-9


def test_target_estimate_has_a_step_floor_and_charges_determinism(tmp_path):
    planner = _planner(tmp_path)
    target = planner.cfg.targets[0]
    assert target.train.deterministic
    costs = Costs().table
    floor = costs["target_step_ms"]["at"]["ms"] * 1e-3
    steps = -(-4096 // target.train.batch_size)
    expected = target.train.epochs * steps * floor * costs["deterministic_factor"]["x"]
    est = planner.target_estimate(target, 4096)
    assert abs(est.seconds - expected) < 1e-6 and not est.guess
    # With a large batch on 50,000 images the per-epoch figure is the larger one.
    target.train.batch_size = 1024
    full = planner.target_estimate(target, 50_000)
    per_epoch = costs["target_epoch_50k"]["at"]["s"]
    assert abs(full.seconds - target.train.epochs * per_epoch * costs["deterministic_factor"]["x"]) < 1e-6
