"""Target classifiers: architectures and the normalizing wrapper.

Attacks and defenses always see images in [0,1]; the per-dataset normalization
lives inside :class:`Classifier`, so no caller can forget it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from benchmark.errors import BenchError
from benchmark.registry import MODELS


class Classifier(nn.Module):
    """``net((x - mean) / std)`` for images ``x`` in [0,1]; also exposes penultimate features."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        c = len(mean)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, c, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (pooled) features of images in [0,1]."""
        return self.net.forward_features(self.normalize(x))

    def layer_names(self) -> list[str]:
        return [n for n, _ in self.net.named_modules() if n]

    def feature_map(self, x: torch.Tensor, layer: str = "default") -> torch.Tensor:
        """The output of the named submodule of the network for images in [0,1]; the forward
        stops there. ``default``: the architecture's mid-level layer (ResNet: layer3), used by
        feature-space losses and attacks (NRP, HGD-FGD, SSP); ``penultimate``: :meth:`features`;
        ``logits``: the output."""
        if layer == "penultimate":
            return self.features(x)
        if layer == "logits":
            return self(x)
        if layer == "default":
            layer = getattr(self.net, "feature_layer", None) or "penultimate"
            if layer == "penultimate":
                return self.features(x)
        return self.feature_maps(x, [layer])[0]

    def feature_maps(self, x: torch.Tensor, layers: Sequence[str]) -> list[torch.Tensor]:
        """The outputs of several named submodules in one forward pass, which stops after the last."""
        modules = dict(self.net.named_modules())
        for layer in layers:
            if layer not in modules or not layer:
                raise BenchError(f"feature layer {layer!r} is not a layer of {type(self.net).__name__}; valid: "
                                 f"default, penultimate, logits, {', '.join(self.layer_names()[:40])}")
        captured: dict[str, torch.Tensor] = {}
        handles = []
        for layer in dict.fromkeys(layers):
            def hook(_module, _inputs, output, layer=layer):
                captured[layer] = output
                if len(captured) == len(set(layers)):
                    raise _StopForward
            handles.append(modules[layer].register_forward_hook(hook))
        try:
            self.net(self.normalize(x))
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return [captured[layer] for layer in layers]


class _StopForward(Exception):
    """Raised by the feature hook to skip the rest of the forward pass."""


def create_model(
    arch: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs,
) -> Classifier:
    """Build a registered architecture wrapped with its input normalization."""
    builder = MODELS.get(arch)
    if mean is None:
        mean = (0.0,) * in_channels
    if std is None:
        std = (1.0,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise BenchError(f"model {arch!r}: mean/std must have {in_channels} entries (one per channel)")
    try:
        net = builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as exc:
        raise BenchError(f"model {arch!r}: bad options {sorted(kwargs)}: {exc}") from None
    return Classifier(net, mean, std)


# Register the built-in architectures (import for side effects).
from benchmark.models import resnet, small_cnn, wrn  # noqa: E402,F401

__all__ = ["Classifier", "create_model"]
