"""The plan's cost model: a pass never costs less than the defense's latency, a target's epoch never
less than its steps at the per-step floor, and determinism is charged."""

import math
import re
from pathlib import Path

import pytest

from benchmark.errors import BenchError
from benchmark.experiment import load_config
from benchmark.plan import Costs, Planner, Stage, cluster_wall
from benchmark.registry import DEFENSES
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


def test_run_progress_weights_the_remaining_time_by_each_stage_cost(tmp_path):
    """The remaining time is the estimate of what is left, scaled by the speed this run has shown
    on stages of the same kind (training apart from evaluation)."""
    from benchmark.plan import RunProgress

    planner = _planner(tmp_path)
    stages = planner.stages()
    eta = RunProgress(stages, len(planner.runner.pending()))
    cells = [s for s in stages if s.kind == "cells"]
    assert all(abs(sum(s.parts.values()) - s.seconds) < 1e-6 for s in cells)  # every cell has its share
    assert eta.text() == ""  # nothing finished yet: no estimate
    target = next(s for s in stages if s.kind == "target")
    eta.mark -= 30.0  # the target took 30 s
    eta.done("target", target.what)
    train_rate = 30.0 / target.seconds
    left = sum(map(sum, eta.left.values())) * train_rate  # only training measured: everything at its rate
    assert abs(eta.remaining_seconds() - left) / left < 0.01
    cell_id, share = next(iter(cells[0].parts.items()))
    eta.mark -= 10.0  # then a cell took 10 s
    eta.done("cell", cell_id)
    eval_rate = 10.0 / share
    expected = sum(sum(q) * (train_rate if RunProgress.group(k) == "train" else eval_rate)
                   for (k, _), q in eta.left.items())
    assert abs(eta.remaining_seconds() - expected) / expected < 0.01
    before = eta.done_estimate
    eta.done("cell", "not-a-cell")  # a cell the plan did not list: counted, no estimate moves
    assert eta.done_estimate == before
    assert eta.cell_text().startswith(f"2/{eta.cells} cells, about ")
    other_id, other_share = list(cells[0].parts.items())[1]
    eta.mark -= 50.0  # a cell that failed after 50 s: left out, its time not charged to anything
    eta.skip("cell", other_id)
    assert eta.cells_done == 3 and ("cell", other_id) not in eta.left
    assert abs(eta.remaining_seconds() - (expected - other_share * eval_rate)) / expected < 0.01


def test_on_a_cpu_each_stage_takes_its_measured_factor(tmp_path):
    """A CPU run's remaining time and the CPU line of --plan: each stage's H100 estimate times the
    factor costs.yaml gives its kind and defense (a target: its method); a defense without one takes
    the section's default, marked as a guess."""
    from benchmark.plan import RunProgress, Stage, format_plan

    planner = _planner(tmp_path)
    costs = planner.costs.table
    h100, cpu = planner.stages(), planner.stages(cpu=True)
    assert [(s.kind, s.what) for s in h100] == [(s.kind, s.what) for s in cpu]
    for a, b in zip(h100, cpu):
        section = costs.get(f"cpu_{a.kind}")
        if section is None:  # the data stage: as on the GPU
            assert b.seconds == a.seconds
            continue
        factor = section[a.about]["x"]
        assert a.about and abs(b.seconds - a.seconds * factor) < 1e-9
        assert abs(sum(b.parts.values()) - b.seconds) < 1e-6 if b.parts else True
    plugin = Stage("cells", "digits/at/mine", 2.0, False, parts={"c": 2.0}, about="my-plugin").on_cpu(planner.costs)
    assert plugin.guess and plugin.seconds == 2.0 * costs["cpu_cells"]["default"]["x"]
    eta = RunProgress.of(planner.runner, 5)  # this runner's device is the CPU
    assert abs(sum(map(sum, eta.left.values())) - sum(s.seconds for s in cpu if s.kind != "data")) < 1e-6

    smoke = Planner(Runner(load_config(ROOT / "configs" / "smoke" / "default.yaml"), tmp_path / "none", device="cpu"))
    text = format_plan(smoke.runner, smoke, "default.yaml")
    cpu_total = sum(s.seconds for s in smoke.stages(cpu=True))
    assert f"on a 2-core CPU (this run's device): about {cpu_total / 60:.1f} min" in text
    quick = format_plan(planner.runner, planner, "cuda.yaml")  # a CUDA smoke on the CPU: estimated too
    assert "on a 2-core CPU" in quick
    big = Planner(Runner(load_config(ROOT / "configs" / "quick" / "cifar10_dir.yaml"), tmp_path / "n", device="cpu"))
    assert "on a CPU (this run's device): not estimated" in format_plan(big.runner, big, "cifar10_dir.yaml")
    assert not (tmp_path / "none").exists() and not (tmp_path / "n").exists()


def test_heartbeat_says_what_is_running_when_the_log_is_quiet(caplog):
    import logging
    import time

    from benchmark import logs

    caplog.set_level(logging.INFO, logger="purifybench")
    propagate, logs.log.propagate = logs.log.propagate, True
    try:
        def still():
            return [r.getMessage() for r in caplog.records if r.getMessage().startswith("still ")]

        with logs.heartbeat(every=0.2, eta=lambda: "about 1 min 05 s left"), logs.activity("digits__at__EBM__pgd"):
            logs.step("batch", 1, 4)
            deadline = time.monotonic() + 10
            while not still() and time.monotonic() < deadline:
                time.sleep(0.05)
        lines = still()
        assert lines and lines[0].startswith("still digits__at__EBM__pgd: ")
        assert "batch 1/4 done" in lines[0] and lines[0].endswith("about 1 min 05 s left")
        assert logs.heartbeat_line() is None  # the activity ended: nothing to say
        caplog.clear()
        with logs.heartbeat(every=0.2, eta=lambda: 1 / 0):  # a failing estimate does not stop the beat
            with logs.activity("training"):
                deadline = time.monotonic() + 10
                while not still() and time.monotonic() < deadline:
                    time.sleep(0.05)
        assert still() and still()[0].startswith("still training: ")
    finally:
        logs.log.propagate = propagate


CONFIGS = ROOT / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))
DAY = 24 * 3600
# Paper configs over a day on one H100, each with its header's reason (checked below).
OVER_A_DAY = {"cifar10_table3.yaml": "ME-Net-A's official training"}


def _plan_of(path, tmp_path) -> tuple[Planner, list]:
    """The plan of a shipped config as `run --plan` makes it, on a machine without a GPU."""
    runner = Runner(load_config(path), tmp_path / "never-written", plan_only=True)
    planner = Planner(runner)
    return planner, planner.stages()


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(CONFIGS)) for p in SHIPPED])
def test_every_stage_of_a_shipped_config_has_an_estimate_none_silently_a_default(path, tmp_path):
    """Every target to train, defense to train, row's checks and row's cells has a stage with a positive
    finite estimate, and no figure behind it is a section's `default` entry (a key without a figure
    of its own): what a shipped config costs is measured, derived, or a guess that says so."""
    planner, stages = _plan_of(path, tmp_path)
    cfg = planner.cfg
    assert all(math.isfinite(s.seconds) and s.seconds > 0 for s in stages), [s for s in stages if not s.seconds > 0]
    rows = {f"{c.dataset.name}/{c.target.name}/{c.defense.name}" for c in planner.runner.cells}
    assert {s.what for s in stages if s.kind == "cells"} == rows
    trained = {f"{ds.name}/{t.name}" for ds in cfg.datasets for t in cfg.targets if t.train is not None}
    assert {s.what for s in stages if s.kind == "target"} == trained
    # one defense stage per distinct training (rows that differ in inference options only share one)
    trainings = {planner.defense_artifact(c.dataset, c.defense, c.target)[0] for c in planner.runner.cells
                 if DEFENSES.get(c.defense.registered).trainable and c.defense.checkpoint is None
                 and (c.defense.trained_against or c.target.name) == c.target.name}
    assert len([s for s in stages if s.kind == "defense"]) == len(trainings)
    defaults = [k for k, how in planner.costs.used.items() if how == "default"]
    assert not defaults, f"{path.name}: figures taken from a section's default: {defaults}"
    if cfg.profile != "smoke":
        assert not planner.costs.guessed(), f"{path.name}: guessed figures {planner.costs.guessed()}"


PAPER = sorted((CONFIGS / "paper").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPER, ids=[p.name for p in PAPER])
def test_a_paper_config_fits_a_day_on_one_h100_or_says_why(path, tmp_path, capsys):
    from benchmark.cli import main

    assert main(["run", str(path), "--plan", "--out", str(tmp_path / "never-written")]) == 0
    text = capsys.readouterr().out
    total = sum(s.seconds for s in _plan_of(path, tmp_path)[1])
    assert "no stage rests on a guess" in text  # else the line names the guessed share and figures
    if path.name not in OVER_A_DAY:
        assert total <= DAY, f"{path.name}: {total / 3600:.1f} h on one H100"
        assert "over a day" not in text
        return
    assert total > DAY  # (else take it off the list)
    header = path.read_text()
    assert OVER_A_DAY[path.name] in header and "8 GPUs" in header
    wall = re.search(r"about ([\d.]+) h wall on 8 GPUs", text)
    assert wall and float(wall.group(1)) < total / 3600
    hours = float(wall.group(1))  # the header's figure is the plan's, rounded
    assert any(f"about {h} h wall" in header for h in {math.floor(hours), math.ceil(hours)}), hours


def test_cluster_wall_places_the_longest_jobs_first_one_array_after_another():
    stages = [Stage("target", "d/t1", 100, False), Stage("target", "d/t2", 50, False),
              Stage("defense", "d/A", 300, False), Stage("pairs", "d/t1", 10, False),
              Stage("defense", "d/B", 200, False), Stage("defense", "d/C", 150, False),
              Stage("checks", "d/t1/A", 5, False), Stage("cells", "d/t1/A", 40, False),
              Stage("cells", "d/t1/B", 30, False), Stage("data", "d", 1000, False)]
    # 2 GPUs, longest first on the GPU free first: targets 100 | 50 -> 100; trainings 300 | 200 + 150,
    # the pairs (10) on the first -> 350; rows (checks with cells) 45 | 30 -> 45. Data: inside each job.
    wall, (job, seconds) = cluster_wall(stages, gpus=2)
    assert wall == 100 + 350 + 45
    assert (job, seconds) == ("defense d/A", 300)
    assert cluster_wall(stages, gpus=8)[0] == 100 + 300 + 45
    # one defense name trained for two targets: two jobs, not one of their sum
    twice = [Stage("defense", "d/A", 300, False), Stage("defense", "d/A", 300, False)]
    assert cluster_wall(twice, gpus=2) == (300, ("defense d/A", 300))


def test_plan_of_a_gpu_config_runs_without_a_gpu_and_ebm_attack_chains_price_the_attack(tmp_path):
    """`--plan` loads nothing, so it answers for `device: cuda` configs on a CPU machine; the EBM's
    attack passes cost its attack_chains, its predictions its chains."""
    import torch

    path = CONFIGS / "paper" / "cifar10_table3.yaml"
    if not torch.cuda.is_available():
        with pytest.raises(BenchError, match="CUDA is not available"):
            Runner(load_config(path), tmp_path / "x")
    planner, _ = _plan_of(path, tmp_path)
    ebm = next(d for d in planner.cfg.defenses if d.registered == "ebm")
    assert ebm.options["attack_chains"] == 1 and ebm.eval_n == 500
    step = planner.costs.table["pass_us"]["ebm"]["us"] * 1500
    assert abs(planner.pass_us(ebm).value - step * 1) < 1e-9
    assert abs(planner.pass_us(ebm, gradient=False).value - step * 150) < 1e-9
    # a pass over 500 images runs in two batches of 250, each at least the latency floor
    floor = planner.costs.table["pass_ms"]["ebm"]["ms"] * 1e-3 * 1500
    assert abs(planner.pass_seconds(ebm, 500).value - 2 * max(floor, 250 * step * 1e-6)) < 1e-9
    # a prediction of the EBM takes its Langevin gradients too: the whole pass, over 150 chains
    assert abs(planner.pass_seconds(ebm, 500, gradient=False).value - 2 * max(floor, 250 * step * 150e-6)) < 1e-6


def test_every_cost_figure_says_where_it_comes_from():
    """Each entry of costs.yaml is exactly one of measured (where), derived (how) or guess: true."""
    table = Costs().table

    def entries(node, path=""):
        if isinstance(node, dict) and any(k in node for k in ("s", "us", "ms", "x", "n")):
            yield path, node
        elif isinstance(node, dict):
            for k, v in node.items():
                yield from entries(v, f"{path}.{k}" if path else k)

    found = list(entries(table))
    assert len(found) > 60
    for path, entry in found:
        labels = [k for k in ("measured", "derived", "guess") if entry.get(k)]
        assert len(labels) == 1, (path, entry)
