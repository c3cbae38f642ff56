"""Gradient-masking checks: a masked toy defense and ME-Net without BPDA are flagged; the
target alone (AT) and the same defenses attacked properly are not; the flags reach the tables."""

import copy
import dataclasses
import json

import pytest
import torch

from attacks.base import Threat
from benchmark.active import ActiveSpec
from benchmark.config import ConfigError
from benchmark.errors import BenchError
from benchmark.harness import run_attack
from benchmark.masking import (
    BaselineCheck,
    CheckResults,
    ChecksRecord,
    ChecksSpec,
    DegenerateCheck,
    EpsCheck,
    Paired,
    RowKey,
    SquareCheck,
    StepsCheck,
    check_determinism,
    checks_markdown,
    flag_text,
    read_checks,
    run_checks,
    valid_checks,
    write_checks,
)
from benchmark.records import GradientCheck, RecordError, checksum
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
    r = _checks(DefendedModel(NoDefense(), copy.deepcopy(trained_pair["at"][0])), rows)
    assert r.flags == [], r
    assert not r.steps.comparison.second_higher() and not r.steps.unconverged
    assert r.eps.accuracy[-1] <= 0.2  # falls towards chance as eps grows
    assert not r.square.failed and not r.fgsm.failed and not r.noise.failed and not r.degenerate.failed
    assert r.degenerate.target_clean is None and r.degenerate.classes_predicted == 10
    assert r.eot is None and r.fixed is None  # deterministic: no EOT check, no randomness to fix
    assert r.backwards > 0 and r.forwards > r.backwards


def test_a_quantizing_defense_without_bpda_is_flagged_and_with_bpda_is_not(trained_pair, rows, tmp_path):
    from purifybench_testing import Quantize

    target = trained_pair["at"][0]
    x, y = rows
    # with the binarization test of the row's PGD on the first 8 images
    spec = dataclasses.replace(SPEC, active=ActiveSpec(n=8, inner_points=31, random_points=16))
    pgd = ("pgd", ATTACKS.get("pgd")(steps=10, step_size=0.025))
    masked = run_checks(DefendedModel(Quantize(), copy.deepcopy(target), bpda=False), x, y, THREAT, spec,
                        batch_size=64, active=pgd)
    assert "zero-grad" in masked.flags
    # the gradient is zero, so PGD never moves: Square and large eps expose it, and so does the
    # binarization test: PGD misses the adversarial examples that exist by construction
    assert "square" in masked.flags or "eps" in masked.flags, masked
    assert "active" in masked.flags and masked.active.verdict == "fail" and len(masked.active.samples) == 8
    honest = run_checks(DefendedModel(Quantize(), copy.deepcopy(target), bpda=True), x, y, THREAT, spec,
                        batch_size=64, active=pgd)
    assert "zero-grad" not in honest.flags and "square" not in honest.flags, honest
    assert "active" not in honest.flags and honest.active.verdict == "pass"
    # the figures behind the flag: a row per tested row, its verdict, the passes counted
    assert honest.forwards > masked.active.forwards > 0 and honest.active.backwards > 0
    md = checks_markdown({RowKey("digits", "at", "masked"): _record(masked),
                          RowKey("digits", "at", "bpda"): _record(honest)})
    assert "## The binarization test" in md and "| digits | at | masked | pgd | 8 | 8 | 0/8 = 0.0" in md
    assert "| fail |" in md and "| pass |" in md and "active" in flag_text(_record(masked))
    # the row's checks file keeps every sample's outcome
    write_checks(tmp_path / "row.json", _record(masked))
    back = read_checks(tmp_path / "row.json")
    assert back.results.active == masked.active and back.flags == masked.flags


def test_menet_without_bpda_is_flagged(trained_pair, rows):
    menet = DEFENSES.get("menet")()
    target = copy.deepcopy(trained_pair["at"][0])
    naive = _checks(DefendedModel(menet, target, bpda=False), rows)
    assert naive.stochastic and naive.eot is not None
    assert "zero-grad" in naive.flags, naive
    bpda = _checks(DefendedModel.for_defense(menet, target), rows)
    assert "zero-grad" not in bpda.flags, bpda
    assert len(bpda.eot.repeats) == SPEC.repeats and bpda.fixed is not None


def test_paired_comparisons_have_power_where_independent_tolerances_had_none():
    """Two runs on the same 100 images that differ on 10 of them, all one way: the paired test sees
    it (an independent-proportions tolerance of about 16 points at n=100 did not)."""
    a = [1] * 60 + [0] * 40
    b = [1] * 50 + [0] * 50
    pair = Paired.of("few", a, "more", b)
    assert pair.accuracy == [0.6, 0.5] and pair.only == [10, 0] and pair.p_value < 0.01
    assert pair.first_higher() and not pair.second_higher()
    noisy = Paired.of("few", [1, 0] * 50, "more", [0, 1] * 50)  # same accuracy, every sample discordant
    assert noisy.p_value == 1.0 and not noisy.first_higher() and not noisy.second_higher()


def _pair(a=0.5, b=0.5) -> Paired:
    return Paired(names=["a", "b"], accuracy=[a, b], only=[0, 0], p_value=1.0)


def _results(**failed) -> CheckResults:
    """Check results of 10 images whose checks failed as named (zero_grad=, steps=, square=, ...)."""
    grad = GradientCheck(n=10, zero_gradient_fraction=0.0, finite=True, masked=failed.get("zero_grad", False))
    return CheckResults(
        n=10, stochastic=False, gradient=grad,
        degenerate=DegenerateCheck(clean=0.9, target_clean=0.9, chance=0.1, classes_predicted=10,
                                   reasons=["x"] if failed.get("degenerate") else []),
        steps=StepsCheck(steps=[5, 20], comparison=_pair(), failed=failed.get("steps", False), unconverged=False),
        eps=EpsCheck(eps=[0.1, 0.3], accuracy=[0.5, 0.1], chance=0.1, rises=[_pair(0.5, 0.1)], failed=False),
        fgsm=BaselineCheck(comparison=_pair(), failed=False), noise=BaselineCheck(comparison=_pair(), failed=False),
        square=SquareCheck(comparison=_pair(0.6, 0.5), failed=failed.get("square", False), queries=30))


def _record(results: CheckResults) -> ChecksRecord:
    return ChecksRecord(row=RowKey("digits", "at", "none"), row_hash="abc", results=results, spec=SPEC,
                        threat={"norm": "linf", "eps": 0.1})


def test_flag_text():
    assert flag_text(None) == "n/a" and flag_text(None, cell_masked=True) == "zero-grad"
    assert flag_text(_record(_results())) == "no flag (n=10)"  # what ok is: nothing raised on those 10 images
    assert flag_text(_record(_results(square=True, zero_grad=True))) == "zero-grad, square"
    assert flag_text(_record(_results(degenerate=True, steps=True))) == "degenerate, steps"


def test_checks_file_round_trips_and_older_or_bad_files_say_so(tmp_path, caplog):
    path = tmp_path / "row.json"
    rec = _record(_results(steps=True))
    write_checks(path, rec)
    data = json.loads(path.read_text())
    assert data["schema"] == "purifybench-checks/4" and data["flags"] == ["steps"] and data["passed"] is False
    back = read_checks(path)
    assert back.results == rec.results and back.row == rec.row and back.flags == ["steps"] and not back.old_schema
    assert isinstance(back.results.eps.rises[0], Paired) and isinstance(back.results.square, SquareCheck)
    assert valid_checks(path, row_hash="abc") is not None and valid_checks(path, row_hash="other") is None
    # a file of the schema before the binarization test reads (it has none); older ones are not trusted
    old = dict(data, schema="purifybench-checks/3")
    old["checksum"] = checksum(old)
    path.write_text(json.dumps(old))
    assert read_checks(path).old_schema and read_checks(path).results.active is None
    old = dict(data, schema="purifybench-checks/2")
    old["checksum"] = checksum(old)
    path.write_text(json.dumps(old))
    with pytest.raises(RecordError, match="is not a purifybench-checks/4 file"):
        read_checks(path)
    # a field this version does not know, or a missing one: one line naming the file and the field
    for change, message in ((lambda d: d["results"]["square"].update(queries_typo=3), "queries_typo"),
                            (lambda d: d["results"]["eps"]["rises"][0].update(p=3), r"eps.rises\[0\]: unknown"),
                            (lambda d: d["results"].pop("steps"), "steps"),
                            (lambda d: d["results"].update(gradient=None), "results.gradient: must not be null"),
                            (lambda d: d.update(flags=[]), "flags \\[\\] disagree"),
                            (lambda d: d.pop("spec"), "spec"),
                            (lambda d: d.update(schema="purifybench-checks/9"), "checks/9")):
        bad = json.loads(json.dumps(data))
        change(bad)
        bad["checksum"] = checksum(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(RecordError, match=message) as info:
            read_checks(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
        assert valid_checks(path) is None


def test_square_attack_stays_in_the_ball_and_is_counted_without_backwards(trained_pair, rows):
    x, y = rows
    model = DefendedModel(NoDefense(), copy.deepcopy(trained_pair["natural"][0]))
    clean = run_attack(ATTACKS.get("clean")(), model, x, y, THREAT, batch_size=64)
    out = run_attack(ATTACKS.get("square")(n_queries=300), model, x, y, THREAT, batch_size=64)
    assert out.backwards == 0 and out.forwards > 64
    assert out.accuracy < clean.accuracy - 0.2, (out.accuracy, clean.accuracy)  # breaks a natural model


def test_a_random_defense_declared_deterministic_is_refused(trained_pair, rows):
    from purifybench_testing import SecretlyRandom

    x, _ = rows
    target = copy.deepcopy(trained_pair["at"][0])
    with pytest.raises(BenchError, match=r"defense 'plugin' declares stochastic = False, but two passes over the same "
                                         r"64 images disagree \(\d+ predictions differ"):
        check_determinism(DefendedModel(SecretlyRandom(sigma=0.3), target), x, "plugin")
    check_determinism(DefendedModel(NoDefense(), target), x, "none")  # deterministic: passes


def test_a_collapsed_row_is_degenerate_and_randomness_is_a_diagnostic(trained_pair, rows):
    from purifybench_testing import NoisePurifier

    class Constant(NoDefense):  # a collapsed purifier: one grey image for every input
        def purify(self, x, masks=None):
            return torch.full_like(x, 0.5)

    target = copy.deepcopy(trained_pair["at"][0])
    spec = ChecksSpec(n=64, steps=2, more_steps=4, eps_multipliers=[4.0], square_queries=10, eot="auto",
                      repeats=2, transfer=False)
    x, y = rows
    dead = run_checks(DefendedModel(Constant(), target), x, y, THREAT, spec, batch_size=64, target=target)
    assert dead.flags[0] == "degenerate" and dead.degenerate.classes_predicted == 1
    assert "every prediction is one class" in dead.degenerate.reasons and dead.degenerate.target_clean > 0.9
    noisy = run_checks(DefendedModel(NoisePurifier(sigma=0.5), target), x, y, THREAT, spec, batch_size=64,
                       draws=2, eot=3, target=target)
    assert noisy.stochastic and noisy.eot.samples == [3, 6]  # the row's own E and twice it
    assert noisy.fixed is not None and noisy.fixed.comparison.names[1] == "randomness fixed"


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
                                                    "eps_multipliers": [4.0], "square_queries": 30,
                                                    "active": {"n": 4, "inner_points": 15, "random_points": 8}})
    path = _write(tmp_path, cfg)
    out = tmp_path / "run"
    from test_runner import _plan

    assert "binarization test (pgd): per sample 17 feature passes, 8 random points and 5 attack passes; 4 " \
           "samples" in _plan(path, out)
    _run(path, out)
    files = sorted((out / "checks").glob("*.json"))
    assert len(files) == 1
    rec = valid_checks(files[0])
    assert rec is not None and rec.results.n == 32 and rec.row.defense == "none"
    # the binarization test of the row's PGD, on the first 4 evaluation images
    assert rec.results.active.attack == "pgd" and len(rec.results.active.samples) == 4
    assert rec.results.active.params["steps"] == 5 and rec.spec.active.n == 4
    md = (out / "tables" / "results.md").read_text()
    assert "| Checks |" in md and "Carlini" in md
    assert "| digits | at | none | pgd | 4 |" in (out / "tables" / "checks.md").read_text()
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
