"""DIR as its released code trains it (``dir-official``) and its control without a denoiser (``joint-at``)."""

import math

import pytest
import torch
from torch import nn

from benchmark.artifacts import StageStore
from benchmark.config import ConfigError
from benchmark.registry import DEFENSES
from defenses.base import DefendedModel, TrainContext
from defenses.dir_official import (
    DIROfficial,
    DIROfficialTrain,
    JointAT,
    JointTrain,
    classifier_lr_factor,
    joint_objective,
    pretrain_lr_factor,
)

TINY = dict(image_size=16, in_channels=1, embed_dim=32, depth=2, num_heads=2, decoder_depth=1)
FAST = dict(batch_size=64, eps=0.1, step_size=0.025, attack_steps=1, rep_steps=1, augment=False, progress=False)


def test_the_released_architecture():
    d = DIROfficial()
    net = d.net
    assert DEFENSES.get("dir-official") is DIROfficial and DEFENSES.get("joint-at") is JointAT
    assert net.num_patches == 256 and len(net.blocks) == 8 and len(net.decoder_blocks) == 2
    assert net.pos_embed.shape == (1, 256, 192)  # no positional slot for the encoder's cls token
    assert net.decoder_pos_embed.shape == (1, 257, 192)
    assert isinstance(net.decoder_embed, nn.Identity) and isinstance(net.decoder_norm, nn.Identity)
    assert isinstance(net.head, nn.Conv1d) and net.head.weight.shape == (256, 256, 16) and net.head.stride == (16,)
    assert net.blocks[0].norm1.eps == 1e-5 and net.blocks[0].attn.qkv.bias is None
    assert d.num_views == 2 and d.num_visible == 128 and d.decoder_index_bug
    assert DIROfficial.stochastic and DIROfficial.uses_masks and DIROfficial.differentiable
    assert not JointAT.stochastic and JointAT.trainable
    with pytest.raises(ConfigError, match="options.embed_dim: the token Conv1d head needs embed_dim"):
        DIROfficial(image_size=16, in_channels=3, embed_dim=30, num_heads=3)


def test_the_restoration_is_not_clipped_and_fixed_masks_fix_it():
    torch.manual_seed(0)
    d = DIROfficial(**TINY).eval()
    d.seed(0)
    x = torch.rand(4, 1, 16, 16)
    masks = d.sample_masks(x)
    with torch.no_grad():
        a, b, c = d.purify(x, masks), d.purify(x, masks), d.purify(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() < 0 or a.max() > 1  # an untrained ViT leaves [0, 1]; the released code never clips


def _decoder_inputs(d: DIROfficial, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The tokens entering the decoder (positional embedding removed), (B, K, N, D)."""
    seen = []
    hook = d.net.decoder_blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        d.restore_views(x, masks)
    hook.remove()
    h = (seen[0] - d.net.decoder_pos_embed)[:, 1:]
    return h.view(len(x), d.num_views, d.net.num_patches, -1)


@pytest.mark.parametrize("bug", [False, True])
def test_decoder_index_bug_places_half_two_where_released(bug):
    torch.manual_seed(0)
    d = DIROfficial(**TINY, decoder_index_bug=bug).eval()
    d.seed(3)
    x = torch.rand(3, 1, 16, 16)
    order = d.sample_masks(x)
    tokens = _decoder_inputs(d, x, order)
    is_mask = torch.isclose(tokens, d.net.mask_token.view(1, 1, 1, -1).expand_as(tokens)).all(-1)  # (B, K, N)
    v = d.num_visible
    half1, half2 = order[:, :v], order[:, v:]
    for i in range(len(x)):
        # view 1 (the first half) always decodes its tokens at its own positions
        assert not is_mask[i, 0, half1[i]].any() and is_mask[i, 0, half2[i]].all()
        if bug:  # as released: half 2's encodings land in half 1's slots, its own positions get mask tokens
            assert not is_mask[i, 1, half1[i]].any() and is_mask[i, 1, half2[i]].all()
        else:
            assert not is_mask[i, 1, half2[i]].any() and is_mask[i, 1, half1[i]].all()


def _released_forward(net, img: torch.Tensor, forward_indexes: torch.Tensor, bug: bool) -> torch.Tensor:
    """``pretrain_model.MAE_ViT.forward`` transcribed, sequence first (tokens, batch, features), with the
    shuffle given: the encoder's ``PatchShuffle`` halves, the decoder's un-shuffle by backward indexes
    (``bug``: both halves with the same indexes, as released), the halves' features averaged, then
    the Conv1d over tokens and ``(h w) b (c p1 p2) -> b c (h p1) (w p2)``."""
    def take(seq, idx):
        return torch.gather(seq, 0, idx[..., None].expand(-1, -1, seq.shape[-1]))

    t, b = net.num_patches, len(img)
    fwd = forward_indexes.t()  # (T, B): the shuffled order
    bwd = torch.argsort(fwd, dim=0)
    patches = net.patch_embed(img).flatten(2).permute(2, 0, 1) + net.pos_embed[0][:, None]
    patches = take(patches, fwd)
    keep = int(t * 0.5)
    decoded = []
    for k, half in enumerate((patches[:keep], patches[keep:])):
        seq = torch.cat([net.cls_token[0][:, None].expand(-1, b, -1), half]).transpose(0, 1)
        for blk in net.blocks:
            seq = blk(seq)
        feats = net.norm(seq).transpose(0, 1)
        # released: backward indexes + 1 for every half; fixed: half 2's own positions come after half 1's
        shift = 0 if bug or k == 0 else keep
        back = torch.cat([torch.zeros(1, b, dtype=torch.long), (bwd - shift).clamp(min=-1) + 1])
        back = torch.where(back > 0, back, torch.where(torch.arange(t + 1)[:, None] == 0, 0, len(feats)))
        feats = torch.cat([feats, net.mask_token[0][:, None].expand(t + 1 - len(feats) + 1, b, -1)])
        feats = take(feats, back) + net.decoder_pos_embed[0][:, None]
        seq = feats.transpose(0, 1)
        for blk in net.decoder_blocks:
            seq = blk(seq)
        decoded.append(seq.transpose(0, 1)[1:])
    tokens = net.head(((decoded[0] + decoded[1]) / 2).transpose(0, 1)).transpose(0, 1)  # (T, B, c p p)
    g, p, c = net.grid, net.patch_size, net.in_channels
    return tokens.reshape(g, g, b, c, p, p).permute(2, 3, 0, 4, 1, 5).reshape(b, c, g * p, g * p)


@pytest.mark.parametrize("bug", [True, False])
def test_restoration_equals_the_released_forward(bug):
    torch.manual_seed(0)
    d = DIROfficial(image_size=8, in_channels=3, embed_dim=24, depth=2, num_heads=2, decoder_depth=1,
                    decoder_index_bug=bug).eval()
    d.seed(1)
    x = torch.rand(4, 3, 8, 8)
    order = d.sample_masks(x)
    with torch.no_grad():
        assert torch.allclose(d.restore(x, order), _released_forward(d.net, x, order, bug), atol=1e-5)


def test_the_released_learning_rate_schedules():
    factors = [classifier_lr_factor(s, 1, 91, [75 / 91, 90 / 91]) for s in range(91)]  # one step per epoch
    assert factors[:74] == [1.0] * 74 and factors[74:89] == [pytest.approx(0.1)] * 15
    assert factors[89:] == [pytest.approx(0.01)] * 2  # epochs 90 and 91
    assert pretrain_lr_factor(0, 1000, 0.2) == pytest.approx(1 / 200)
    # the released min(warm-up, cosine over all epochs): the cosine already bites during the warm-up
    assert pretrain_lr_factor(99, 1000, 0.2) == pytest.approx(0.5)
    assert pretrain_lr_factor(199, 1000, 0.2) == pytest.approx(0.5 * (math.cos(0.199 * math.pi) + 1))
    assert pretrain_lr_factor(500, 1000, 0.2) == pytest.approx(0.5)


def test_the_kl_gradient_reaches_the_classifier_through_both_arguments():
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    calls, grads = [], {}

    class Recorder(nn.Module):  # the classifier, recording the gradient that reaches each of its calls
        def forward(self, z):
            out = clf(z)
            index = len(calls)
            calls.append(index)
            out.register_hook(lambda g: grads.__setitem__(index, g.abs().sum().item()))
            return out

    restored = torch.rand(6, 1, 4, 4, requires_grad=True)
    again = torch.rand(6, 1, 4, 4, requires_grad=True)
    perturbed = torch.rand(6, 1, 4, 4)
    _, _, kl, _ = joint_objective(Recorder(), restored, again, perturbed, torch.zeros(6, dtype=torch.long), 1.0)
    kl.backward()
    assert calls == [0, 1, 2] and grads[1] > 0 and grads[2] > 0  # h(g(x')) the KL's target, h(x~ + delta) its other argument
    assert again.grad.abs().sum() > 0  # the denoiser gets the KL's gradient through h(g(x'))
    assert restored.grad is None  # the CE's restoration is not in the KL


def test_joint_training_from_scratch_with_the_released_groups(trained_pair, digits_train, tmp_path):
    target = trained_pair["at"][0]
    before = {k: v.clone() for k, v in target.state_dict().items()}
    data = digits_train.subset(128, seed=0)
    torch.manual_seed(0)
    d = DIROfficial(**TINY)
    d.attach_classifier(target)
    own = d.own_classifier
    weights = [n for n, p in target.named_parameters() if p.dim() > 1]
    start = dict(own.named_parameters())
    assert all(not torch.equal(start[n], dict(target.named_parameters())[n]) for n in weights)  # from scratch
    cfg = DIROfficialTrain(epochs=3, milestones=[2 / 3, 1.0], pretrain_epochs=2, pretrain_batch_size=64,
                           pretrain_attack_steps=1, pretrain_step_size=0.025, **FAST)
    result = d.fit(target, data, TrainContext("cpu", 0, stages=StageStore(tmp_path)), cfg)
    main = [h for h in result.history if h["phase"] == "main"]
    assert [h["classifier_lr"] for h in main] == pytest.approx([0.1, 0.01, 0.001])
    assert [h["denoiser_lr"] for h in main] == pytest.approx([5e-5] * 3)  # constant
    pre = [h for h in result.history if h["phase"] == "pretrain"]
    # AdamW at 1.5e-4 x 64 / 256; over 2 epochs the cosine (1, then 0.5) is below the warm-up's ramp
    assert [h["lr"] for h in pre] == pytest.approx([3.75e-5, 1.875e-5])
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # the target is untouched
    assert not any(p.requires_grad for p in d.own_classifier.parameters())
    assert list(tmp_path.glob("dir-official-pretrain-*.json")) and list(tmp_path.glob("pairs-pgd1-*.json"))
    model = DefendedModel.for_defense(d, target)
    assert model.classifier is d.own_classifier

    j = JointAT()
    j.attach_classifier(target)
    result = j.fit(target, data, TrainContext("cpu", 0), JointTrain(epochs=2, milestones=[1.0], **FAST))
    assert [h["classifier_lr"] for h in result.history] == pytest.approx([0.1, 0.01])
    assert "denoiser_lr" not in result.history[0]
    assert DefendedModel.for_defense(j, target).classifier is j.own_classifier
    x = data.as_float(torch.arange(8))
    assert torch.equal(j.purify(x), x)


def test_a_killed_joint_training_resumes_bit_identically(trained_pair, digits_train, tmp_path):
    from benchmark.resume import EpochCheckpoint

    target, data = trained_pair["at"][0], digits_train.subset(64, seed=1)

    class Killed(Exception):
        pass

    def kill(row):
        if row["epoch"] == 1:
            raise Killed

    def run(folder, on_epoch=None):
        torch.manual_seed(0)
        j = JointAT()
        j.attach_classifier(target)
        ctx = TrainContext("cpu", 0, checkpoint=EpochCheckpoint(folder, "k"), on_epoch=on_epoch)
        result = j.fit(target, data, ctx, JointTrain(epochs=2, milestones=[0.5], **FAST))
        return j, result

    whole, _ = run(tmp_path / "a")
    with pytest.raises(Killed):
        run(tmp_path / "b", kill)
    resumed, result = run(tmp_path / "b")
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all(torch.equal(p, q) for p, q in zip(whole.state_dict().values(), resumed.state_dict().values()))
