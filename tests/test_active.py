"""The binarization test (benchmark/active.py): an attack is tested on problems where an
adversarial example exists by construction."""

import pytest
import torch
from purifybench_testing import NoisePurifier

from attacks.base import Threat
from benchmark.active import (
    ActiveSpec,
    BinarizedModel,
    binarization_test,
    boundary_point,
    disjoint_groups,
    fit_readout,
    inner_points,
)
from benchmark.data import load_dataset
from benchmark.errors import BenchError
from benchmark.models import create_model
from benchmark.registry import ATTACKS
from defenses.base import DefendedModel, Defense, NoDefense

THREAT = Threat("linf", 0.1)


class Round8(Defense):
    """Rounds to 8-bit pixels: the image barely changes, the gradient is zero (masked)."""

    differentiable = False

    def purify(self, x, masks=None):
        return torch.round(x * 255) / 255


class BlankNear(Defense):
    """Blanks every input within L-inf distance ``radius`` of one of ``images`` (nothing about them
    survives) and leaves the others."""

    def __init__(self, images, radius: float) -> None:
        super().__init__()
        self.images, self.radius = images.flatten(1), radius

    def purify(self, x, masks=None):
        near = torch.cdist(x.flatten(1), self.images, p=float("inf")).min(1).values <= self.radius
        return torch.where(near.view(-1, *[1] * (x.dim() - 1)), torch.full_like(x, 0.5), x) + 0 * x


class TwoChains(NoDefense):
    """The identity along two chains (as a multi-chain purifier runs): the classifier sees every input twice."""

    chains = 2


class Blank(Defense):
    """Every input becomes the same grey image: nothing about the input survives."""

    def purify(self, x, masks=None):
        return torch.full_like(x, 0.5) + 0 * x


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    clf = create_model("small-cnn", num_classes=10, in_channels=1, width=16, hidden=64).eval()
    x = load_dataset("digits", "test", size=12).as_float(torch.arange(10))
    return clf, x


def test_the_points_lie_where_the_construction_says():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 12, 12)
    x[0, :3] = 0.0  # pixels at the range's ends: the boundary coordinate must turn inward
    x[0, 3:6] = 1.0
    for _ in range(20):
        edge = boundary_point(x, 0.1, gen)
        assert abs(float((edge - x).abs().max()) - 0.1) < 1e-6 and 0 <= float(edge.min()) and float(edge.max()) <= 1
    inner = inner_points(x, 0.1, 0.05, 50, gen)
    assert inner.shape == (51, 1, 12, 12) and torch.equal(inner[0], x)
    assert float((inner - x).abs().max()) <= 0.095 + 1e-6 and 0 <= float(inner.min()) and float(inner.max()) <= 1
    with pytest.raises(BenchError, match="eps <= 0.5"):
        boundary_point(x, 0.6, gen)


def test_the_readout_separates_and_keeps_the_boundary_point_barely_adversarial():
    gen = torch.Generator().manual_seed(1)
    inner = torch.randn(40, 8, generator=gen)
    edge = torch.randn(1, 8, generator=gen) + 6.0
    spec = ActiveSpec(closeness=0.9)
    weight, bias = fit_readout(inner, edge, torch.randn(40, 10), torch.randn(1, 10), spec)
    diff = lambda f: f @ (weight[1] - weight[0]) + bias[1] - bias[0]  # noqa: E731
    assert (diff(inner) < 0).all() and (diff(edge) > 0).all()
    # a point a little past the boundary point towards x's side is class 0: the boundary sits near it
    assert diff(edge - 0.2 * (edge - inner.mean(0))).item() < 0
    # not separable (the boundary point among the inner ones): a reason, no readout
    assert isinstance(fit_readout(inner, inner[:1], inner, inner[:1], spec), str)


def test_plain_pgd_passes_undefended_fails_through_a_masked_gradient_and_bpda_passes(setup):
    clf, x = setup
    spec = ActiveSpec(n=8, inner_points=31)
    pgd = ATTACKS.get("pgd")(steps=20, step_size=0.025)
    undefended = binarization_test(DefendedModel(NoDefense(), clf), x, pgd, THREAT, spec, name="pgd")
    masked = binarization_test(DefendedModel(Round8(), clf, bpda=False), x, pgd, THREAT, spec, name="pgd")
    bpda = binarization_test(DefendedModel(Round8(), clf, bpda=True), x, pgd, THREAT, spec, name="pgd")
    for result in (undefended, masked, bpda):
        assert len(result.samples) == 8 and result.n_invalid == 0
        # every readout checked on fresh passes: x on its side, the boundary point on the other
        assert all({k: s.checks[k] for k in ("x_class_0", "boundary_class_1", "passes")}
                   == {"x_class_0": 1, "boundary_class_1": 1, "passes": 1} and s.boundary_margin > 0
                   for s in result.samples)
        # the test is not trivial: random points of the eps-ball rarely reach class 1
        assert 0 <= result.random_rate < 0.2
    assert undefended.success_rate >= 7 / 8 and bpda.success_rate >= 7 / 8
    assert undefended.verdict == bpda.verdict == "pass" and not bpda.failed
    # zero gradients: PGD never leaves its random start and misses the example it is guaranteed to exist
    assert masked.success_rate <= 1 / 8 and masked.interval()[1] < 0.5 < bpda.interval()[0]
    assert masked.failed and masked.verdict == "fail" and masked.p_value < 0.05
    assert masked.summary()["valid"] == 8 and masked.summary()["successes"] == masked.successes


def test_one_attack_on_many_images_reads_each_input_out_with_its_own_images_readout(setup):
    clf, x = setup
    xs = x[:3]
    gen = torch.Generator().manual_seed(0)
    d = clf.features(xs).shape[1]
    weight, bias = torch.randn(3, 2, d, generator=gen), torch.randn(3, 2, generator=gen)
    model = BinarizedModel(DefendedModel(NoDefense(), clf), xs, weight, bias, THREAT.eps)
    order = torch.tensor([2, 0, 0, 1])  # subsets, repeats and reorderings, as attacks make them
    batch = (xs[order] + (torch.rand(xs[order].shape, generator=gen) * 2 - 1) * THREAT.eps).clamp(0, 1)
    with torch.no_grad():
        expected = torch.einsum("bd,bkd->bk", clf.features(batch), weight[order]) + bias[order]
        assert torch.allclose(model(batch), expected, atol=1e-5)
        with pytest.raises(RuntimeError, match="outside every test image's eps-ball"):
            model(1 - xs[:1])
    # a purifier along several chains classifies each input once per chain: the same readout for each
    chained = BinarizedModel(DefendedModel(TwoChains(), clf), xs, weight, bias, THREAT.eps)
    with torch.no_grad():
        assert torch.allclose(chained(batch), expected, atol=1e-5)
    # images whose balls could hold one input are attacked in separate runs
    near = (xs[0] + 0.15).clamp(0, 1)
    assert disjoint_groups(torch.stack([xs[0], near, xs[1]]), THREAT.eps) == [[0, 2], [1]]


def test_readouts_that_cannot_be_fitted_are_counted_not_hidden(setup):
    clf, x = setup
    result = binarization_test(DefendedModel(Blank(), clf), x, ATTACKS.get("pgd")(steps=2, step_size=0.05), THREAT,
                               ActiveSpec(n=4, inner_points=15), name="pgd")
    assert result.n_invalid == 4 and result.valid == [] and result.success_rate is None
    assert all(s.success is None and "not linearly separable" in s.reason for s in result.samples)
    assert result.summary()["invalid"] == 4


def test_a_stochastic_row_is_attacked_with_its_eot_and_scored_under_its_draws(setup):
    clf, x = setup
    model = DefendedModel(NoisePurifier(sigma=0.02), clf)
    eot = ATTACKS.get("eot-pgd")(steps=10, step_size=0.025, eot=2)
    result = binarization_test(model, x[:3], eot, THREAT, ActiveSpec(n=3, inner_points=31, feature_draws=2),
                               name="eot-pgd", draws=2)
    assert len(result.samples) == 3 and result.n_invalid + len(result.valid) == 3
    assert all(isinstance(s.success, bool) and s.checks["passes"] == 2 for s in result.valid)
    # a valid readout kept x in class 0 under every scoring draw (else x itself would count as found)
    assert all(s.checks["x_class_0"] == 2 for s in result.valid) and result.verdict in ("pass", "inconclusive")
    assert result.successes == len(result.valid) >= 1
    # noise large enough that fresh draws do not follow a readout fitted on two: invalid, with the reason
    noisy = binarization_test(DefendedModel(NoisePurifier(sigma=0.5), clf), x[:3], eot, THREAT,
                              ActiveSpec(n=3, inner_points=31, feature_draws=2), name="eot-pgd", draws=4)
    assert noisy.n_invalid >= 1 and any("fresh passes" in s.reason for s in noisy.samples)
    assert all("fresh passes" in s.reason or "not linearly separable" in s.reason for s in noisy.samples if not s.valid)
    with pytest.raises(BenchError, match="inner_gap"):
        ActiveSpec(inner_gap=1.5).validate()


def test_the_attack_it_holds_to_account_is_the_rows_strongest_or_the_one_named():
    from benchmark.config import ConfigError
    from benchmark.experiment import config_from_dict
    from benchmark.runner import active_attack

    raw = {"name": "t", "datasets": [{"name": "digits"}], "targets": [{"name": "t", "arch": "small-cnn", "train": {"method": "at"}}],
           "defenses": [{"name": "none"}, {"name": "DIR", "defense": "dir"}, {"name": "AID", "defense": "aid"},
                        {"name": "ME-Net", "defense": "menet"}],
           "attacks": [{"name": "clean"}, {"name": "pgd", "params": {"steps": 10}},
                       {"name": "eot-pgd", "params": {"steps": 10, "eot": 4}},
                       {"name": "bpda-eot", "params": {"steps": 10, "eot_samples": 4}},
                       {"name": "pgd-dlr", "attack": "pgd", "params": {"steps": 100, "loss": "dlr"}}],
           "eval": {"checks": {"active": {"n": 4}}}}
    cfg = config_from_dict(raw, "t.yaml:")
    chosen = {d.name: active_attack(cfg, d)[0] for d in cfg.defenses}
    # deterministic: the longest PGD (a DLR loss needs three classes); random: its EOT attack; BPDA rows: BPDA+EOT
    assert chosen == {"none": "pgd", "DIR": "eot-pgd", "AID": "bpda-eot", "ME-Net": "bpda-eot"}
    # none of the PGD family in the config: the checks' own PGD, with the row's EOT on a random row
    few = dict(raw, attacks=[{"name": "clean"}, {"name": "mi-fgsm"}])
    few["eval"] = {"checks": {"more_steps": 12, "active": {"n": 4}}}
    cfg = config_from_dict(few, "t.yaml:")
    assert active_attack(cfg, cfg.defenses[0])[0] == "PGD-12"
    assert active_attack(cfg, cfg.defenses[1])[0] == "PGD-12 (EOT 4)"
    named = dict(raw, eval={"checks": {"active": {"n": 4, "attack": "pgd"}}})
    cfg = config_from_dict(named, "t.yaml:")
    assert {active_attack(cfg, d)[0] for d in cfg.defenses} == {"pgd"}
    # a named column that does not run against a row: that row's own strongest
    only = dict(raw, eval={"checks": {"active": {"n": 4, "attack": "eot-pgd"}}})
    only["attacks"] = [dict(a, only=["DIR"]) if a["name"] == "eot-pgd" else a for a in raw["attacks"]]
    cfg = config_from_dict(only, "t.yaml:")
    assert [active_attack(cfg, d)[0] for d in cfg.defenses] == ["pgd", "eot-pgd", "bpda-eot", "bpda-eot"]
    vni = dict(raw, attacks=raw["attacks"] + [{"name": "vni-fgsm"}], eval={"checks": {"active": {"attack": "vni-fgsm"}}})
    with pytest.raises(ConfigError, match="is a vni-fgsm attack"):
        config_from_dict(vni, "t.yaml:")
    for attack, message in (("pgd-typo", "'pgd-typo' is not an attack of this config"),
                            ("clean", "is a clean attack"), ("pgd-dlr", "needs three classes")):
        with pytest.raises(ConfigError, match=message) as info:
            config_from_dict(dict(raw, eval={"checks": {"active": {"attack": attack}}}), "t.yaml:")
        assert "eval.checks.active.attack" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="eval.checks.active.threshold"):
        config_from_dict(dict(raw, eval={"checks": {"active": {"threshold": 1.5}}}), "t.yaml:")


def test_valid_and_invalid_readouts_in_one_attack_keep_their_images(setup):
    clf, x = setup
    dark = [i in (1, 4, 5) for i in range(8)]
    assert float(torch.cdist(x[:8].flatten(1), x[:8].flatten(1), p=float("inf")).add(torch.eye(8)).min()) > 0.4
    result = binarization_test(DefendedModel(BlankNear(x[[1, 4, 5]], 0.2), clf), x[:8],
                               ATTACKS.get("pgd")(steps=20, step_size=0.025), THREAT,
                               ActiveSpec(n=8, inner_points=31, random_points=16), name="pgd")
    assert [s.index for s in result.samples] == list(range(8))
    # the blanked images: no readout, with the reason; the others: attacked, and found
    assert [not s.valid for s in result.samples] == dark
    assert all("not linearly separable" in s.reason and s.success is None for s in result.samples if not s.valid)
    assert all(s.success and s.reason == "" and "random_class_1" in s.checks for s in result.valid)


def test_a_pass_that_cannot_fail_or_that_random_points_reach_is_inconclusive():
    from benchmark.active import ActiveResult, SampleOutcome

    def result(successes, n, random=0.0, **kw):
        samples = [SampleOutcome(i, valid=True, success=i < successes, checks={"random_class_1": random})
                   for i in range(n)]
        return ActiveResult(attack="pgd", samples=samples, **kw)

    assert result(6, 6).verdict == "pass" and result(2, 6).verdict == "fail" and result(2, 6).failed
    assert result(1, 1).verdict == "inconclusive"  # 0 of 1 would not be significant either
    assert result(0, 1).verdict == "inconclusive" and not result(0, 1).failed
    assert result(6, 6, random=0.6).verdict == "inconclusive" and result(6, 6, random=0.6).random_rate == 0.6
    assert ActiveResult(attack="pgd", samples=[]).verdict == "untestable"
    assert ActiveResult(attack="pgd", samples=[], error="RuntimeError: x").verdict == "error"
