import pytest
import torch

from attacks.base import Threat
from benchmark.artifacts import StageStore
from benchmark.config import ConfigError
from benchmark.experiment import load_config
from benchmark.harness import run_attack
from benchmark.registry import ATTACKS, DEFENSES
from defenses.base import DefendedModel, TrainContext
from defenses.dir import DIR, DIRTrain

TINY = dict(image_size=16, in_channels=1, embed_dim=32, depth=2, num_heads=2, decoder_depth=1)
ROOT_CONFIGS = __import__("pathlib").Path(__file__).resolve().parent.parent / "configs"


def test_default_architecture_is_the_papers():
    d = DIR()
    net = d.net
    assert net.num_patches == 256 and net.patch_size == 2
    assert len(net.blocks) == 8 and len(net.decoder_blocks) == 2
    assert net.blocks[0].attn.heads == 3 and net.pos_embed.shape == (1, 257, 192)
    assert net.blocks[0].mlp[0].out_features == 768 and net.blocks[0].attn.qkv.bias is None
    assert net.head.out_features == 2 * 2 * 3
    assert d.num_views == 2 and d.num_visible == 128
    assert DIR.stochastic and DIR.differentiable and DIR.uses_masks
    assert DEFENSES.get("dir") is DIR


@pytest.mark.parametrize("ratio,views", [(0.5, 2), (0.3, 2), (0.7, 4)])
def test_masks_are_complementary_and_cover_every_patch(ratio, views):
    d = DIR(**TINY, mask_ratio=ratio)
    d.seed(0)
    x = torch.rand(5, 1, 16, 16)
    masks = d.patch_masks(d.sample_masks(x))  # (B, K, N)
    assert masks.shape == (5, views, 64)
    assert masks.any(dim=1).all()  # every patch visible in at least one view
    assert (masks.sum(-1) == round((1 - ratio) * 64)).all()  # each view hides the ratio
    if ratio == 0.5:
        assert (masks.sum(dim=1) == 1).all()  # exactly complementary halves


@pytest.mark.parametrize("mode", ["drop", "zero"])
def test_fixed_masks_are_deterministic_and_free_masks_are_not(mode):
    torch.manual_seed(0)  # some untrained initialisations saturate every pixel at 0 or 1, whatever the mask
    d = DIR(**TINY, mask_mode=mode).eval()
    d.seed(1)
    x = torch.rand(3, 1, 16, 16)
    m = d.sample_masks(x)
    with torch.no_grad():
        a, b = d.purify(x, masks=m), d.purify(x, masks=m)
        c, e = d.purify(x), d.purify(x)
    assert torch.equal(a, b)
    assert not torch.equal(c, e)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    d.seed(7)
    with torch.no_grad():
        f = d.purify(x)
    d.seed(7)
    with torch.no_grad():
        g = d.purify(x)
    assert torch.equal(f, g)  # the randomness is the defense's seedable generator


def test_any_size_and_channel_count():
    for size, ch in ((8, 3), (12, 1), (32, 3)):
        d = DIR(image_size=size, in_channels=ch, embed_dim=32, depth=1, num_heads=2, decoder_depth=1)
        with torch.no_grad():
            assert d.purify(torch.rand(2, ch, size, size)).shape == (2, ch, size, size)
    with pytest.raises(ConfigError, match="options.image_size: 15 is not divisible by patch_size 2"):
        DIR(image_size=15, patch_size=2)


def test_gradients_reach_the_input(trained_pair):
    torch.manual_seed(0)  # an untrained DIR saturates most pixels at 0 or 1; some initialisations all of them
    d = DIR(**TINY)
    model = DefendedModel(d, trained_pair["at"][0])
    x = torch.rand(4, 1, 16, 16, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.fixture(scope="module")
def pretrained_dir(trained_pair, digits_train, digits_test):
    torch.manual_seed(0)
    d = DIR(**TINY)
    d.seed(0)
    x = digits_test.as_float()[:100]
    with torch.no_grad():
        before = (d.restore_views(x) - x[:, None]).pow(2).mean().item()
    cfg = DIRTrain(pretrain_epochs=2, pretrain_batch_size=64, pretrain_lr=1e-3, eps=0.1, step_size=0.025,
                   augment=False, progress=False)
    d.pretrain(trained_pair["at"][0], digits_train, cfg, torch.device("cpu"), False, 0)
    with torch.no_grad():
        after = (d.restore_views(x) - x[:, None]).pow(2).mean().item()
    return d.eval(), before, after


def test_pretraining_lowers_reconstruction_error(pretrained_dir):
    _, before, after = pretrained_dir
    assert after < 0.5 * before, (before, after)


def test_one_main_step_changes_only_the_denoiser(trained_pair, digits_train):
    clf = trained_pair["at"][0]
    torch.manual_seed(0)  # an initialisation that saturates every pixel would get no gradient
    d = DIR(**TINY)
    target_before = {k: v.clone() for k, v in clf.state_dict().items()}
    dir_before = {k: v.clone() for k, v in d.state_dict().items()}
    cfg = DIRTrain(epochs=1, batch_size=64, eps=0.1, step_size=0.025, augment=False, progress=False, alpha=0.5)
    d.main_train(clf, digits_train.subset(64, seed=0), cfg, torch.device("cpu"), False, 0)
    assert all(torch.equal(v, clf.state_dict()[k]) for k, v in target_before.items())
    changed = [k for k, v in d.state_dict().items() if not torch.equal(v, dir_before[k])]
    assert len(changed) > 10


@pytest.mark.parametrize("project", [True, False])
def test_representation_delta_respects_the_ball_when_projected(trained_pair, project):
    clf = trained_pair["at"][0]
    d = DIR(**TINY)
    restored = torch.rand(16, 1, 16, 16)
    cfg = DIRTrain(eps=0.1, step_size=0.04, rep_steps=5, rep_project=project)
    delta = d.representation_delta(clf, restored, cfg)
    if project:
        assert delta.abs().max() <= 0.1 + 1e-6
        assert (restored + delta).min() >= -1e-6 and (restored + delta).max() <= 1 + 1e-6
    else:  # the official code's behaviour: 5 steps of 0.04 go past eps
        assert delta.abs().max() > 0.1 + 1e-3


def test_mask_adaptive_is_at_least_as_strong_as_pgd_and_representation_runs(pretrained_dir, trained_pair,
                                                                             digits_test):
    d, _, _ = pretrained_dir
    model = DefendedModel(d, trained_pair["at"][0])
    data = digits_test.subset(100, seed=1)
    x, y = data.as_float(), data.labels
    threat = Threat("linf", 0.1)
    pgd = run_attack(ATTACKS.get("pgd")(steps=20, step_size=0.025), model, x, y, threat, batch_size=100)
    adaptive = run_attack(ATTACKS.get("mask-adaptive")(steps=20, step_size=0.025), model, x, y, threat,
                          batch_size=100)
    assert adaptive.accuracy <= pgd.accuracy + 0.05  # the known-mask attack is no weaker (up to noise)
    eot = run_attack(ATTACKS.get("eot-pgd")(steps=10, step_size=0.025, eot=3), model, x, y, threat, batch_size=100)
    assert eot.backwards == 10 * 3 * 100
    rep = run_attack(ATTACKS.get("representation")(steps=10, step_size=0.025), model, x, y, threat,
                     batch_size=100)
    assert 0 <= rep.accuracy <= 1 and rep.backwards == 10 * 100
    assert not ATTACKS.get("mask-adaptive").applies_to(DEFENSES.get("none"))


def test_noise_discard_keeps_less_noise_as_the_fraction_grows(trained_pair, digits_test):
    from defenses.base import NoDefense

    model = DefendedModel(NoDefense(), trained_pair["natural"][0])
    data = digits_test.subset(100, seed=2)
    x, y = data.as_float(), data.labels
    threat = Threat("linf", 0.1)
    accs = [run_attack(ATTACKS.get("noise-discard")(steps=10, step_size=0.025, fraction=f), model, x, y, threat,
                       batch_size=100).accuracy for f in (0.0, 0.9, 1.0)]
    assert accs[0] < accs[1] <= accs[2]


@pytest.mark.parametrize("enc,dec", [(4, 1), (4, 2), (6, 1), (6, 2), (8, 2), (12, 4)])
def test_table5_configs_build_the_stated_depths(enc, dec):
    cfg = load_config(ROOT_CONFIGS / "paper" / "cifar10_dir_depth.yaml")
    spec = next(s for s in cfg.defenses if s.name == f"dir-{enc}-{dec}")
    from benchmark.experiment import build_defense

    d = build_defense(spec, "test", (3, 32))
    assert len(d.net.blocks) == enc and len(d.net.decoder_blocks) == dec


def test_code_head_mixes_tokens_and_matches_the_official_parameter_count():
    paper, code = DIR(), DIR(head="token-conv")
    n_paper = sum(p.numel() for p in paper.parameters())
    n_code = sum(p.numel() for p in code.parameters())
    assert 4.5e6 < n_paper < 4.7e6  # per-patch linear head
    assert 5.55e6 < n_code < 5.7e6  # the code's Conv1d over tokens: the spec's ~5.6M
    code.eval()
    code.seed(0)
    x = torch.rand(1, 3, 32, 32)
    m = code.sample_masks(x)
    # with a token-mixing head, changing one patch's decoder input changes other patches' pixels
    with torch.no_grad():
        a = code.purify(x, masks=m)
        x2 = x.clone()
        x2[..., :2, :2] = 1 - x2[..., :2, :2]
        b = code.purify(x2, masks=m)
    assert (a - b)[..., 16:, 16:].abs().max() > 0
    with pytest.raises(ConfigError, match="'token-conv' needs decoder_dim"):
        DIR(embed_dim=40, num_heads=2, head="token-conv")
    with pytest.raises(ConfigError, match="options.head: 'mlp' is not allowed"):
        DIR(head="mlp")


def test_pretraining_stage_is_shared_between_variants_that_differ_later(tmp_path, trained_pair, digits_train, caplog):
    clf = trained_pair["at"][0]
    data = digits_train.subset(128, seed=0)
    base = dict(pretrain_epochs=1, pretrain_batch_size=64, epochs=1, batch_size=64, eps=0.1, step_size=0.025,
                attack_steps=1, rep_steps=1, augment=False, progress=False)

    def fit(**train):
        d = DIR(**TINY)
        d.fit(clf, data, TrainContext("cpu", 3, stages=StageStore(tmp_path)), DIRTrain(**{**base, **train}))
        return d

    a = fit(alpha=2.0)
    stages = sorted(tmp_path.glob("dir-pretrain-*.json"))
    assert len(stages) == 1
    b = fit(alpha=2.0)  # same everything: pre-training reused, and the main training is identical
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    fit(alpha=0.0, rep_grad="target")  # differs only after pre-training: still one stage
    assert sorted(tmp_path.glob("dir-pretrain-*.json")) == stages
    fit(pretrain_lr=2e-4)  # a pre-training option: a new stage
    assert len(list(tmp_path.glob("dir-pretrain-*.json"))) == 2
    # a corrupted stage is rejected with a warning and redone, never loaded
    weights = stages[0].with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with caplog.at_level("WARNING", logger="purifybench"):
        fit(alpha=2.0)
    assert "DIR pre-training stage: cached artifact" in caplog.text and "rejected" in caplog.text


def test_joint_classifier_trains_a_copy_and_shares_pretraining(tmp_path, trained_pair, digits_train):
    clf = trained_pair["at"][0]
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    data = digits_train.subset(128, seed=0)
    cfg = DIRTrain(pretrain_epochs=1, pretrain_batch_size=64, epochs=1, batch_size=64, eps=0.1, step_size=0.025,
                   attack_steps=1, rep_steps=1, augment=False, progress=False, classifier_lr=0.05)
    context = TrainContext("cpu", 0, stages=StageStore(tmp_path))
    plain = DIR(**TINY)
    plain.fit(clf, data, context, cfg)
    joint = DIR(**TINY, joint_classifier=True)
    joint.fit(clf, data, context, cfg)
    assert len(list(tmp_path.glob("dir-pretrain-*.json"))) == 1  # the ViT's pre-training is shared
    assert plain.own_classifier is None and joint.own_classifier is not None
    assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())  # the target is untouched
    assert any(not torch.equal(p, q) for p, q in zip(joint.own_classifier.parameters(), clf.parameters()))
    assert not any(p.requires_grad for p in joint.own_classifier.parameters())
    assert joint.declarations()["own_classifier"]
    fresh = DIR(**TINY, joint_classifier=True)  # a cached artifact loads into a fresh instance
    fresh.attach_classifier(clf)
    fresh.load_state_dict(joint.state_dict())
