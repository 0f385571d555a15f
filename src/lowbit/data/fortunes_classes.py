"""Text classification from the Debian `fortunes` package: which file a fortune comes from.

``load_fortune_classes()`` reads a few topic files (computers, definitions, people, ...), splits
each into its fortunes (the entries between ``%`` lines), keeps at most ``per_class`` of each
(a fixed seeded pick, so the classes are balanced), splits them deterministically into train and
test, builds a word-level vocabulary from the training texts only (no download, no pretrained
tokenizer) and encodes every fortune as ``[CLS] w1 w2 ... [PAD] ...`` of a fixed length.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.data.images import DatasetNotFound
from lowbit.data.text import FORTUNES_DIR

# topic files with 600+ fortunes each in Debian's `fortunes` (min, sentences on distinct subjects)
FORTUNE_CLASSES = ("computers", "definitions", "people", "politics", "science", "songs-poems")
SPECIALS = ("[PAD]", "[UNK]", "[CLS]")
PAD, UNK, CLS = 0, 1, 2
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def read_fortunes(path: str | Path) -> list[str]:
    """The fortunes of one file: the non-empty entries between lines holding a single ``%``."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    entries = re.split(r"^%\s*$", text, flags=re.MULTILINE)
    return [e.strip() for e in entries if e.strip()]


def words(text: str) -> list[str]:
    """Lower-cased word tokens: runs of letters/digits (with an ``'s``-style suffix) and single
    punctuation marks."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Word-level ids: 0 [PAD], 1 [UNK], 2 [CLS], then the ``vocab_size - 3`` most frequent
    words of the texts it is built from (ties broken alphabetically, so the vocabulary is
    deterministic)."""

    def __init__(self, texts: list[str], vocab_size: int = 4000, min_count: int = 2):
        if vocab_size <= len(SPECIALS):
            raise ValueError(f"vocab_size must exceed the {len(SPECIALS)} special tokens, got {vocab_size}")
        counts = Counter(w for t in texts for w in words(t))
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        self.itos = list(SPECIALS) + ranked[: vocab_size - len(SPECIALS)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, seq_len: int) -> list[int]:
        """``[CLS]`` + word ids, cut or padded with [PAD] to exactly ``seq_len`` ids."""
        ids = [CLS] + [self.stoi.get(w, UNK) for w in words(text)][: seq_len - 1]
        return ids + [PAD] * (seq_len - len(ids))

    def encode_batch(self, texts: list[str], seq_len: int) -> torch.Tensor:
        """int64 [len(texts), seq_len]."""
        return torch.tensor([self.encode(t, seq_len) for t in texts], dtype=torch.int64).reshape(len(texts), seq_len)

    def decode(self, ids) -> str:
        return " ".join(self.itos[int(i)] for i in ids if int(i) != PAD)


@dataclass
class FortuneClasses:
    """Token ids and labels for train and test. ``train`` / ``test``: (ids int64 [N, seq_len],
    labels int64 [N] in 0..len(classes)-1); ``classes``: the file names, in label order."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    classes: tuple[str, ...]
    tokenizer: WordTokenizer
    seq_len: int
    train_texts: list[str]
    test_texts: list[str]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def load_fortune_classes(classes: tuple[str, ...] = FORTUNE_CLASSES, per_class: int = 600, test_fraction: float = 0.2,
                         seq_len: int = 64, vocab_size: int = 4000, seed: int = 0,
                         root: str | Path = FORTUNES_DIR) -> FortuneClasses:
    """Fortunes labelled by the file they come from (see module doc).

    per_class: fortunes kept per file (all of them when a file has fewer). test_fraction: share
    of each class held out for test (a stratified, seeded split: the same for the same arguments).
    seq_len: tokens per example including [CLS]. vocab_size: words in the vocabulary including
    the 3 special tokens, built from the training split only."""
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes repeat a file: {classes!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if per_class < 2:
        raise ValueError(f"per_class must be at least 2, got {per_class}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 ([CLS] and one word), got {seq_len}")
    folder = Path(root)
    gen = torch.Generator().manual_seed(seed)
    split: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for label, name in enumerate(classes):
        path = folder / name
        if not path.is_file():
            raise DatasetNotFound(f"no fortune file {path}: install it with `sudo apt-get install fortunes` "
                                  f"(Debian/Ubuntu) or choose classes that exist in {folder}")
        entries = read_fortunes(path)
        order = torch.randperm(len(entries), generator=gen).tolist()[:per_class]
        n_test = max(1, round(len(order) * test_fraction))
        split["test"] += [(entries[i], label) for i in order[:n_test]]
        split["train"] += [(entries[i], label) for i in order[n_test:]]
    # shuffle across classes once, so that slices of train / test hold every class
    for key in split:
        perm = torch.randperm(len(split[key]), generator=gen).tolist()
        split[key] = [split[key][i] for i in perm]
    train_texts = [t for t, _ in split["train"]]
    test_texts = [t for t, _ in split["test"]]
    tok = WordTokenizer(train_texts, vocab_size=vocab_size)

    def tensors(rows: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return tok.encode_batch([t for t, _ in rows], seq_len), torch.tensor([y for _, y in rows], dtype=torch.int64)

    return FortuneClasses(train=tensors(split["train"]), test=tensors(split["test"]), classes=tuple(classes),
                          tokenizer=tok, seq_len=seq_len, train_texts=train_texts, test_texts=test_texts)
