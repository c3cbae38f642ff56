"""The attack engine's speed options keep every attack's result (fp32 on the CPU)."""

import copy

import pytest
import torch

from attacks.base import Threat
from attacks.engine import AttackView, EngineOptions, auto_batch_size
from benchmark.config import ConfigError
from benchmark.harness import run_attack
from benchmark.registry import ATTACKS
from defenses.base import DefendedModel, NoDefense

THREAT = Threat("linf", 0.1)


@pytest.fixture(scope="module")
def batch(digits_test):
    sub = digits_test.subset(96, seed=1)
    return sub.as_float(), sub.labels


def _defended(trained_pair):
    return DefendedModel(NoDefense(), copy.deepcopy(trained_pair["at"][0]))


def _run(model, attack, x, y, engine=None, batch_size=48):
    return run_attack(attack, model, x, y, THREAT, batch_size=batch_size, seed=3, engine=engine)


@pytest.mark.parametrize("name, params", [
    ("pgd", {"steps": 8, "step_size": 0.025}),
    ("eot-pgd", {"steps": 5, "step_size": 0.025, "eot": 4}),
    ("vni-fgsm", {"steps": 4, "neighbors": 5}),
])
def test_cpu_engine_options_give_identical_results(trained_pair, batch, name, params):
    x, y = batch
    base = _run(_defended(trained_pair), ATTACKS.get(name)(**params), x, y)
    for engine in (EngineOptions(eot_batch=4), EngineOptions(channels_last=True),
                   EngineOptions(channels_last=True, eot_batch=3)):
        fast = _run(_defended(trained_pair), ATTACKS.get(name)(**params), x, y, engine)
        assert torch.equal(fast.correct, base.correct), (name, engine)
        # the same image-passes, fewer (larger) forward calls
        assert (fast.forwards, fast.backwards) == (base.forwards, base.backwards)


@pytest.mark.slow
def test_compiled_defended_model_keeps_the_attack_result(trained_pair, batch):
    """``compile`` (torch.compile through inductor, C++ on a CPU) of the classifier and of the
    defense's network (a small DIR: its ViT) changes how they run, not what PGD finds: the same
    per-sample results and passes as the eager model, with the same seeded masks."""
    from defenses.dir import DIR

    x, y = batch
    torch.manual_seed(0)
    dir_ = DIR(image_size=16, in_channels=1, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_depth=1)
    attack = dict(steps=4, step_size=0.025)

    def defended():
        return DefendedModel(copy.deepcopy(dir_), copy.deepcopy(trained_pair["at"][0]))

    base = _run(defended(), ATTACKS.get("pgd")(**attack), x, y)
    model = defended()
    fast = _run(model, ATTACKS.get("pgd")(**attack), x, y, EngineOptions(compile=True))
    assert model.defense.net._compiled_call_impl is not None  # the ViT ran compiled
    assert torch.equal(fast.correct, base.correct)
    assert (fast.forwards, fast.backwards) == (base.forwards, base.backwards)
    assert fast.extra["engine"]["compile"] is True


def test_batched_eot_draws_independent_randomness_per_copy():
    class Noisy(torch.nn.Module):  # a stochastic "model": logits = x-independent noise + x
        def forward(self, x):
            return x.flatten(1)[:, :3] * 0 + torch.randn(len(x), 3)

    view = AttackView(Noisy(), EngineOptions(eot_batch=4), torch.device("cpu"))
    logits = view(torch.zeros(4 * 5, 1, 2, 2))
    assert len(torch.unique(logits[:, 0])) == 20  # every copy of every image drew its own noise


def test_bf16_attack_keeps_its_strength_and_scores_in_fp32(trained_pair, batch):
    x, y = batch
    attack = ATTACKS.get("pgd")(steps=10, step_size=0.025)
    base = _run(_defended(trained_pair), attack, x, y)
    bf16 = _run(_defended(trained_pair), attack, x, y, EngineOptions(precision="bf16"))
    assert abs(bf16.accuracy - base.accuracy) <= 0.05  # 96 images: within a few samples
    assert bf16.extra["engine"]["precision"] == "bf16"


def test_worst_of_equals_the_per_sample_and_with_early_exit(trained_pair, batch):
    x, y = batch
    pgd = {"steps": 6, "step_size": 0.025, "random_start": False}
    mi = {"steps": 6}
    a = _run(_defended(trained_pair), ATTACKS.get("pgd")(**pgd), x, y, batch_size=96)
    b = _run(_defended(trained_pair), ATTACKS.get("mi-fgsm")(**mi), x, y, batch_size=96)
    worst = ATTACKS.get("worst-of")(attacks=[{"name": "pgd", "params": pgd}, {"name": "mi-fgsm", "params": mi}])
    w = _run(_defended(trained_pair), worst, x, y, batch_size=96)
    assert torch.equal(w.correct, a.correct & b.correct)
    assert w.extra["attack_info"]["survivors"] == [a.n_correct, w.n_correct]
    # MI-FGSM ran on PGD's survivors only: fewer backward passes than both run in full
    assert w.backwards == 6 * 96 + 6 * a.n_correct < a.backwards + b.backwards
    with pytest.raises(ConfigError, match=r"attacks\[0\]\.name: unknown attack 'pgdd' \(did you mean 'pgd'\?\)"):
        ATTACKS.get("worst-of")(attacks=[{"name": "pgdd"}])
    with pytest.raises(ConfigError, match=r"'representation' cannot be part of worst-of"):
        ATTACKS.get("worst-of")(attacks=[{"name": "representation"}])


def test_auto_batch_size_on_cpu_and_eval_options_are_validated(tmp_path, trained_pair, batch):
    x, y = batch
    assert auto_batch_size(_defended(trained_pair), x, y, 96) == 96
    out = _run(_defended(trained_pair), ATTACKS.get("clean")(), x, y, batch_size="auto")
    assert out.extra["batch_size"] == 96
    from benchmark.config import from_dict
    from benchmark.experiment import EvalSpec

    with pytest.raises(ConfigError, match=r"eval\.eot_batch: must be >= 1"):
        from_dict(EvalSpec, {"eot_batch": 0}, "eval")
    with pytest.raises(ConfigError, match=r"eval\.precision"):
        from_dict(EvalSpec, {"precision": "fp16"}, "eval")
    assert from_dict(EvalSpec, {"batch_size": "auto"}, "eval").batch_size == "auto"


def test_gradient_check_flags_a_masked_defense_and_not_an_at_target(trained_pair, batch):
    from purifybench_testing import Quantize

    x, y = batch
    pgd = ATTACKS.get("pgd")(steps=2, step_size=0.025)
    masked = _run(DefendedModel(Quantize(), trained_pair["at"][0], bpda=False), pgd, x, y)
    assert masked.extra["gradient_check"].masked and masked.extra["gradient_check"].zero_gradient_fraction == 1
    honest = _run(DefendedModel(Quantize(), trained_pair["at"][0], bpda=True), pgd, x, y)  # BPDA: gradient flows
    plain = _run(_defended(trained_pair), pgd, x, y)
    assert not honest.extra["gradient_check"].masked and not plain.extra["gradient_check"].masked
    # steps and the re-scoring of the last and the best iterate; the check's pass is not counted
    assert plain.forwards == 48 * 2 * 2 + 2 * 96
    clean = _run(_defended(trained_pair), ATTACKS.get("clean")(), x, y)
    assert "gradient_check" not in clean.extra
