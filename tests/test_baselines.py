"""The denoising baselines (APE-GAN, HGD, NRP, JATP), their shared training pairs, and SSP."""

import pytest
import torch

from attacks.base import Threat
from benchmark.artifacts import StageStore
from benchmark.harness import run_attack
from benchmark.registry import ATTACKS, DEFENSES
from defenses import pairs as pairs_mod
from defenses.base import DefendedModel, TrainContext
from defenses.pairs import PairTrain, static_pairs

TINY = {
    "apegan": dict(in_channels=1, width=8, critic_width=8),
    "hgd": dict(in_channels=1, width_scale=0.125),
    "nrp": dict(in_channels=1, width=8, blocks=1, growth=4, critic_width=8),
    "jatp": dict(in_channels=1, width_scale=0.125),
}
LOSS_KEY = {"apegan": "mse", "hgd": "loss", "nrp": "feature", "jatp": "loss"}


def build(name, **extra):
    return DEFENSES.get(name)(**{**TINY[name], **extra})


def test_paper_sizes():
    count = {n: sum(p.numel() for p in DEFENSES.get(n)().net.parameters()) for n in ("hgd", "nrp")}
    assert 10.5e6 < count["hgd"] < 11.5e6  # the CIFAR DUNET: about 11M
    assert 3.4e6 < count["nrp"] < 3.8e6  # RRDB with 5 blocks: about 3.6M
    ape = DEFENSES.get("apegan")()
    convs = [m for m in ape.generator_net.net if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert [m.kernel_size for m in convs] == [(5, 5)] * 4 and [m.stride for m in convs] == [(2, 2)] * 4
    assert [m.out_channels for m in convs] == [64, 128, 64, 3]


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("size", [8, 16, 20])
def test_output_shape_and_range(name, size):
    d = build(name).eval()
    x = torch.rand(3, 1, size, size)
    with torch.no_grad():
        out = d.purify(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    rgb = DEFENSES.get(name)(**{**TINY[name], "in_channels": 3}).eval()
    with torch.no_grad():
        assert rgb.purify(torch.rand(2, 3, 32, 32)).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("name", sorted(TINY))
def test_gradients_reach_the_input_and_declarations(name, trained_pair):
    d = build(name)
    model = DefendedModel(d, trained_pair["at"][0])
    x = torch.rand(4, 1, 16, 16, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert d.declarations() == {"stochastic": False, "differentiable": True, "uses_masks": False,
                                "trainable": True}


@pytest.mark.parametrize("name", sorted(TINY))
def test_training_lowers_its_own_loss_and_keeps_the_target_frozen(name, trained_pair, digits_train):
    clf = trained_pair["at"][0]
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    d = build(name)
    extra = {"lr": 1e-3} if name == "nrp" else {}  # (its 1e-4 barely moves a tiny RRDB in 24 steps)
    cfg = DEFENSES.get(name).TrainConfig(epochs=3, batch_size=64, eps=0.1, step_size=0.025, augment=False,
                                         progress=False, **extra)
    result = d.fit(clf, digits_train.subset(512, seed=0), TrainContext("cpu", 0), cfg)
    losses = [h[LOSS_KEY[name]] for h in result.history]
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())
    assert result.seconds_per_epoch > 0 and not d.training


def test_nrp_dynamic_is_stochastic_and_reproducible():
    d = build("nrp", mode="dynamic").eval()
    assert d.declarations()["stochastic"] and not build("nrp").declarations()["stochastic"]
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        d.seed(3)
        a, b = d.purify(x), d.purify(x)
        d.seed(3)
        c = d.purify(x)
    assert not torch.equal(a, b) and torch.equal(a, c)
    assert DefendedModel(d, torch.nn.Identity()).stochastic


def test_static_pairs_are_crafted_once_inside_the_ball_and_reused(tmp_path, trained_pair, digits_train,
                                                                  monkeypatch):
    clf = trained_pair["natural"][0]
    data = digits_train.subset(96, seed=0)
    cfg = PairTrain(eps=0.1, step_size=0.025, attack_steps=2)
    calls = []
    real = pairs_mod.craft_against_target
    monkeypatch.setattr(pairs_mod, "craft_against_target", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = static_pairs(clf, data, cfg, torch.device("cpu"), 0, StageStore(tmp_path))
    again = static_pairs(clf, data, cfg, torch.device("cpu"), 0, StageStore(tmp_path))
    assert len(calls) == 1 and torch.equal(first, again)  # the second use is a cache hit
    assert first.dtype == torch.uint8 and first.shape == data.images.shape
    diff = (first.to(torch.int16) - data.images.to(torch.int16)).abs()
    assert diff.max() <= 25 and diff.float().mean() > 5  # inside 0.1 = 25.5/255, and really perturbed
    with torch.no_grad():  # they are adversarial for the target
        acc_adv = (clf(first.float() / 255).argmax(1) == data.labels).float().mean()
        acc = (clf(data.as_float()).argmax(1) == data.labels).float().mean()
    assert acc_adv < acc
    static_pairs(clf, data, PairTrain(eps=0.1, step_size=0.025, attack_steps=3), torch.device("cpu"), 0,
                 StageStore(tmp_path))
    assert len(calls) == 2  # other attack settings: other pairs


def test_ssp_stays_in_the_ball_and_increases_the_feature_distance(trained_pair, digits_test):
    clf = trained_pair["at"][0]
    x, y = digits_test.as_float()[:64], digits_test.labels[:64]
    model = DefendedModel(build("hgd").eval(), clf)
    threat = Threat("linf", 0.1)
    attack = ATTACKS.get("ssp")(steps=20, step_size=0.025)
    outcome = run_attack(attack, model, x, y, threat, batch_size=64, seed=0)  # the harness checks the ball
    x_adv = attack(model, x, y, threat, torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    noise = (x + 0.1 * torch.sign(torch.randn_like(x))).clamp(0, 1)
    with torch.no_grad():
        ref = clf.feature_map(x)

        def dist(z):
            return (clf.feature_map(z) - ref).pow(2).mean().item()

        assert dist(x_adv) > 2 * dist(noise)
    assert 0 <= outcome.accuracy <= 1


def test_feature_map_layers_and_bad_names(trained_pair):
    clf = trained_pair["at"][0]
    x = torch.rand(2, 1, 16, 16)
    assert clf.feature_map(x).shape[1] == 64  # small-cnn default layer
    assert torch.equal(clf.feature_map(x, "logits"), clf(x))
    assert torch.equal(clf.feature_map(x, "penultimate"), clf.features(x))
    with pytest.raises(Exception, match="not a layer of SmallCNN; valid: default"):
        clf.feature_map(x, "layer3")


def test_jatp_is_labelled_a_reconstruction():
    cls = DEFENSES.get("jatp")
    assert "reconstruction" in cls.note and "reconstruction" in cls.__doc__
    assert "reconstruction" in DEFENSES.metadata("jatp")["paper"]


def test_nrp_and_nrp_dynamic_share_one_training(tmp_path):
    import json

    import yaml

    from benchmark.experiment import load_config
    from benchmark.records import load_records
    from benchmark.runner import Runner

    nrp = {"defense": "nrp", "options": {"width": 8, "blocks": 1, "growth": 4, "critic_width": 8},
           "train": {"epochs": 3, "batch_size": 32, "lr": 0.002, "eps": 0.1, "step_size": 0.025, "augment": False}}
    dyn = json.loads(json.dumps(nrp))
    dyn["options"]["mode"] = "dynamic"
    cfg = {"name": "nrp-share", "profile": "smoke", "device": "cpu",
           "datasets": [{"name": "digits", "n_train": 256}], "threat": {"eps": 0.1},
           "eval": {"n": 32, "batch_size": 32},
           "targets": [{"name": "at", "arch": "small-cnn",
                        "train": {"method": "natural", "epochs": 1, "batch_size": 64, "augment": False}}],
           "defenses": [{"name": "NRP", **nrp}, {"name": "NRP-dynamic", **dyn}],
           "attacks": [{"name": "clean"}]}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    Runner(load_config(path), out, progress=False).run()
    recs = {r.cell.defense: r for r in load_records(out)}
    assert recs["NRP"].defense_checkpoint_sha256 == recs["NRP-dynamic"].defense_checkpoint_sha256
    assert len(list((out / "artifacts" / "defenses").glob("*.json"))) == 1
    assert recs["NRP-dynamic"].defense_declarations["stochastic"]
    assert not recs["NRP"].defense_declarations["stochastic"]
    # NRP-dynamic is stochastic: scored under the smoke profile's 4 draws; NRP once
    assert recs["NRP-dynamic"].draws == 4 and recs["NRP"].draws == 1


@pytest.mark.slow
def test_compiled_denoiser_training_follows_the_eager_one(trained_pair, digits_train):
    """``train: {compile: true}``: the networks being trained run compiled (torch.compile in place,
    C++ through inductor on a CPU), the losses follow the eager training, and the defense is eager
    again afterwards (the run's evaluation decides its own compilation)."""
    from defenses.base import compiled

    clf, data = trained_pair["at"][0], digits_train.subset(256, seed=0)
    losses = {}
    for flag in (False, True):
        torch.manual_seed(0)
        cls = DEFENSES.get("hgd")
        hgd = cls(in_channels=1, width_scale=0.125)
        cfg = cls.TrainConfig(epochs=2, batch_size=64, eps=0.1, step_size=0.025, attack_steps=1, progress=False,
                              compile=flag)
        seen = []
        context = TrainContext("cpu", 0, on_epoch=lambda row, net=hgd.net, seen=seen:
                               seen.append(net._compiled_call_impl is not None))
        with compiled(hgd.compile_modules(training=True), cfg.compile):
            result = hgd.fit(clf, data, context, cfg)
        assert seen == [flag, flag] and hgd.net._compiled_call_impl is None
        losses[flag] = [h["loss"] for h in result.history if "loss" in h]
    # Adam turns float reassociation into visibly different steps early on (its first updates are
    # about lr * sign(g)), so the compiled losses follow the eager ones loosely, not bit for bit.
    assert len(losses[True]) == 2 and losses[True] == pytest.approx(losses[False], rel=0.05), losses
    assert losses[True][1] < 0.8 * losses[True][0]
