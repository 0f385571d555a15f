"""Image classification data: Fashion-MNIST (IDX files) and scikit-learn's bundled digits."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "LOWBIT_FASHION_MNIST"
INSTALL_HINT = (
    "Fashion-MNIST not found. On Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` "
    f"(IDX files in /usr/share/datasets/fashion-mnist), or pass root= / set {ENV_VAR} to any "
    "folder holding train-images-idx3-ubyte[.gz] etc. (a torchvision FashionMNIST/raw folder works)."
)
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_SPLITS = {"train": "train", "test": "t10k"}


class DatasetNotFound(FileNotFoundError):
    """A data set is not installed; the message says how to get it."""


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _layouts(root: Path) -> list[Path]:
    """Where the IDX files may sit under a root: itself, raw/, FashionMNIST/raw/ (torchvision)."""
    return [root, root / "raw", root / "FashionMNIST" / "raw"]


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _holds_all(folder: Path) -> bool:
    return all(_find(folder, f) for f in FILES)


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the four Fashion-MNIST IDX files (gzipped or not): under ``root`` if
    given, else under $LOWBIT_FASHION_MNIST if set, else the Debian package's folder. A root or
    variable that is given but holds no files raises :class:`DatasetNotFound` naming it (there is
    no quiet fall-back to another copy)."""
    if root is not None:
        where, looked = f"root={os.fspath(root)!r}", _layouts(Path(root))
    elif os.environ.get(ENV_VAR):
        where, looked = f"{ENV_VAR}={os.environ[ENV_VAR]}", _layouts(Path(os.environ[ENV_VAR]))
    else:
        where, looked = "", _layouts(Path(DEBIAN_FASHION_MNIST))
    for folder in looked:
        if _holds_all(folder):
            return folder
    if where:
        raise DatasetNotFound(f"{where} holds no Fashion-MNIST: the four IDX files ({', '.join(FILES)}, gzipped "
                              f"or not) are not all in {looked[0]}, its raw/ or its FashionMNIST/raw/\n{INSTALL_HINT}")
    raise DatasetNotFound(INSTALL_HINT + f" Looked in: {', '.join(str(f) for f in looked)}")


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns images uint8 [N, 28, 28] and labels int64 [N] (N = 60000 train, 10000 test)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = fashion_mnist_dir(root)
    prefix = _SPLITS[split]
    images = _read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_digits(split: str = "train", test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 images): uint8 [N, 8, 8] scaled to 0..255, labels [N].
    A fixed split (the last ``test_fraction`` after a seeded shuffle) serves as test set."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(len(images) * (1 - test_fraction))
    idx = order[:cut] if split == "train" else order[cut:]
    return torch.from_numpy(images[idx]), torch.from_numpy(d.target[idx].astype(np.int64))


def load_images(name: str = "fashion-mnist", split: str = "train", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images [N, 1, H, W], standardised (mean 0, std 1 over the train split), labels [N]."""
    if name == "fashion-mnist":
        x, y = load_fashion_mnist(split)
        mean, std = 72.94, 90.02  # Fashion-MNIST train-set pixel statistics (0..255 scale)
    elif name == "digits":
        x, y = load_digits(split)
        mean, std = 77.6, 96.6
    else:
        raise ValueError(f"unknown image data set {name!r}: choose 'fashion-mnist' or 'digits'")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive number of images, got {limit}")
        x, y = x[:limit], y[:limit]
    return ((x.float() - mean) / std).unsqueeze(1), y
