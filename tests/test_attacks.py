import importlib.util

import pytest
import torch
from purifybench_testing import LeavesTheBall, LeavesTheRange

from attacks.autoattack import resolve_version
from attacks.base import Threat
from benchmark.harness import ThreatModelViolation, run_attack
from benchmark.registry import ATTACKS
from defenses.base import DefendedModel, NoDefense

THREAT = Threat("linf", 0.1)


@pytest.fixture(scope="module")
def eval_batch(digits_test):
    sub = digits_test.subset(120, seed=0)
    return sub.as_float(), sub.labels


def _defended(trained_pair, kind="at"):
    return DefendedModel(NoDefense(), trained_pair[kind][0])


def _attack(name, **params):
    return ATTACKS.get(name)(**params)


def _acc(trained_pair, kind, attack, x, y, threat=THREAT, seed=0):
    return run_attack(attack, _defended(trained_pair, kind), x, y, threat, batch_size=64, seed=seed)


def test_harness_rejects_attacks_that_leave_the_ball_or_the_range(trained_pair, eval_batch):
    x, y = eval_batch
    with pytest.raises(ThreatModelViolation, match=r"left the threat ball: max \|x_adv - x\|_inf = 0.2"):
        run_attack(LeavesTheBall(), _defended(trained_pair), x, y, THREAT, batch_size=64, name="broken")
    with pytest.raises(ThreatModelViolation, match=r"outside \[0,1\]"):
        run_attack(LeavesTheRange(), _defended(trained_pair), x, y, THREAT, batch_size=64, name="broken")


def test_clean_attack_and_rescoring(trained_pair, eval_batch):
    x, y = eval_batch
    out = _acc(trained_pair, "at", _attack("clean"), x, y)
    model = trained_pair["at"][0]
    with torch.no_grad():
        expected = (model(x).argmax(1) == y)
    assert torch.equal(out.correct, expected)
    assert out.backwards == 0 and out.forwards == len(x)


def test_pgd_breaks_a_natural_model_and_at_helps(trained_pair, eval_batch):
    x, y = eval_batch
    big = Threat("linf", 0.3)
    nat_big = _acc(trained_pair, "natural", _attack("pgd", steps=20, step_size=0.05), x, y, big)
    assert nat_big.accuracy < 0.03
    nat = _acc(trained_pair, "natural", _attack("pgd", steps=20, step_size=0.025), x, y)
    at = _acc(trained_pair, "at", _attack("pgd", steps=20, step_size=0.025), x, y)
    assert at.accuracy > nat.accuracy + 0.3
    # forward/backward bookkeeping: 20 gradient steps per image and the re-scoring of its two images
    # (the last iterate and the best one)
    assert at.backwards == 20 * len(x)
    assert at.forwards == 22 * len(x) and at.score_forwards == 2 * len(x)


def test_restarts_only_ever_lower_robust_accuracy(trained_pair, eval_batch):
    x, y = eval_batch
    one = _acc(trained_pair, "at", _attack("pgd", steps=5, step_size=0.025, restarts=1), x, y)
    three = _acc(trained_pair, "at", _attack("pgd", steps=5, step_size=0.025, restarts=3), x, y)
    assert not (three.correct & ~one.correct).any()  # robust after 3 restarts => robust after the first
    assert three.n_correct <= one.n_correct


@pytest.mark.parametrize("name,params", [("mi-fgsm", {"steps": 10, "step_size": 0.025}),
                                         ("vni-fgsm", {"steps": 5, "step_size": 0.025, "neighbors": 3})])
def test_momentum_attacks_hurt_the_natural_model(trained_pair, eval_batch, name, params):
    x, y = eval_batch
    clean = _acc(trained_pair, "natural", _attack("clean"), x, y)
    adv = _acc(trained_pair, "natural", _attack(name, **params), x, y)
    assert adv.accuracy < clean.accuracy - 0.4


def test_attack_parameters_are_validated():
    from benchmark.config import ConfigError

    with pytest.raises(ConfigError, match=r"attack.steps: must be >= 1"):
        _attack("pgd", steps=0)
    with pytest.raises(ConfigError, match=r"unknown key 'step'.*did you mean 'steps'"):
        _attack("mi-fgsm", step=3)
    with pytest.raises(ConfigError, match="'fast' is not allowed"):
        _attack("autoattack", version="fast")


def test_autoattack_version_follows_the_declarations():
    class M:
        stochastic = True

    assert resolve_version("auto", M()) == "rand"
    assert resolve_version("auto", object()) == "standard"
    assert resolve_version("plus", M()) == "plus"


def test_autoattack_wrapper_equals_a_direct_pyautoattack_call(trained_pair, eval_batch):
    from pyautoattack import AutoAttack

    x, y = eval_batch[0][:12], eval_batch[1][:12]
    ours = _acc(trained_pair, "at", _attack("autoattack", version="standard", seed=0), x, y)
    model = _defended(trained_pair)
    direct = AutoAttack(model, norm="Linf", eps=THREAT.eps, version="standard", seed=0, device="cpu")
    with torch.no_grad():
        x_adv, _ = direct.run_standard_evaluation(x, y, batch_size=len(x))
        direct_correct = model(x_adv).argmax(1) == y
    assert torch.equal(ours.correct, direct_correct)


def test_autoattack_subset_runs_those_members_with_the_version_settings(trained_pair, eval_batch):
    """``attacks: [apgd-ce, apgd-t]`` is the standard version's settings minus FAB-T and Square:
    the same images as pyautoattack's standard run stopped after APGD-T."""
    from pyautoattack import AutoAttack

    from benchmark.config import ConfigError
    from benchmark.errors import BenchError

    x, y = eval_batch[0][:12], eval_batch[1][:12]
    ours = _acc(trained_pair, "at", _attack("autoattack", version="auto", attacks=["apgd-ce", "apgd-t"], seed=0), x, y)
    model = _defended(trained_pair)
    direct = AutoAttack(model, norm="Linf", eps=THREAT.eps, version="standard", seed=0, device="cpu")
    direct.attacks_to_run = ["apgd-ce", "apgd-t"]
    with torch.no_grad():
        x_adv, _ = direct.run_standard_evaluation(x, y, batch_size=len(x))
        assert torch.equal(ours.correct, model(x_adv).argmax(1) == y)
    with pytest.raises(ConfigError, match=r"attack.attacks: must be a non-empty list of apgd-ce, apgd-dlr"):
        _attack("autoattack", attacks=["apgd-x"])
    with pytest.raises(ConfigError, match=r"attack.attacks: apgd-t not in the rand version \(apgd-ce, apgd-dlr\)"):
        _attack("autoattack", version="rand", attacks=["apgd-t"])

    class Random(torch.nn.Module):  # auto resolves to rand on a stochastic model: checked at run time too
        stochastic = True

        def forward(self, z):
            return model(z)

    with pytest.raises(BenchError, match=r"apgd-t not in the rand version that this defense gets"):
        _attack("autoattack", attacks=["apgd-t"]).run(Random(), x, y, THREAT, None)


# ----------------------------------------------------------------------------- cross-checks against torchattacks
needs_torchattacks = pytest.mark.skipif(importlib.util.find_spec("torchattacks") is None,
                                        reason="torchattacks not installed (see the README's test command)")


def _torchattacks_acc(attack, model, x, y):
    x_adv = attack(x, y)
    assert (x_adv - x).abs().max() <= THREAT.eps + 1e-6
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


@needs_torchattacks
def test_pgd_matches_torchattacks(trained_pair, eval_batch):
    import torchattacks

    x, y = eval_batch
    model = _defended(trained_pair)
    ours = _acc(trained_pair, "at", _attack("pgd", steps=20, step_size=0.025), x, y).accuracy
    theirs = _torchattacks_acc(torchattacks.PGD(model, eps=0.1, alpha=0.025, steps=20, random_start=True), model, x, y)
    assert abs(ours - theirs) <= 0.05  # random starts differ; 120 samples
    assert ours <= theirs + 0.025  # never weaker beyond noise


@needs_torchattacks
def test_mi_fgsm_matches_torchattacks_exactly(trained_pair, eval_batch):
    import torchattacks

    x, y = eval_batch
    model = _defended(trained_pair)
    ours = _acc(trained_pair, "at", _attack("mi-fgsm", steps=10, step_size=0.025, decay=1.0), x, y).accuracy
    theirs = _torchattacks_acc(torchattacks.MIFGSM(model, eps=0.1, alpha=0.025, steps=10, decay=1.0), model, x, y)
    assert abs(ours - theirs) <= 1 / len(x) + 1e-9  # deterministic: the same rule up to float rounding


@needs_torchattacks
def test_vni_fgsm_matches_torchattacks(trained_pair, eval_batch):
    import torchattacks

    x, y = eval_batch
    model = _defended(trained_pair)
    ours = _acc(trained_pair, "at", _attack("vni-fgsm", steps=10, step_size=0.025, neighbors=5, beta=1.5), x, y)
    theirs = _torchattacks_acc(torchattacks.VNIFGSM(model, eps=0.1, alpha=0.025, steps=10, decay=1.0, N=5, beta=1.5),
                               model, x, y)
    assert abs(ours.accuracy - theirs) <= 0.05
    assert ours.accuracy <= theirs + 0.025
