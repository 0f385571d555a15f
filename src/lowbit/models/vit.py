"""A small Vision Transformer: patches, class token, LayerNorm, multi-head attention, GELU, dropout."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.models.attention import Block


class ViT(nn.Module):
    """x: float [N, in_channels, H, W] (H, W divisible by ``patch``) -> logits [N, num_classes]."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        patch: int = 7,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        dropout: float = 0.1,
    ):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not divisible by patch {patch}")
        n = (image_size // patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(dim, heads, 2, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)
        h = self.blocks(self.drop(tokens + self.pos))
        return self.head(self.norm(h[:, 0]))
