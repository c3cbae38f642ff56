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
