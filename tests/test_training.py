import pytest
import torch

from attacks.pgd import pgd_linf, trades_kl_linf
from benchmark.config import ConfigError, from_dict
from benchmark.models import create_model
from benchmark.training import (
    TrainConfig,
    evaluate_classifier,
    make_scheduler,
    mart_loss,
    train_classifier,
)


@pytest.mark.parametrize("method", ["natural", "at", "trades", "mart"])
def test_a_few_epochs_lower_the_loss(method, digits_train):
    torch.manual_seed(0)
    data = digits_train
    model = create_model("small-cnn", in_channels=1, mean=data.mean, std=data.std)
    cfg = TrainConfig(method=method, epochs=4, batch_size=64, lr=0.05, eps=0.1, step_size=0.025,
                      attack_steps=3, augment=method == "natural", progress=False)
    result = train_classifier(model, data, cfg, torch.device("cpu"))
    losses = [h["loss"] for h in result.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.85 * losses[0], losses
    assert result.seconds_per_epoch > 0 and len(result.history) == 4


@pytest.mark.slow
def test_compiled_training_follows_the_eager_one(digits_train):
    """``compile: true`` (torch.compile, C++ through inductor on a CPU) trains the same model: the same
    batches and augmentations, so the per-epoch losses agree up to floating-point reassociation."""
    data = digits_train.subset(512, seed=0)
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = create_model("small-cnn", in_channels=1, mean=data.mean, std=data.std)
        cfg = TrainConfig(method="at", epochs=2, batch_size=64, lr=0.05, eps=0.1, step_size=0.025,
                          attack_steps=2, progress=False, compile=compiled)
        runs[compiled] = [h["loss"] for h in train_classifier(model, data, cfg, torch.device("cpu")).history]
    assert runs[True] == pytest.approx(runs[False], rel=1e-3), runs


def test_adversarial_training_beats_natural_training_under_pgd(trained_pair):
    nat, at = trained_pair["natural"][1].metrics, trained_pair["at"][1].metrics
    assert nat["clean_acc"] > 0.9 and at["clean_acc"] > 0.85
    assert at["pgd_acc"] > nat["pgd_acc"] + 0.3, (nat, at)


def test_pgd_stays_in_the_threat_ball_and_hurts(trained_pair, digits_test):
    model = trained_pair["natural"][0]
    x, y = digits_test.as_float()[:64], digits_test.labels[:64]
    x_adv = pgd_linf(model, x, y, eps=0.1, step_size=0.025, steps=10)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).float().mean() < (model(x).argmax(1) == y).float().mean()
    x_t = trades_kl_linf(model, x, eps=0.1, step_size=0.025, steps=3)
    assert (x_t - x).abs().max() <= 0.1 + 1e-6
    big = evaluate_classifier(model, digits_test.subset(100), torch.device("cpu"), eps=0.3, step_size=0.05, steps=20)
    assert big["pgd_acc"] < 0.05  # a natural model has no robustness at a large budget


def test_pgd_does_not_touch_parameter_gradients(trained_pair, digits_test):
    model = trained_pair["at"][0]
    for p in model.parameters():
        p.grad = None
    x, y = digits_test.as_float()[:8], digits_test.labels[:8]
    pgd_linf(model, x, y, eps=0.1, step_size=0.025, steps=2)
    assert all(p.grad is None for p in model.parameters())


def test_mart_loss_is_finite_and_positive():
    logits_adv, logits_nat = torch.randn(16, 10), torch.randn(16, 10)
    y = torch.randint(0, 10, (16,))
    loss = mart_loss(logits_adv, logits_nat, y, beta=6.0)
    assert torch.isfinite(loss) and loss > 0


def test_step_schedule_drops_at_the_milestones():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    cfg = TrainConfig(schedule="step", milestones=[0.5, 0.75], lr=0.1)
    sched = make_scheduler(opt, cfg, 100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[60] == pytest.approx(0.01) and lrs[90] == pytest.approx(0.001)


def test_train_config_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"train.method: 'adv' is not allowed.*'natural', 'at', 'trades', 'mart'"):
        from_dict(TrainConfig, {"method": "adv"}, "train")
    with pytest.raises(ConfigError, match=r"train: unknown key 'epoch' \(did you mean 'epochs'\?\)"):
        from_dict(TrainConfig, {"epoch": 3}, "train")
    with pytest.raises(ConfigError, match="train.eps: must be in"):
        from_dict(TrainConfig, {"eps": -0.1}, "train")
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        from_dict(TrainConfig, {"epochs": "ten"}, "train")
    assert from_dict(TrainConfig, {"lr": 1}, "train").lr == 1.0


def test_deterministic_training_gives_the_same_checkpoint_hash_twice(tmp_path, digits_train):
    """``train: {deterministic: true}``: a target retrained by another job is bit-identical (the
    artifact's hash, which every record carries, is equal); the switches are restored afterwards,
    and the option enters the artifact key only when on (older keys are unchanged)."""
    from unittest import mock

    from benchmark.experiment import (
        DatasetSpec,
        ExperimentConfig,
        TargetSpec,
        prepare_target,
        target_key,
    )

    data = digits_train.subset(256, seed=0)
    ds = DatasetSpec(name="digits", options={"size": 16})
    train = from_dict(TrainConfig, dict(method="at", epochs=1, batch_size=64, lr=0.05, eps=0.1, step_size=0.025,
                                        attack_steps=2, augment=True, progress=False, deterministic=True,
                                        eval_n=None), "train")
    target = TargetSpec(name="t", arch="small-cnn", train=train)
    cfg = ExperimentConfig(name="det", datasets=[ds], targets=[target])
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    cards = []
    for job in ("job-a", "job-b"):
        torch.manual_seed(1234 if job == "job-a" else 99)  # whatever ran before in that job
        with mock.patch("benchmark.experiment.train_split", return_value=data):
            _, card, reused = prepare_target(ds, target, cfg, torch.device("cpu"), tmp_path / job, progress=False)
        assert not reused
        cards.append(card)
    assert cards[0]["sha256"] == cards[1]["sha256"]
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    off = TargetSpec(name="t", arch="small-cnn", train=from_dict(TrainConfig, {}, "train"))
    assert target_key(ds, off, 0) != target_key(ds, target, 0)
    from benchmark.experiment import target_identity

    assert "deterministic" not in target_identity(off)["train"] and target_identity(target)["train"]["deterministic"]


def test_deterministic_switches_are_restored_after_an_error():
    from benchmark.runtime import deterministic_algorithms

    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.benchmark, cudnn.deterministic)
    try:
        torch.use_deterministic_algorithms(False)
        cudnn.benchmark, cudnn.deterministic = True, False
        with pytest.raises(RuntimeError, match="inside"):
            with deterministic_algorithms(True, seed=3):
                assert torch.are_deterministic_algorithms_enabled() and cudnn.deterministic and not cudnn.benchmark
                first = torch.rand(3)
                raise RuntimeError("inside")
        assert not torch.are_deterministic_algorithms_enabled() and cudnn.benchmark and not cudnn.deterministic
        with deterministic_algorithms(True, seed=3):
            assert torch.equal(torch.rand(3), first)  # seeded on entry
        with deterministic_algorithms(False):
            assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.benchmark, cudnn.deterministic = saved[2], saved[3]
