"""ME-Net, the EBM defense, AID-Purifier and the BPDA+EOT attack."""

import pytest
import torch

from attacks.base import Threat
from attacks.bpda_eot import BPDAEOTParams, resolve
from attacks.pgd import pgd_linf
from benchmark.config import ConfigError
from benchmark.harness import run_attack
from benchmark.registry import ATTACKS, DEFENSES
from defenses.base import DefendedModel, TrainContext
from defenses.menet import usvt

THREAT = Threat("linf", 0.1)


def test_usvt_is_exact_on_low_rank_images_and_close_at_half_the_pixels():
    torch.manual_seed(0)
    a, b = torch.rand(4, 32, 1) * 2 - 1, torch.rand(4, 1, 96) * 2 - 1
    z = a @ b  # rank 1 as the 32 x 96 channel-concatenated matrix in [-1,1], which USVT works on
    img = (z.reshape(4, 32, 3, 32).permute(0, 2, 1, 3) + 1) / 2
    full = torch.ones(4, 1, 32, 32, dtype=torch.bool)
    assert (usvt(img, full, rank=1) - img).abs().max() < 1e-4  # nothing masked: exact
    keep = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1)) < 0.5
    rec = usvt(img, keep, rank=1)
    gray = torch.where(keep, img, torch.full_like(img, 0.5))  # the masked input USVT starts from
    assert (rec - img).pow(2).mean() < 0.25 * (gray - img).pow(2).mean()
    assert (rec - img).pow(2).mean() < 0.005
    assert rec.min() >= 0 and rec.max() <= 1


def test_menet_is_random_reproducible_and_batched():
    d = DEFENSES.get("menet")().eval()
    x = torch.rand(5, 3, 32, 32)
    d.seed(4)
    a, b = d.purify(x), d.purify(x)
    d.seed(4)
    c = d.purify(x)
    assert not torch.equal(a, b) and torch.equal(a, c)
    assert d.declarations()["stochastic"] and not d.declarations()["differentiable"]


@pytest.fixture(scope="module")
def menet(trained_pair, digits_train):
    d = DEFENSES.get("menet")()
    d.attach_classifier(trained_pair["at"][0])
    cfg = d.TrainConfig(epochs=2, batch_size=64, lr=0.05, init="target", augment=False, progress=False,
                        eps=0.1, step_size=0.025)
    d.fit(trained_pair["at"][0], digits_train, TrainContext("cpu", 0), cfg)
    d.seed(0)
    return d.eval()


def test_menet_trains_its_own_classifier_and_leaves_the_target(menet, trained_pair, digits_test):
    target = trained_pair["at"][0]
    assert menet.own_classifier is not None and menet.own_classifier is not target
    assert any(not torch.equal(p, q) for p, q in zip(menet.own_classifier.parameters(), target.parameters()))
    model = DefendedModel(menet, menet.own_classifier, bpda=True)
    x, y = digits_test.as_float()[:128], digits_test.labels[:128]
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.8


def test_bpda_gradients_through_me_are_finite_and_bpda_eot_beats_naive_pgd(menet, digits_test):
    x, y = digits_test.as_float()[:64], digits_test.labels[:64]
    bpda = DefendedModel(menet, menet.own_classifier, bpda=True)
    naive = DefendedModel(menet, menet.own_classifier, bpda=False)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(bpda(xg), y), xg)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    xg = x.clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(torch.nn.functional.cross_entropy(naive(xg), y), xg)
    assert g0.abs().sum() == 0  # the numerically non-differentiable path gives no gradient
    pgd = run_attack(ATTACKS.get("pgd")(steps=10, step_size=0.025), naive, x, y, THREAT, batch_size=64, seed=0)
    strong = run_attack(ATTACKS.get("bpda-eot")(steps=10, step_size=0.025, eot_samples=3), naive, x, y, THREAT,
                        batch_size=64, seed=0)
    assert strong.accuracy < pgd.accuracy - 0.1, (strong.accuracy, pgd.accuracy)


def test_bpda_eot_reads_the_declarations():
    p = BPDAEOTParams()
    assert resolve(p, DEFENSES.get("menet")()) == (True, 15)
    assert resolve(p, DEFENSES.get("hgd")()) == (False, 1)
    assert resolve(p, DEFENSES.get("aid")()) == (True, 1)
    assert resolve(p, DEFENSES.get("aid")(attack_gradient="unrolled")) == (False, 1)
    assert resolve(BPDAEOTParams(bpda=False, eot=4), DEFENSES.get("dir")()) == (False, 4)


def test_autoattack_rand_composes_with_bpda_on_menet(menet, digits_test):
    x, y = digits_test.as_float()[:16], digits_test.labels[:16]
    model = DefendedModel(menet, menet.own_classifier, bpda=True)
    attack = ATTACKS.get("autoattack")(version="auto")
    out = run_attack(attack, model, x, y, THREAT, batch_size=16, seed=0)
    assert out.accuracy <= 1.0 and attack.describe()["version"] == "auto"


def test_ebm_training_separates_data_from_noise_and_purification_is_finite(trained_pair, digits_train,
                                                                         digits_test):
    d = DEFENSES.get("ebm")(in_channels=1, width=8, steps=10, chains=3)
    x = digits_test.as_float()[:64]
    cfg = d.TrainConfig(iterations=60, batch_size=64, mcmc_steps=10, log_every=20, progress=False)
    d.fit(trained_pair["natural"][0], digits_train, TrainContext("cpu", 0), cfg)
    with torch.no_grad():
        e_data = d.energy(x * 2 - 1).mean()
        e_noise = d.energy(torch.rand_like(x) * 2 - 1).mean()
    assert e_data < e_noise  # the model puts lower energy on data than on noise
    d.seed(0)
    out = d.purify(x[:8])
    assert torch.isfinite(out).all() and out.shape == x[:8].shape and 0 <= out.min() and out.max() <= 1
    model = DefendedModel(d, trained_pair["natural"][0], bpda=True)
    with torch.no_grad():
        logits = model(x[:8])  # 3 chains per image, averaged
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()
    assert DEFENSES.get("ebm")().declarations()["stochastic"]


def test_ebm_attack_chains_in_gradient_passes_and_chains_in_predictions():
    """Hill et al.'s attack averages single chains per EOT draw while predictions average 150: with
    ``attack_chains`` a pass that takes an input gradient runs that many chains per image, every
    other pass ``chains``; the gradient reaches the input through each chain (BPDA)."""
    seen = []

    class Probe(torch.nn.Module):  # a linear classifier that records the batch it is given
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, z):
            seen.append(len(z))
            return self.fc(z.flatten(1))

    d = DEFENSES.get("ebm")(in_channels=1, width=4, steps=2, chains=6, attack_chains=2).eval()
    model = DefendedModel(d, Probe(), bpda=True)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert model(x).shape == (3, 10)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg).sum(), xg)
    assert seen == [3 * 6, 3 * 2] and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # with the randomness fixed the attack must optimise the function that is scored: all chains
    seen.clear()
    with model.fixed_randomness(7):
        with torch.no_grad():
            scored = model(x)
        attacked = model(xg)
    assert seen == [3 * 6, 3 * 6] and torch.allclose(scored, attacked.detach())
    assert DEFENSES.get("ebm")(chains=5).attack_chains == 5  # unset: the same chains
    with pytest.raises(ConfigError, match="attack_chains"):
        DEFENSES.get("ebm")(attack_chains=0)


def test_aid_discriminator_prefers_clean_digits_and_purification_stays_in_the_ball(trained_pair, digits_train,
                                                                                 digits_test):
    clf = trained_pair["natural"][0]
    d = DEFENSES.get("aid")(width=64, eps=0.1)
    cfg = d.TrainConfig(epochs=3, batch_size=64, lr=0.05, eps=0.1, step_size=0.025, progress=False)
    d.fit(clf, digits_train, TrainContext("cpu", 0), cfg)
    x, y = digits_test.as_float()[:128], digits_test.labels[:128]
    x_adv = pgd_linf(clf, x, y, eps=0.1, step_size=0.025, steps=10)
    with torch.no_grad():
        assert torch.sigmoid(d.score(x)).mean() > torch.sigmoid(d.score(x_adv)).mean() + 0.05
    out = d.purify(x_adv)
    assert (out - x_adv).abs().max() <= 0.1 + 1e-6 and out.min() >= 0 and out.max() <= 1
    assert d.declarations()["differentiable"] and d.declarations()["prefers_bpda"]
    unrolled = DEFENSES.get("aid")(width=64, eps=0.1, steps=2, attack_gradient="unrolled")
    unrolled.attach_classifier(clf)
    unrolled.discriminator.load_state_dict(d.discriminator.state_dict())
    unrolled.eval()
    xg = x[:4].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(clf(unrolled.purify(xg)).sum(), xg)  # second order through the steps
    assert torch.isfinite(g).all() and g.abs().sum() > 0
