"""Checkpoints: safetensors weights plus a JSON model card. Loading never unpickles code.

A checkpoint ``<stem>`` is two files:

* ``<stem>.safetensors``: the state dict of a :class:`~benchmark.models.Classifier`;
* ``<stem>.json``: the model card (architecture and its options, dataset, classes,
  normalization, training method and config, metrics, library versions, and the
  sha256 of the weights file).

Loading verifies the hash before reading a byte of the weights. A plain ``.pt``
state dict (from elsewhere) loads only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from benchmark.errors import CheckpointError
from benchmark.io import atomic_write, atomic_write_json, sha256_file
from benchmark.models import Classifier, create_model
from benchmark.runtime import versions

CARD_FORMAT = "purifybench-checkpoint/1"
REQUIRED_CARD_KEYS = ("format", "weights", "sha256")
REQUIRED_BY_KIND = {
    "classifier": ("arch", "num_classes", "in_channels", "mean", "std"),
    "defense": ("defense", "options"),
}


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, card) paths for a stem, a ``.json`` card or a ``.safetensors`` file."""
    path = Path(path)
    if path.suffix in (".json", ".safetensors"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def save_checkpoint(model: nn.Module, path: str | Path, card: dict[str, Any]) -> Path:
    """Write weights then card, each atomically; return the card path.

    ``card["kind"]`` is ``"classifier"`` (the default: the card must give ``arch``,
    ``num_classes``, ``in_channels``, ``mean`` and ``std``) or ``"defense"`` (``defense``
    and ``options``); it may give anything else that is JSON (dataset, config, metrics...).
    """
    weights, card_path = checkpoint_paths(path)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
    full = {
        "format": CARD_FORMAT,
        "kind": "classifier",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        **card,
        "weights": weights.name,
        "sha256": sha256_file(weights),
        "num_tensors": len(state),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
    }
    missing = [k for k in REQUIRED_CARD_KEYS + REQUIRED_BY_KIND.get(full["kind"], ()) if k not in full]
    if missing:
        raise CheckpointError(f"checkpoint {card_path}: card lacks {missing}")
    atomic_write_json(card_path, full)
    return card_path


def read_card(path: str | Path) -> dict[str, Any]:
    _, card_path = checkpoint_paths(path)
    if not card_path.is_file():
        raise CheckpointError(f"checkpoint card {card_path} not found")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint card {card_path} is not valid JSON ({exc})") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"checkpoint card {card_path} must be a JSON object")
    kind = card.get("kind", "classifier")
    if kind not in REQUIRED_BY_KIND:
        raise CheckpointError(f"checkpoint card {card_path}: kind {kind!r}; allowed: {', '.join(REQUIRED_BY_KIND)}")
    missing = [k for k in REQUIRED_CARD_KEYS + REQUIRED_BY_KIND[kind] if k not in card]
    if missing:
        raise CheckpointError(f"checkpoint card {card_path} lacks key {missing[0]!r}")
    if card["format"] != CARD_FORMAT:
        raise CheckpointError(f"checkpoint card {card_path}: format {card['format']!r}, expected {CARD_FORMAT!r}")
    return card


def load_verified_state(path: str | Path, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a card, verify the weights' hash, return (state dict, card)."""
    _, card_path = checkpoint_paths(path)
    card = read_card(path)
    if kind is not None and card.get("kind", "classifier") != kind:
        raise CheckpointError(f"checkpoint {card_path} holds a {card.get('kind', 'classifier')}, expected a {kind}")
    weights = verify_weights(card, card_path)
    return load_state_file(weights), card


def verify_weights(card: dict, card_path: Path) -> Path:
    weights = card_path.parent / Path(card["weights"]).name  # never follow a path out of the folder
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights {weights} not found (named by {card_path})")
    actual = sha256_file(weights)
    if actual != card["sha256"]:
        raise CheckpointError(
            f"checkpoint {weights}: sha256 {actual[:16]}... does not match the card's {str(card['sha256'])[:16]}... "
            "(file changed or corrupt); refusing to load"
        )
    return weights


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or, for ``.pt``/``.pth``, with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"weights file {path} is corrupt, truncated or not a plain state dict ({first})") from None
    except Exception as exc:  # weights_only refuses anything that is not plain tensors/containers
        raise CheckpointError(f"weights file {path} was refused: {type(exc).__name__}") from None
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"weights file {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def check_fits(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """:class:`CheckpointError` unless ``state`` has exactly ``module``'s entries, in its shapes."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{where}: weights do not fit the architecture (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, other shapes {shapes[:3]})")


def load_into(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    check_fits(module, state, where)
    module.load_state_dict(state)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """Load a suite checkpoint: verify the hash, build the architecture, load the weights."""
    state, card = load_verified_state(path, "classifier")
    model = create_model(
        card["arch"], num_classes=int(card["num_classes"]), in_channels=int(card["in_channels"]),
        mean=card["mean"], std=card["std"], **card.get("arch_options", {}),
    )
    load_into(model, state, f"checkpoint {checkpoint_paths(path)[0]}")
    return model.to(device).eval(), card


# ----------------------------------------------------------------------------- pretrained
AUTOATTACK_RESNET18_SHA256 = "399f52da9f914c323fa5a6096d60f460a3449a59b64a6405200c1e629f8425a7"


def _autoattack_example_path() -> Path:
    spec = importlib.util.find_spec("pyautoattack")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("pretrained 'autoattack-resnet18-natural' needs the pyautoattack package (pip install pyautoattack)")
    path = Path(next(iter(spec.submodule_search_locations))) / "examples" / "model_test.pt"
    if not path.is_file():
        raise CheckpointError(f"pretrained 'autoattack-resnet18-natural': {path} not found in the pyautoattack install")
    return path


def _autoattack_resnet18() -> tuple[Classifier, dict]:
    path = _autoattack_example_path()
    digest = sha256_file(path)
    if digest != AUTOATTACK_RESNET18_SHA256:
        raise CheckpointError(f"{path}: sha256 {digest[:16]}... differs from the known pyautoattack 0.2.0 file")
    # The example model takes raw [0,1] images (AutoAttack's eval.py applies only ToTensor).
    model = create_model("resnet18", num_classes=10, in_channels=3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    load_into(model.net, load_state_file(path), f"pretrained {path}")
    card = {
        "format": CARD_FORMAT, "kind": "classifier", "arch": "resnet18", "num_classes": 10, "in_channels": 3,
        "mean": [0.0] * 3, "std": [1.0] * 3, "weights": str(path), "sha256": digest,
        "dataset": "cifar10", "method": "natural",
        "source": "pyautoattack wheel, examples/model_test.pt (naturally trained CIFAR-10 ResNet-18)",
    }
    return model.eval(), card


PRETRAINED = {
    "autoattack-resnet18-natural": _autoattack_resnet18,
}


def load_pretrained(name: str, device: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    if name not in PRETRAINED:
        import difflib

        close = difflib.get_close_matches(name, list(PRETRAINED), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CheckpointError(f"unknown pretrained model {name!r}{hint}; valid: {', '.join(PRETRAINED)}")
    model, card = PRETRAINED[name]()
    return model.to(device), card
