"""A multilayer perceptron."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """x: float [N, ...] (flattened to in_features) -> [N, out_features]. ``activation``: relu,
    softplus (smooth: SHEAR needs second derivatives), gelu or tanh."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (256, 128), out_features: int = 10,
                 activation: str = "relu"):
        super().__init__()
        acts = {"relu": nn.ReLU, "softplus": nn.Softplus, "gelu": nn.GELU, "tanh": nn.Tanh}
        if activation not in acts:
            raise ValueError(f"unknown activation {activation!r}: choose one of {sorted(acts)}")
        layers, d = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(d, h), acts[activation]()]
            d = h
        layers.append(nn.Linear(d, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
