"""Exact gradients through iterative and non-differentiable purifiers (EBM, AID-Purifier, ME-Net)."""

import pytest
import torch
from torch import nn

from attacks.base import Threat
from benchmark.harness import run_attack
from benchmark.registry import ATTACKS, DEFENSES
from defenses.base import DefendedModel, Defense
from defenses.menet import usvt
from defenses.unroll import unroll


class MeanClassifier(nn.Module):
    """Class 1 when the image's mean pixel is above 0.5, else class 0."""

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([0.5 - m, m - 0.5], dim=1) * 100


class IterativeInvert(Defense):
    """Walks each image to its negative 1 - x in four steps (only for tests): far from the identity,
    so BPDA's identity surrogate points the wrong way, while the exact gradient does not."""

    differentiable = False  # declared: attacks default to BPDA
    exact_gradient = True
    steps = 4

    def _step(self, z, x, t, generator, create_graph):
        return z + (1 - 2 * x) / self.steps

    def purify(self, x, masks=None):
        x = x.detach()
        return unroll(self._step, x, x, self.steps)

    def purify_exact(self, x, masks=None):
        return unroll(self._step, x, x, self.steps)


def test_bpda_fails_and_exact_gradients_succeed_on_an_iterative_purifier():
    n = 32
    level = torch.linspace(0.42, 0.58, n)
    x = level.view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    y = (level < 0.5).long()  # the defended model classifies 1 - x
    model = DefendedModel.for_defense(IterativeInvert(), MeanClassifier())
    assert model.bpda and not model.exact
    threat = Threat("linf", 0.1)
    kw = dict(steps=10, step_size=0.02, eot=1)
    bpda = run_attack(ATTACKS.get("bpda-eot")(**kw), model, x, y, threat, batch_size=n)
    exact = run_attack(ATTACKS.get("bpda-eot")(gradient="exact", **kw), model, x, y, threat, batch_size=n)
    auto = run_attack(ATTACKS.get("adaptive")(**kw), model, x, y, threat, batch_size=n)
    # the identity surrogate pushes every image the wrong way: only a random start that happens to cross
    # the boundary (an image the attack produced, scored as such) fools one
    assert bpda.accuracy >= 0.9
    assert exact.accuracy == 0.0  # eps 0.1 covers every level's distance to the boundary
    assert auto.accuracy == 0.0
    assert model.bpda and not model.exact  # the attacks restored the defended model's switches


def _ebm(steps=5, smooth=False):
    torch.manual_seed(0)
    d = DEFENSES.get("ebm")(in_channels=1, width=4, steps=steps, chains=1, tau=0.01).double().eval()
    if smooth:  # a smooth, curved energy, so that the chain's Jacobian is not the identity
        for i, m in enumerate(d.energy.body):
            if isinstance(m, nn.LeakyReLU):
                d.energy.body[i] = nn.Tanh()
    for p in d.parameters():
        p.requires_grad_(False)
        p.mul_(2.0 if smooth else 0.3)  # the piecewise-linear one gentle: the chain stays away from the clamp
    return d


def _finite_difference(fn, x, v, h=1e-5):
    return (fn(x + h * v) - fn(x - h * v)) / (2 * h)


def _ebm_gradients(d):
    g = torch.Generator().manual_seed(1)
    x = 0.3 + 0.4 * torch.rand((2, 1, 8, 8), generator=g, dtype=torch.float64)
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    d.seed(7)
    plain = d.purify(x)
    d.seed(7)
    xr = x.clone().requires_grad_(True)
    exact = d.purify_exact(xr)
    assert torch.allclose(plain, exact.detach(), atol=1e-12)  # the same draws, the same result
    (grad,) = torch.autograd.grad((w * exact).sum(), xr)

    def loss(inp):
        d.seed(7)
        return (w * d.purify(inp)).sum()

    return grad, w, v, _finite_difference(loss, x, v)


def test_ebm_exact_gradient_matches_finite_differences_and_the_plain_forward():
    d = _ebm(smooth=True)
    grad, w, v, fd = _ebm_gradients(d)
    assert float((grad * v).sum()) == pytest.approx(float(fd), rel=1e-6)
    assert abs(float((grad * v).sum()) - float((w * v).sum())) > 1.0  # not the identity's (BPDA) gradient
    # the generator ends where the plain purification leaves it
    x = torch.rand((1, 1, 8, 8), dtype=torch.float64)
    d.seed(7)
    d.purify(x)
    after_plain = d.generator.get_state()
    d.seed(7)
    d.purify_exact(x.clone().requires_grad_(True))
    assert torch.equal(after_plain, d.generator.get_state())


def test_ebm_chain_jacobian_is_the_identity_for_a_piecewise_linear_energy():
    """Hill et al.'s energy network is piecewise linear (LeakyReLU): its gradient is piecewise constant,
    so each Langevin step z - grad E(z) + noise has the identity as Jacobian almost everywhere, and
    BPDA's identity is the exact gradient of the chain wherever the final clamp does not bind."""
    grad, w, v, fd = _ebm_gradients(_ebm())
    assert float((grad * v).sum()) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)
    assert torch.allclose(grad, w, atol=1e-12)


def test_checkpointed_segments_give_the_gradient_of_the_whole_graph():
    d = _ebm(steps=9, smooth=True)
    x = torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64) + 0.01 * torch.randn((1, 1, 8, 8), dtype=torch.float64)
    grads = []
    for segment in (1, 3, 9):
        d.seed(3)
        xr = x.clone().requires_grad_(True)
        z = unroll(d._step, xr * 2 - 1, xr, d.steps, d._gen(x.device), segment=segment)
        grads.append(torch.autograd.grad(z.sum(), xr)[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-12) and torch.allclose(grads[0], grads[2], atol=1e-12)


def test_menet_usvt_exact_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(2)
    x = 0.3 + 0.4 * torch.rand((2, 3, 8, 8), generator=g, dtype=torch.float64)
    keep = torch.rand((2, 1, 8, 8), generator=g) < 0.9
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    out = usvt(xr, keep, rank=4, exact=True)
    assert torch.allclose(out.detach(), usvt(x, keep, rank=4))
    (grad,) = torch.autograd.grad((w * out).sum(), xr)
    fd = _finite_difference(lambda z: (w * usvt(z, keep, rank=4)).sum(), x, v, h=1e-6)
    assert float((grad * v).sum()) == pytest.approx(float(fd), rel=1e-4)


def test_menet_exact_gradient_is_finite_on_a_degenerate_image():
    x = torch.full((1, 3, 8, 8), 0.5, requires_grad=True)  # all singular values but one are zero
    out = usvt(x, torch.ones((1, 1, 8, 8), dtype=torch.bool), rank=4, exact=True)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all()


def test_exact_gradients_through_the_attack_on_ebm_aid_and_menet(trained_pair, digits_test):
    """bpda-eot with gradient: exact runs on each defense that declares exact gradients, keeps the
    threat model, and records its resolved choice."""
    target = trained_pair["at"][0]
    x, y = digits_test.as_float()[:16], digits_test.labels[:16]
    threat = Threat("linf", 0.1)
    ebm = DEFENSES.get("ebm")(in_channels=1, width=8, steps=4, chains=2)
    aid = DEFENSES.get("aid")(width=16, eps=0.1, steps=3)
    aid.attach_classifier(target)
    menet = DEFENSES.get("menet")()
    menet.attach_classifier(target)
    for defense in (ebm, aid, menet):
        model = DefendedModel.for_defense(defense, target)
        attack = ATTACKS.get("bpda-eot")(steps=3, step_size=0.05, eot_samples=2, gradient="exact")
        out = run_attack(attack, model, x, y, threat, batch_size=16, draws=2)
        assert out.extra["attack_info"]["resolved"]["gradient"] == "exact"
        assert out.extra["gradient_check"].finite
        assert out.backwards > 0 and not model.exact


def test_the_exact_gradient_cell_of_a_random_purifier_is_reproducible(trained_pair, digits_test):
    """An EBM's exact-gradient BPDA+EOT cell, run twice from the same seeds, gives the same per-sample
    draw counts (the chain's noise in the re-run segments is replayed, the scoring draws are seeded)."""
    torch.manual_seed(0)
    d = DEFENSES.get("ebm")(in_channels=1, width=4, steps=3, chains=2).eval()
    model = DefendedModel.for_defense(d, trained_pair["at"][0])
    x, y = digits_test.as_float()[:24], digits_test.labels[:24]
    attack = ATTACKS.get("bpda-eot")(steps=3, step_size=0.03, eot_samples=2, gradient="exact")
    runs = [run_attack(attack, model, x, y, Threat("linf", 0.1), batch_size=12, seed=4, draws=3) for _ in range(2)]
    assert runs[0].draws == 3 and torch.equal(runs[0].draw_counts, runs[1].draw_counts)
