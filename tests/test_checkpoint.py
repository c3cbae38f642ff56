import json
import pickle

import pytest
import torch

from benchmark.checkpoint import (
    load_checkpoint,
    load_pretrained,
    load_state_file,
    read_card,
    save_checkpoint,
)
from benchmark.errors import CheckpointError
from benchmark.models import create_model


def _card(model_kwargs):
    return {"arch": "small-cnn", "num_classes": 10, "in_channels": 1, "mean": [0.3], "std": [0.3],
            "method": "natural", "metrics": {"clean_acc": 0.5}, **model_kwargs}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, mean=(0.3,), std=(0.3,)).eval()
    card_path = save_checkpoint(model, tmp_path / "target", _card({}))
    return model, card_path


def test_round_trip(saved):
    model, card_path = saved
    loaded, card = load_checkpoint(card_path)
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert card["arch"] == "small-cnn" and len(card["sha256"]) == 64
    assert card["versions"]["torch"] == torch.__version__
    assert (card_path.parent / "target.safetensors").is_file()
    for form in (card_path.with_suffix(""), card_path.with_suffix(".safetensors")):
        assert load_checkpoint(form)[1]["sha256"] == card["sha256"]


def test_tampered_weights_are_refused(saved):
    _, card_path = saved
    weights = card_path.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the card.*refusing to load"):
        load_checkpoint(card_path)


def test_corrupt_card_and_missing_files(saved, tmp_path):
    _, card_path = saved
    card_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(card_path)
    card_path.write_text(json.dumps({"format": "purifybench-checkpoint/1", "weights": "w", "sha256": "0"}))
    with pytest.raises(CheckpointError, match="lacks key 'arch'"):
        read_card(card_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing")


def test_truncated_and_mismatched_weights(saved, tmp_path):
    _, card_path = saved
    weights = card_path.with_suffix(".safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_state_file(cut)
    card = json.loads(card_path.read_text())
    card["arch"] = "resnet18"
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        load_checkpoint(card_path)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_pt_files_load_only_as_plain_weights(tmp_path):
    model = create_model("small-cnn", in_channels=1)
    good = tmp_path / "plain.pt"
    torch.save({"state_dict": model.state_dict()}, good)
    state = load_state_file(good)
    assert set(state) == set(model.state_dict())
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"w": _Evil()}, fh)
    with pytest.raises(CheckpointError, match="refused|corrupt"):
        load_state_file(evil)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError):
        load_state_file(text)


def test_unknown_pretrained_name():
    with pytest.raises(CheckpointError, match="unknown pretrained model 'autoattack-resnet18'.*did you mean"):
        load_pretrained("autoattack-resnet18")
