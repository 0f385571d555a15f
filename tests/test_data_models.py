import gzip
import struct

import numpy as np
import pytest
import torch

from lowbit.data import CharCorpus, DatasetNotFound, load_digits, load_fashion_mnist, load_images
from lowbit.data.images import _read_idx
from lowbit.models import MODELS, build_model


def _write_idx(path, array: np.ndarray, gz: bool):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_torchvision_layout(tmp_path, gz):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)), gz)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), gz)
    x, y = load_fashion_mnist("train", root=tmp_path)
    assert x.shape == (12, 28, 28) and x.dtype == torch.uint8 and y.shape == (12,)
    xt, _ = load_fashion_mnist("test", root=raw)
    assert xt.shape == (5, 28, 28)


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(root=tmp_path)
    with pytest.raises(ValueError):
        load_fashion_mnist("validation", root=tmp_path)


def test_bad_idx_file(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x03\x04" + b"\x00" * 8)
    with pytest.raises(ValueError, match="IDX"):
        _read_idx(p)


def test_digits_always_there():
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    assert x.shape[1:] == (8, 8) and len(x) + len(xt) == 1797
    imgs, labels = load_images("digits", limit=10)
    assert imgs.shape == (10, 1, 8, 8) and imgs.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown image data set"):
        load_images("cifar")


def test_char_corpus():
    c = CharCorpus("hello world, " * 100)
    x, y = c.batch(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert c.decode(x[0]).replace(" ", "")
    with pytest.raises(ValueError):
        CharCorpus("")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_reference_models_forward_backward(name):
    if name == "gpt":
        m = build_model("gpt", vocab_size=50, block_size=16, dim=32, depth=1)
        x = torch.randint(0, 50, (2, 16))
        assert m(x).shape == (2, 16, 50)
        with pytest.raises(ValueError, match="block_size"):
            m(torch.randint(0, 50, (1, 17)))
    elif name == "rnn":
        m = build_model("rnn", vocab_size=50)
        x = torch.randint(0, 50, (2, 16))
        assert m(x).shape == (2, 16, 50)
    else:
        m = build_model(name)
        x = torch.randn(2, 1, 28, 28)
        assert m(x).shape == (2, 10)
    m(x).float().sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("alexnet")
