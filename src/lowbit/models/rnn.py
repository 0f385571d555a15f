"""A character-level recurrent language model (GRU or LSTM): the recurrent net of the test bed.

Recurrent layers save many small tensors for backward (per timestep, per gate), unlike
convolutions and transformers, which save a few large ones."""
from __future__ import annotations

import torch
from torch import nn


class CharRNN(nn.Module):
    """ids: int64 [B, T] -> next-character logits [B, T, vocab_size].

    cell: "gru" or "lstm"; ``depth`` stacked layers of ``dim`` hidden units."""

    def __init__(self, vocab_size: int = 128, dim: int = 128, depth: int = 2, cell: str = "gru", dropout: float = 0.0):
        super().__init__()
        rnns = {"gru": nn.GRU, "lstm": nn.LSTM}
        if cell not in rnns:
            raise ValueError(f"unknown cell {cell!r}: choose one of {sorted(rnns)}")
        self.tok = nn.Embedding(vocab_size, dim)
        self.rnn = rnns[cell](dim, dim, num_layers=depth, batch_first=True, dropout=dropout if depth > 1 else 0.0)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2:
            raise ValueError(f"expected token ids [batch, time], got shape {tuple(ids.shape)}")
        out, _ = self.rnn(self.tok(ids))
        return self.head(out)
