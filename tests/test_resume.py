"""Per-epoch training checkpoints: a training interrupted after an epoch resumes there and ends
with exactly the weights of an uninterrupted run (CPU); a state that fails its checks is ignored."""

import json

import pytest
import torch

from benchmark.models import create_model
from benchmark.resume import EpochCheckpoint
from benchmark.training import TrainConfig, train_classifier
from defenses.base import TrainContext

CFG = TrainConfig(method="at", epochs=3, batch_size=64, lr=0.05, eps=0.1, step_size=0.025, attack_steps=2,
                  augment=True, progress=False)


class Interrupted(Exception):
    pass


def _model(train):
    torch.manual_seed(5)
    return create_model("small-cnn", in_channels=1, mean=train.mean, std=train.std)


@pytest.fixture(scope="module")
def train(digits_train):
    return digits_train.subset(320, seed=0)


@pytest.fixture(scope="module")
def reference(train):
    model = _model(train)
    result = train_classifier(model, train, CFG, torch.device("cpu"))
    return model.state_dict(), result


def _stop_after(k):
    def hook(row):
        if row["epoch"] == k:
            raise Interrupted

    return hook


@pytest.mark.parametrize("stop", [1, 2])
def test_resumed_training_equals_the_uninterrupted_one(tmp_path, train, reference, stop):
    ckpt = EpochCheckpoint(tmp_path / "partial", key="k1")
    with pytest.raises(Interrupted):
        train_classifier(_model(train), train, CFG, torch.device("cpu"), checkpoint=ckpt, on_epoch=_stop_after(stop))
    assert ckpt.load()[0] == stop
    assert len(list((tmp_path / "partial").glob("epoch-*.safetensors"))) == 1  # older epochs are removed
    model = _model(train)
    torch.manual_seed(123)  # whatever ran in between must not matter
    epochs_run = []
    result = train_classifier(model, train, CFG, torch.device("cpu"), checkpoint=ckpt,
                              on_epoch=lambda row: epochs_run.append(row["epoch"]))
    assert epochs_run == list(range(stop + 1, CFG.epochs + 1))
    ref_state, ref_result = reference
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    assert [h["loss"] for h in result.history] == [h["loss"] for h in ref_result.history]


def test_a_state_of_another_training_or_with_a_bad_hash_is_ignored(tmp_path, train):
    ckpt = EpochCheckpoint(tmp_path / "partial", key="k1")
    with pytest.raises(Interrupted):
        train_classifier(_model(train), train, CFG, torch.device("cpu"), checkpoint=ckpt, on_epoch=_stop_after(1))
    assert EpochCheckpoint(tmp_path / "partial", key="other").load() is None
    tensors = next((tmp_path / "partial").glob("epoch-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-10])  # truncated
    assert ckpt.load() is None
    (tmp_path / "partial" / "state.json").write_text("{not json")
    assert ckpt.load() is None
    seen = []
    train_classifier(_model(train), train, CFG, torch.device("cpu"), checkpoint=ckpt,
                     on_epoch=lambda row: seen.append(row["epoch"]))
    assert seen == [1, 2, 3]  # started over


@pytest.mark.parametrize("joint", [False, True])
def test_dir_main_training_resumes_after_a_kill_with_identical_weights(tmp_path, trained_pair, digits_train, joint):
    from defenses.dir import DIR, DIRTrain

    tiny = dict(image_size=16, in_channels=1, embed_dim=32, depth=1, num_heads=2, decoder_depth=1,
                joint_classifier=joint)
    clf = trained_pair["at"][0]
    data = digits_train.subset(128, seed=0)
    cfg = DIRTrain(pretrain_epochs=0, epochs=3, batch_size=64, eps=0.1, step_size=0.025, attack_steps=1,
                   rep_steps=1, augment=True, progress=False, classifier_lr=0.05)

    def fresh():
        torch.manual_seed(0)
        d = DIR(**tiny)
        d.attach_classifier(clf)
        return d

    ref = fresh()
    ref.fit(clf, data, TrainContext("cpu", 0), cfg)
    killed = fresh()
    with pytest.raises(Interrupted):
        killed.fit(clf, data, TrainContext("cpu", 0, checkpoint=EpochCheckpoint(tmp_path / "dir.partial", "dir-k"),
                                           on_epoch=_stop_after(2)), cfg)
    resumed = fresh()
    seen = []
    result = resumed.fit(clf, data, TrainContext("cpu", 0, checkpoint=EpochCheckpoint(tmp_path / "dir.partial", "dir-k"),
                                                 on_epoch=lambda row: seen.append(row["epoch"])), cfg)
    assert seen == [3] and len([h for h in result.history if h.get("phase") == "main"]) == 3
    for (k, v), w in zip(resumed.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(v, w), k


def test_dir_pretraining_resumes_after_a_kill_with_identical_weights(tmp_path, trained_pair, digits_train):
    """DIR's pre-training runs in the shared loop too: killed after its first epoch, it resumes there
    (its state in the row's ``pretrain`` subfolder) and ends with an uninterrupted run's weights."""
    from defenses.dir import DIR, DIRTrain

    clf = trained_pair["at"][0]
    data = digits_train.subset(128, seed=0)
    cfg = DIRTrain(pretrain_epochs=2, pretrain_batch_size=64, epochs=1, batch_size=64, eps=0.1, step_size=0.025,
                   attack_steps=1, rep_steps=1, augment=True, progress=False)

    def fresh():
        torch.manual_seed(0)
        return DIR(image_size=16, in_channels=1, embed_dim=32, depth=1, num_heads=2, decoder_depth=1)

    ref = fresh()
    ref.fit(clf, data, TrainContext("cpu", 0), cfg)
    state = EpochCheckpoint(tmp_path / "dir.partial", "dir-k")
    with pytest.raises(Interrupted):
        fresh().fit(clf, data, TrainContext("cpu", 0, checkpoint=state, on_epoch=_stop_after(1)), cfg)
    assert EpochCheckpoint(tmp_path / "dir.partial" / "pretrain", "dir-k:pretrain").load()[0] == 1
    seen = []
    resumed = fresh()
    result = resumed.fit(clf, data, TrainContext("cpu", 0, checkpoint=state, on_epoch=seen.append), cfg)
    assert [(r["phase"], r["epoch"]) for r in seen] == [("pretrain", 2), ("main", 1)]
    assert [h["epoch"] for h in result.history if h["phase"] == "pretrain"] == [1, 2]
    for (k, v), w in zip(resumed.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(v, w), k


def _baseline(name):
    """A tiny instance of each baseline and a two-"epoch" training config for it."""
    from benchmark.registry import DEFENSES

    cls = DEFENSES.get(name)
    pair = dict(epochs=2, batch_size=64, eps=0.1, step_size=0.025, attack_steps=1, progress=False)
    return {
        "apegan": lambda: (cls(in_channels=1, width=8, critic_width=8), cls.TrainConfig(**pair, augment=True)),
        "hgd": lambda: (cls(in_channels=1, width_scale=0.125), cls.TrainConfig(**pair, augment=True)),
        "nrp": lambda: (cls(in_channels=1, width=8, blocks=1, growth=4, critic_width=8),
                        cls.TrainConfig(**pair, augment=False)),
        "jatp": lambda: (cls(in_channels=1, width_scale=0.125), cls.TrainConfig(**pair, augment=True)),
        "aid": lambda: (cls(width=16, eps=0.1), cls.TrainConfig(**pair)),
        "menet": lambda: (cls(), cls.TrainConfig(epochs=2, batch_size=64, lr=0.05, init="target", augment=True,
                                                 eps=0.1, step_size=0.025, progress=False)),
        "ebm": lambda: (cls(in_channels=1, width=8, steps=5, chains=2),
                        cls.TrainConfig(iterations=45, batch_size=32, mcmc_steps=5, log_every=10,
                                        checkpoint_every=20, progress=False)),
    }[name]()


@pytest.mark.parametrize("name", ["apegan", "hgd", "nrp", "jatp", "aid", "menet", "ebm"])
def test_baseline_training_resumes_after_a_kill_with_identical_weights(tmp_path, trained_pair, digits_train, name,
                                                                      monkeypatch):
    # one thread: EBM's training is not bit-reproducible across runs with several CPU threads at all
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _resume_check(tmp_path, trained_pair, digits_train, name)
    finally:
        torch.set_num_threads(threads)


def _resume_check(tmp_path, trained_pair, digits_train, name):
    clf = trained_pair["at"][0]
    data = digits_train.subset(128, seed=0)
    dev = torch.device("cpu")

    def fresh():
        torch.manual_seed(0)
        d, cfg = _baseline(name)
        if hasattr(d, "attach_classifier"):
            d.attach_classifier(clf)
        return d, cfg

    ref, cfg = fresh()
    history = ref.fit(clf, data, TrainContext(dev, 0), cfg).history
    periods = len(history)  # epochs (EBM: periods of log_every iterations, the last one shorter)
    if name == "ebm":
        assert [h["iteration"] for h in history] == [10, 20, 30, 40, 45]
    state = EpochCheckpoint(tmp_path / "partial", f"{name}-k")

    killed, _ = fresh()

    def stop(row):  # killed once a state is saved (EBM saves every checkpoint_every iterations, 2 periods)
        if state.state_path.is_file():
            raise Interrupted

    with pytest.raises(Interrupted):
        killed.fit(clf, data, TrainContext(dev, 0, checkpoint=state, on_epoch=stop), cfg)
    saved = state.load()[0]
    assert saved == (2 if name == "ebm" else 1)

    resumed, _ = fresh()
    seen = []
    torch.manual_seed(123)  # whatever ran in between must not matter
    resumed.fit(clf, data, TrainContext(dev, 0, checkpoint=state, on_epoch=seen.append), cfg)
    assert len(seen) == periods - saved  # only the epochs after the saved one ran
    ref_state = ref.state_dict()
    assert resumed.state_dict().keys() == ref_state.keys()
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_a_state_laid_out_for_another_loop_is_ignored_before_anything_loads(tmp_path, caplog):
    """A state saved by an older version of a loop (other module names: a target's loop before it
    ran in the Trainer) restarts the training instead of failing or half-loading."""
    from benchmark.resume import LoopState, pack
    from defenses.base import TrainContext

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ckpt = EpochCheckpoint(tmp_path / "state", "key")
    old_net = torch.nn.Linear(2, 2)
    tensors, meta = pack(modules={"model": old_net}, optimizers={"sgd": opt}, gens={})
    ckpt.save(1, tensors, meta | {"history": [{"epoch": 1}], "scheduler": {}})
    before = net.weight.detach().clone()
    loop = LoopState(net, "target", TrainContext("cpu", checkpoint=ckpt), optimizers={"sgd": opt}, gens={})
    with caplog.at_level("WARNING", logger="purifybench"):
        assert loop.resume() == (0, [])
    assert "laid out for another loop" in caplog.text and torch.equal(net.weight, before)


def test_a_state_saved_under_another_counting_is_not_resumed(tmp_path, caplog):
    """EBM's loop counts periods of iterations: a state saved when its epochs meant something else
    (an older version, or another ``log_every``) restarts the training."""
    from benchmark.resume import LoopState, pack
    from defenses.base import TrainContext

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ckpt = EpochCheckpoint(tmp_path / "state", "key")
    saver = LoopState(net, "EBM", TrainContext("cpu", checkpoint=ckpt), optimizers={"sgd": opt}, gens={},
                      layout="500 iterations per epoch")
    saver.epoch_done(3, 10, [{"epoch": 3}])
    assert json.loads(ckpt.state_path.read_text())["layout"] == "500 iterations per epoch"
    same = LoopState(net, "EBM", TrainContext("cpu", checkpoint=ckpt), optimizers={"sgd": opt}, gens={},
                     layout="500 iterations per epoch")
    assert same.resume() == (3, [{"epoch": 3}])
    for layout in ("20 iterations per epoch", None):
        other = LoopState(net, "EBM", TrainContext("cpu", checkpoint=ckpt), optimizers={"sgd": opt}, gens={},
                          layout=layout)
        with caplog.at_level("WARNING", logger="purifybench"):
            assert other.resume() == (0, [])
    assert "laid out for another loop" in caplog.text
    tensors, meta = pack(modules={"defense": net}, optimizers={"sgd": opt}, gens={})
    ckpt.save(1, tensors, meta | {"history": [{"iteration": 500}], "schedulers": {}})  # before layouts existed
    with caplog.at_level("WARNING", logger="purifybench"):
        assert same.resume() == (0, [])
