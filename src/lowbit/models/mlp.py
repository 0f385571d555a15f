"""A multilayer perceptron."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """x: float [N, ...] (flattened to in_features) -> [N, out_features]."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (256, 128), out_features: int = 10):
        super().__init__()
        layers, d = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
