"""A character-level GPT: token and position embeddings, causal multi-head attention blocks."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.models.attention import Block


class CharGPT(nn.Module):
    """ids: int64 [B, T] (T <= block_size) -> next-character logits [B, T, vocab_size]."""

    def __init__(self, vocab_size: int = 128, block_size: int = 64, dim: int = 128, depth: int = 4, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(block_size, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, 4, dropout, causal=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: int64 [B, T] -> token + position embeddings [B, T, dim]."""
        t = ids.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        return self.tok(ids) + self.pos(torch.arange(t, device=ids.device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(ids))))

    def layers(self) -> list[nn.Module]:
        """The model as layers applied in order (embedding, each block, norm + head), sharing
        this model's parameters: what a pipeline cuts into stages."""
        return [_Embed(self), *self.blocks, nn.Sequential(self.norm, self.head)]


class _Embed(nn.Module):
    def __init__(self, gpt: CharGPT):
        super().__init__()
        self.tok, self.pos, self.block_size = gpt.tok, gpt.pos, gpt.block_size

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return CharGPT.embed(self, ids)
