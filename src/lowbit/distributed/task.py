"""What a pipeline trains: a model cut into stages, examples by id, and a loss."""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from lowbit.data.text import FORTUNES_DIR, CharCorpus, load_fortunes
from lowbit.models.gpt import CharGPT


class PipelineTask(Protocol):
    """Every rank builds the same task. ``n_examples`` fixed examples, addressed by id (AC-SGD keeps
    a reference per id, so an example must be the same tensor every time it is drawn)."""

    n_examples: int

    def layers(self) -> list[nn.Module]:
        """The model as a list of layers applied in order, built from the task's seed."""
        ...

    def batch(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids: int64 [n] -> (inputs, targets) for those examples."""
        ...

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the examples of ``out``."""
        ...


class CharLMTask:
    """Character GPT on fortunes: ``n_examples`` windows of ``block`` characters at seeded
    positions of the training split; inputs and next-character targets are int64 [n, block]."""

    def __init__(self, n_examples: int = 2048, block: int = 64, dim: int = 128, depth: int = 4, heads: int = 4,
                 seed: int = 0, root: str = FORTUNES_DIR):
        if n_examples <= 0:
            raise ValueError(f"n_examples must be positive, got {n_examples}")
        self.n_examples, self.block, self.dim, self.depth, self.heads = n_examples, block, dim, depth, heads
        self.seed, self.root = seed, root
        self._windows: torch.Tensor | None = None
        self._vocab = 0

    def _data(self) -> torch.Tensor:
        if self._windows is None:
            corpus = CharCorpus(load_fortunes(self.root))
            g = torch.Generator().manual_seed(self.seed)
            starts = torch.randint(0, len(corpus.train) - self.block - 1, (self.n_examples,), generator=g)
            self._windows = corpus.train[starts[:, None] + torch.arange(self.block + 1)]
            self._vocab = corpus.vocab_size
        return self._windows

    def layers(self) -> list[nn.Module]:
        self._data()
        torch.manual_seed(self.seed)
        model = CharGPT(vocab_size=self._vocab, block_size=self.block, dim=self.dim, depth=self.depth, heads=self.heads)
        return model.layers()

    def batch(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self._data()[ids]
        return w[:, :-1], w[:, 1:]

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
