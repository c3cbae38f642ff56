import pytest
import torch
from purifybench_testing import Quantize, TinyDenoiser

from benchmark.config import ConfigError
from benchmark.registry import DEFENSES
from defenses.base import DefendedModel, NoDefense


def test_none_defense_is_the_identity():
    d = DEFENSES.get("none")()
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(d.purify(x), x)
    assert d.declarations() == {"stochastic": False, "differentiable": True, "uses_masks": False, "trainable": False}
    with pytest.raises(ConfigError, match="takes no options"):
        NoDefense(strength=1)


def test_gradients_flow_through_a_differentiable_defense(trained_pair):
    model = DefendedModel(TinyDenoiser(), trained_pair["at"][0])
    assert all(not p.requires_grad for p in model.parameters())
    x = torch.rand(4, 1, 16, 16, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bpda_gives_gradients_where_the_defense_has_none(trained_pair):
    clf = trained_pair["at"][0]
    x = torch.rand(4, 1, 16, 16)
    y = torch.tensor([0, 1, 2, 3])
    plain = DefendedModel(Quantize(), clf, bpda=False)
    xg = x.clone().requires_grad_(True)
    (g_plain,) = torch.autograd.grad(torch.nn.functional.cross_entropy(plain(xg), y), xg)
    assert g_plain.abs().sum() == 0  # round() has zero gradient: naive PGD is blind
    bpda = DefendedModel(Quantize(), clf, bpda=True)
    xg = x.clone().requires_grad_(True)
    out = bpda(xg)
    with torch.no_grad():
        assert torch.allclose(out, plain(x))  # the forward pass is exact
    (g_bpda,) = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), xg)
    # identity surrogate: the gradient of the classifier at the purified image
    z = Quantize().purify(x).requires_grad_(True)
    (g_ref,) = torch.autograd.grad(torch.nn.functional.cross_entropy(clf(z), y), z)
    assert torch.allclose(g_bpda, g_ref, atol=1e-6) and g_bpda.abs().sum() > 0


def test_defended_model_stays_in_eval_mode(trained_pair):
    model = DefendedModel(TinyDenoiser(), trained_pair["at"][0])
    model.train()
    assert not any(m.training for m in model.modules())


def test_a_defense_without_options_class_takes_its_constructor_keywords():
    from defenses.base import Defense

    class Keywords(Defense):
        def __init__(self, a: int = 1, *, b: float) -> None:  # a required keyword after a default one
            super().__init__()

    assert Keywords.read_options({"b": 2}).b == 2.0 and Keywords.read_options({"b": 2}).a == 1
    with pytest.raises(ConfigError, match="unknown key 'c'"):
        Keywords.read_options({"b": 1, "c": 1})
    with pytest.raises(ConfigError, match="missing required key 'b'"):
        Keywords.read_options({})
    with pytest.raises(ConfigError, match="options.a: expected an integer"):
        Keywords.read_options({"a": "x", "b": 1})

    class AnyKeywords(Defense):  # **kwargs: its options are known only when it runs
        def __init__(self, **kwargs) -> None:
            super().__init__()

    assert AnyKeywords.read_options({"x": 1}) == {"x": 1}
