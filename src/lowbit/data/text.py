"""Character-level text corpus from the Debian `fortunes` package."""
from __future__ import annotations

from pathlib import Path

import torch

from lowbit.data.images import DatasetNotFound

FORTUNES_DIR = "/usr/share/games/fortunes"


def load_fortunes(root: str | Path = FORTUNES_DIR) -> str:
    """All fortune files under ``root`` (not the .dat indexes) concatenated, in sorted file order."""
    folder = Path(root)
    files = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix not in (".dat", ".u8") and not p.is_symlink())
    if not files:
        raise DatasetNotFound(
            f"no fortune files in {folder}: install them with `sudo apt-get install fortunes` (Debian/Ubuntu)"
        )
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


class CharCorpus:
    """A text as int64 character ids with a 90/10 train/validation split.

    ``batch(n, block, generator)`` draws ``n`` random windows: inputs and next-character
    targets, each int64 [n, block]."""

    def __init__(self, text: str, val_fraction: float = 0.1):
        if not text:
            raise ValueError("empty text")
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([self.stoi[c] for c in text], dtype=torch.int64)
        cut = int(len(ids) * (1 - val_fraction))
        self.train, self.val = ids[:cut], ids[cut:]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def batch(self, n: int, block: int, generator: torch.Generator, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - block - 1, (n,), generator=generator)
        offs = torch.arange(block)
        x = data[starts[:, None] + offs]
        y = data[starts[:, None] + offs + 1]
        return x, y

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.chars[int(i)] for i in ids)
