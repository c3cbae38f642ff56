"""Gradient-masking checks: a masked toy defense and ME-Net without BPDA are flagged; the
target alone (AT) and the same defenses attacked properly are not; the flags reach the tables."""

import copy
import json

import pytest

from attacks.base import Threat
from benchmark.config import ConfigError
from benchmark.harness import run_attack
from benchmark.masking import ChecksSpec, flag_text, run_checks, tolerance, valid_checks
from benchmark.registry import ATTACKS, DEFENSES
from defenses.base import DefendedModel, NoDefense

THREAT = Threat("linf", 0.1)
SPEC = ChecksSpec(n=64, steps=5, more_steps=20, eps_multipliers=[3.0, 6.0], square_queries=200, eot=2, repeats=2)


@pytest.fixture(scope="module")
def rows(digits_test):
    sub = digits_test.subset(64, seed=2)
    return sub.as_float(), sub.labels


def _checks(model, rows):
    x, y = rows
    return run_checks(model, x, y, THREAT, SPEC, seed=0, batch_size=64)


def test_the_at_target_alone_passes_every_check(trained_pair, rows):
    out = _checks(DefendedModel(NoDefense(), copy.deepcopy(trained_pair["at"][0])), rows)
    r = out["results"]
    assert out["flags"] == [] and out["passed"], r
    assert r["steps"]["accuracy"][1] <= r["steps"]["accuracy"][0] + r["steps"]["tolerance"]
    assert r["eps"]["accuracy"][-1] <= 0.2  # falls towards chance as eps grows
    assert r["square"]["accuracy"] >= r["square"]["whitebox_accuracy"] - r["square"]["tolerance"]
    assert "eot" not in r  # deterministic: no EOT check
    assert r["backwards"] > 0 and r["forwards"] > r["backwards"]


def test_a_quantizing_defense_without_bpda_is_flagged_and_with_bpda_is_not(trained_pair, rows):
    from purifybench_testing import Quantize

    target = trained_pair["at"][0]
    masked = _checks(DefendedModel(Quantize(), copy.deepcopy(target), bpda=False), rows)
    assert "zero-grad" in masked["flags"]
    # the gradient is zero, so PGD never moves: Square and large eps expose it
    assert "square" in masked["flags"] or "eps" in masked["flags"], masked["results"]
    honest = _checks(DefendedModel(Quantize(), copy.deepcopy(target), bpda=True), rows)
    assert "zero-grad" not in honest["flags"] and "square" not in honest["flags"], honest["results"]


def test_menet_without_bpda_is_flagged(trained_pair, rows):
    menet = DEFENSES.get("menet")()
    target = copy.deepcopy(trained_pair["at"][0])
    naive = _checks(DefendedModel(menet, target, bpda=False), rows)
    assert naive["results"]["stochastic"] and "eot" in naive["results"]
    assert "zero-grad" in naive["flags"], naive["results"]
    bpda = _checks(DefendedModel.for_defense(menet, target), rows)
    assert "zero-grad" not in bpda["flags"], bpda["results"]
    assert len(bpda["results"]["eot"]["repeats"]) == SPEC.repeats


def test_tolerance_grows_with_randomness_and_shrinks_with_n():
    assert tolerance(0.5, 0.5, 100, False) == 0.02
    assert tolerance(0.5, 0.5, 10, False) == 0.2
    assert tolerance(0.5, 0.5, 100, True) > tolerance(0.5, 0.5, 1000, True) > 0.02


def test_flag_text():
    assert flag_text(None) == "n/a" and flag_text(None, cell_masked=True) == "zero-grad"
    assert flag_text({"flags": []}) == "ok"
    assert flag_text({"flags": ["square", "zero-grad"]}) == "zero-grad, square"


def test_square_attack_stays_in_the_ball_and_is_counted_without_backwards(trained_pair, rows):
    x, y = rows
    model = DefendedModel(NoDefense(), copy.deepcopy(trained_pair["natural"][0]))
    clean = run_attack(ATTACKS.get("clean")(), model, x, y, THREAT, batch_size=64)
    out = run_attack(ATTACKS.get("square")(n_queries=300), model, x, y, THREAT, batch_size=64)
    assert out.backwards == 0 and out.forwards > 64
    assert out.accuracy < clean.accuracy - 0.2, (out.accuracy, clean.accuracy)  # breaks a natural model


def test_bad_checks_config_is_one_line_error():
    from benchmark.config import from_dict

    with pytest.raises(ConfigError, match="checks.more_steps"):
        from_dict(ChecksSpec, {"steps": 10, "more_steps": 5}, "eval.checks")
    with pytest.raises(ConfigError, match="checks.eps_multipliers"):
        from_dict(ChecksSpec, {"eps_multipliers": [0.5]}, "eval.checks")


def test_runner_writes_checks_and_the_tables_show_the_flags(tmp_path):
    from test_runner import BASE, _run, _write

    cfg = json.loads(json.dumps(BASE))
    cfg["defenses"] = [{"name": "none"}]
    cfg["eval"] = dict(cfg.get("eval", {}), checks={"n": 32, "steps": 3, "more_steps": 6,
                                                    "eps_multipliers": [4.0], "square_queries": 30})
    path = _write(tmp_path, cfg)
    out = tmp_path / "run"
    _run(path, out)
    files = sorted((out / "checks").glob("*.json"))
    assert len(files) == 1
    rec = valid_checks(files[0])
    assert rec is not None and rec["results"]["n"] == 32 and rec["row"]["defense"] == "none"
    md = (out / "tables" / "results.md").read_text()
    assert "| Checks |" in md and "Carlini" in md
    assert (out / "tables" / "checks.md").is_file()
    assert r"& Checks \\" in (out / "tables" / "results.tex").read_text()
    # a rerun recomputes nothing; a tampered checks file is recomputed, not trusted
    mtime = files[0].stat().st_mtime_ns
    assert _run(path, out)["computed"] == 0 and files[0].stat().st_mtime_ns == mtime
    data = json.loads(files[0].read_text())
    data["flags"] = []
    data["results"]["square"]["accuracy"] = 1.0
    files[0].write_text(json.dumps(data))
    assert valid_checks(files[0]) is None
    _run(path, out)
    assert valid_checks(files[0]) is not None
    # switched off: no checks run, the tables have no column
    cfg["eval"]["checks"] = {"enabled": False}
    out2 = tmp_path / "run2"
    _run(_write(tmp_path, cfg), out2)
    assert not (out2 / "checks").exists() and "Checks" not in (out2 / "tables" / "results.md").read_text()
