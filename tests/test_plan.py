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
