"""Composite attacks and early exits on a defense whose only robustness is input noise: what the
harness scores is what the attacks produced, and a composite is never above any of its parts under
any score (all draws, mean over draws, majority vote)."""

from __future__ import annotations

import copy

import pytest
import torch
from purifybench_testing import MaskedNoise, NoisePurifier

from attacks.base import Threat
from attacks.core import AttackResult, Objective, dlr_sum, linf_search, margin_sum
from benchmark.harness import run_attack
from benchmark.registry import ATTACKS
from defenses.base import DefendedModel

THREAT = Threat("linf", 0.1)
DRAWS = 4


@pytest.fixture(scope="module")
def noisy(trained_pair, digits_test):
    """The AT target behind a noise-only purifier, and 48 test images it classifies correctly."""
    model = copy.deepcopy(trained_pair["at"][0])
    x, y = digits_test.as_float()[:64], digits_test.labels[:64]
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    return model, x[keep][:48], y[keep][:48]


def _score(attack, model, x, y, draws=DRAWS):
    return run_attack(attack, model, x, y, THREAT, batch_size=len(x), seed=5, draws=draws)


def _dominated(composite, part, what):
    """Per sample, the composite's every score is at most the part's."""
    assert bool((composite.draw_counts <= part.draw_counts).all()), f"{what}: mean over draws"
    assert bool((composite.correct <= part.correct).all()), f"{what}: all draws"
    assert bool((composite.majority <= part.majority).all()), f"{what}: majority"


def test_worst_of_is_never_above_a_member_on_a_noise_defense(noisy):
    clf, x, y = noisy
    model = DefendedModel(NoisePurifier(), clf)
    members = [{"name": "pgd", "params": {"steps": 5, "step_size": 0.025}},
               {"name": "mi-fgsm", "params": {"steps": 5, "step_size": 0.025}},
               {"name": "eot-pgd", "params": {"steps": 3, "step_size": 0.04, "eot": 3}}]
    worst = _score(ATTACKS.get("worst-of")(attacks=members), model, x, y)
    alone = [_score(ATTACKS.get(m["name"])(**m["params"]), model, x, y) for m in members]
    for m, part in zip(members, alone):
        _dominated(worst, part, m["name"])
        # each member inside the composite computes what it computes alone (same starting randomness)
    assert worst.draws == DRAWS and worst.random_score
    # on a random row there is no early exit: every member attacked every sample
    assert worst.backwards == (5 + 5 + 3 * 3) * len(x)
    assert len(worst.extra["attack_info"]["survivors"]) == 3


def test_restarts_and_bpda_then_exact_never_above_their_parts(noisy):
    clf, x, y = noisy
    model = DefendedModel(NoisePurifier(), clf)
    one = _score(ATTACKS.get("pgd")(steps=4, step_size=0.025), model, x, y)
    three = _score(ATTACKS.get("pgd")(steps=4, step_size=0.025, restarts=3), model, x, y)
    _dominated(three, one, "restarts")  # the first restart is the single run
    assert three.backwards == 3 * 4 * len(x)  # every restart on every sample of a random row


def test_autoattack_rand_scores_what_apgd_produced(noisy, monkeypatch):
    """AA-rand's all-draws accuracy is not above its own APGD output rescored: the images it returns
    are APGD's for every sample, never the clean image of a survivor of its single check pass."""
    from pyautoattack import AutoAttack

    set_version = AutoAttack._set_version

    def shorter(self, version="standard"):  # the rand version's settings with 20 iterations, EOT 5 (CPU time)
        set_version(self, version)
        self.apgd.n_iter, self.apgd.eot_iter = 20, 5

    monkeypatch.setattr(AutoAttack, "_set_version", shorter)
    clf, x, y = noisy
    model = DefendedModel(NoisePurifier(sigma=0.2), clf)
    aa = _score(ATTACKS.get("autoattack")(attacks=["apgd-ce"], backend="pyautoattack"), model, x, y)

    class APGDRescored(ATTACKS.get("clean")):  # pyautoattack's APGD-CE, every sample's highest-loss point
        def run(self, m, xs, ys, threat, generator):
            adv = AutoAttack(m, norm="Linf", eps=threat.eps, version="rand", seed=0, device=xs.device)
            adv.apgd.loss, adv.apgd.seed = "ce", 0
            adv.apgd.init_hyperparam(xs)
            with torch.random.fork_rng():
                torch.manual_seed(0)
                best, _, _, best_adv = adv.apgd.attack_single_run(xs, ys)
            return AttackResult(best, candidates=[best_adv])

    rescored = _score(APGDRescored(), model, x, y)
    assert aa.accuracy <= rescored.accuracy and aa.n_correct == rescored.n_correct

    class OldPath(ATTACKS.get("clean")):  # what the wrapper returned before: clean images for survivors
        def run(self, m, xs, ys, threat, generator):
            adv = AutoAttack(m, norm="Linf", eps=threat.eps, version="rand", seed=0, device=xs.device)
            adv.attacks_to_run, adv.verbose = ["apgd-ce"], False
            with torch.no_grad():
                return adv.run_standard_evaluation(xs, ys, batch_size=len(xs))[0]

    old = _score(OldPath(), model, x, y)
    print(f"AA-rand (APGD-CE) all-{DRAWS}: {aa.accuracy:.3f}; mean {aa.draw_counts.float().mean() / DRAWS:.3f}; "
          f"the old path's: {old.accuracy:.3f}; mean {old.draw_counts.float().mean() / DRAWS:.3f}")
    assert old.accuracy > aa.accuracy  # the old path flattered the defense


def test_the_best_iterate_counts():
    """A sample misclassified at some step but not at the last counts as broken."""

    class Bouncing(torch.nn.Module):  # misclassifies x when its mean is in (0.52, 0.58): PGD overshoots it
        def forward(self, x):
            m = x.flatten(1).mean(1, keepdim=True)
            inside = ((m > 0.52) & (m < 0.58)).float()
            return torch.cat([1 - inside, inside], dim=1) * 10 + torch.cat([-m, m], dim=1)

    x = torch.full((4, 1, 4, 4), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    found = linf_search(Objective(Bouncing(), y), x, eps=0.1, step_size=0.03, steps=4)
    assert bool((found.last.mean((1, 2, 3)) > 0.58).all())  # the last iterate overshot the window
    assert bool((found.rate == 1).all()) and bool((Bouncing()(found.best).argmax(1) == 1).all())


def test_losses_margin_and_dlr():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    assert margin_sum(logits, y).item() == pytest.approx((1 - 3) + (2 - 0))
    # DLR: -(z_y - max_other) / (z_1st - z_3rd)
    assert dlr_sum(logits, y).item() == pytest.approx(-(3 - 1) / 3 + -(0 - 2) / 2)
    pgd = ATTACKS.get("pgd")(steps=2, loss="margin")
    assert pgd.params.loss == "margin"
    from benchmark.config import ConfigError

    with pytest.raises(ConfigError, match=r"loss: must be one of ce, dlr, margin, got 'hinge'"):
        ATTACKS.get("bpda-eot")(loss="hinge")


INPUT_SPACE_MEMBERS = {
    "clean": {}, "pgd": {"steps": 2}, "eot-pgd": {"steps": 2, "eot": 2}, "mi-fgsm": {"steps": 2},
    "vni-fgsm": {"steps": 2, "neighbors": 2}, "bpda-eot": {"steps": 2, "eot_samples": 2},
    "adaptive": {"steps": 2, "eot_samples": 2}, "mask-adaptive": {"steps": 2}, "ssp": {"steps": 2},
    "noise-discard": {"steps": 2}, "square": {"n_queries": 5},
    "autoattack": {"attacks": ["apgd-ce"]}, "worst-of": {"attacks": [{"name": "pgd", "params": {"steps": 1}}]},
}


def test_every_registered_attack_runs_as_a_worst_of_member(noisy):
    from benchmark.config import ConfigError

    clf, x, y = noisy
    model = DefendedModel(MaskedNoise(), clf)
    names = sorted(ATTACKS.names())
    for name in names:
        if not ATTACKS.get(name).centred_on_input:
            with pytest.raises(ConfigError, match="cannot be part of worst-of"):
                ATTACKS.get("worst-of")(attacks=[{"name": name}])
            continue
        assert name in INPUT_SPACE_MEMBERS, f"{name}: give it small params here"
        worst = ATTACKS.get("worst-of")(attacks=[{"name": "pgd", "params": {"steps": 1}},
                                                 {"name": name, "params": INPUT_SPACE_MEMBERS[name]}])
        out = _score(worst, model, x[:8], y[:8], draws=2)
        assert out.n == 8, name


def test_worst_of_with_random_starts_on_a_deterministic_row_is_never_above_a_member(trained_pair, digits_test):
    """Where one pass decides, later members attack only the survivors; their random starts are drawn as
    for the whole batch, so a member inside the composite gets the starts it gets alone."""
    from defenses.base import NoDefense

    clf = copy.deepcopy(trained_pair["at"][0])
    model = DefendedModel(NoDefense(), clf)
    x, y = digits_test.as_float()[:96], digits_test.labels[:96]
    members = [{"name": "pgd", "params": {"steps": 2, "step_size": 0.01}},  # weak: leaves survivors
               {"name": "pgd", "params": {"steps": 4, "step_size": 0.03}},
               {"name": "vni-fgsm", "params": {"steps": 3, "neighbors": 2}}]
    worst = run_attack(ATTACKS.get("worst-of")(attacks=members), model, x, y, THREAT, batch_size=96, seed=2)
    for m in members:
        alone = run_attack(ATTACKS.get(m["name"])(**m["params"]), model, x, y, THREAT, batch_size=96, seed=2)
        assert bool((worst.correct <= alone.correct).all()), m
    survivors = worst.extra["attack_info"]["survivors"]
    assert survivors[0] > survivors[-1]  # the early exit happened


def test_a_worst_of_whose_members_do_not_apply_is_not_planned():
    from benchmark.config import from_dict
    from benchmark.experiment import ExperimentConfig  # noqa: F401  (config built below)
    from benchmark.runner import plan_cells

    cfg = from_dict(ExperimentConfig, {
        "name": "t", "datasets": [{"name": "digits"}], "targets": [{"name": "t", "arch": "small-cnn",
                                                                    "train": {"epochs": 1}}],
        "defenses": [{"name": "none"}],
        "attacks": [{"name": "masked-only", "attack": "worst-of", "params": {"attacks": [{"name": "mask-adaptive"}]}},
                    {"name": "pgd"}]}, "config")
    assert [c.attack.name for c in plan_cells(cfg)] == ["pgd"]


def test_a_composite_outside_the_harness_restarts_from_the_callers_streams(noisy):
    """Called directly (a script, a test), worst-of starts each member where the caller's generator was,
    and leaves torch's global generator as a plain call would: not at the harness's batch seed."""
    from defenses.base import NoDefense

    clf, x, y = noisy
    model = DefendedModel(NoDefense(), clf)
    pgd = {"name": "pgd", "params": {"steps": 2, "step_size": 0.03}}
    worst = ATTACKS.get("worst-of")(attacks=[pgd])
    alone = ATTACKS.get("pgd")(**pgd["params"])
    a = alone(model, x[:8], y[:8], THREAT, torch.Generator().manual_seed(11))
    b = worst(model, x[:8], y[:8], THREAT, torch.Generator().manual_seed(11))
    assert torch.equal(a.x_adv, b.x_adv)
    two = ATTACKS.get("worst-of")(attacks=[pgd, pgd])(model, x[:8], y[:8], THREAT, torch.Generator().manual_seed(11))
    assert torch.equal(two.images[0], a.x_adv)  # the first member from the caller's stream


def test_autoattack_reports_robust_accuracy_after_each_member_as_its_log_does():
    """Standard version on a deterministic model: pyautoattack's own count after each member, which never
    rises, ends where the harness's re-scoring of the returned images ends, and is shown in the report."""
    from attacks.autoattack import ROBUST_AFTER
    from benchmark.reports import autoattack_members_markdown

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()
    x = torch.rand(24, 3, 8, 8)
    y = net(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10  # four clean mistakes
    result = ATTACKS.get("autoattack")(attacks=["apgd-ce", "apgd-t"]).run(net, x, y, Threat("linf", 0.02),
                                                                          torch.Generator().manual_seed(0))
    after = [result.info[f"{ROBUST_AFTER}{m}"] for m in ("clean", "apgd-ce", "apgd-t")]
    assert after[0] == 20 and after[0] >= after[1] >= after[2], after
    with torch.no_grad():
        assert after[2] == int((net(result.x_adv).argmax(1) == y).sum())
    from test_presets import rec

    record = dict(rec("none", "autoattack", "1" * after[2] + "0" * (24 - after[2])), attack_info=dict(result.info))
    md = autoattack_members_markdown([record])
    assert "after APGD-CE" in md and f"| {100 * after[1] / 24:.2f} | {100 * after[2] / 24:.2f} |" in md
