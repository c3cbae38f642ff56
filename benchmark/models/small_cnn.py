"""A small CNN for smoke runs (four 3x3 convs, two max-pools, two dense layers)."""

from __future__ import annotations

import torch
from torch import nn

from benchmark.registry import MODELS


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, hidden: int = 128) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2, ceil_mode=True),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, hidden), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(hidden, num_classes)
        self.feature_layer = "body.9"  # mid-level features for feature-space losses and attacks

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@MODELS.register("small-cnn", params="~0.2M", description="small CNN for smoke runs")
def small_cnn(num_classes: int = 10, in_channels: int = 3, width: int = 32, hidden: int = 128) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, width, hidden)
