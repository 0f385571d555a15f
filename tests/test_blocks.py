"""The one block finder: repeated blocks wherever nested, on reference and HF models."""
import pytest
from torch import nn

from lowbit.blocks import block_of, repeated_blocks
from lowbit.models import build_model


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))


class _Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(_Block(), _Block(), _Block())


def test_nested_stages_open_to_their_blocks():
    m = nn.Module()
    m.stem = nn.Linear(4, 4)
    m.body = nn.Module()
    m.body.stages = nn.ModuleList([_Stage(), _Stage()])
    names = [n for n, _ in repeated_blocks(m)]
    assert names == [f"body.stages.{s}.layers.{b}" for s in range(2) for b in range(3)]
    assert block_of("body.stages.1.layers.2.a", names) == "body.stages.1.layers.2"
    assert block_of("stem", names) is None


def test_heterogeneous_sequential_and_flat_models_have_no_blocks():
    assert repeated_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))) == []
    unit = lambda: nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), nn.ReLU())  # noqa: E731
    res = nn.ModuleList([nn.Sequential(unit(), unit()), nn.Sequential(unit(), unit())])
    assert [n for n, _ in repeated_blocks(nn.Sequential(res))] == ["0.0", "0.1"]  # units do not split a block
    assert repeated_blocks(build_model("mlp")) == []


def test_reference_models():
    assert [n for n, _ in repeated_blocks(build_model("vit"))][:2] == ["blocks.0", "blocks.1"]
    assert len(repeated_blocks(build_model("resnet"))) >= 2


@pytest.mark.parametrize("name,expected", [
    ("gpt2", ["transformer.h.0", "transformer.h.1"]),
    ("bert", ["bert.encoder.layer.0", "bert.encoder.layer.1"]),
    ("llama", ["model.layers.0", "model.layers.1"]),
    ("resnet18", [f"resnet.encoder.stages.{s}.layers.{b}" for s in range(4) for b in range(2)]),
])
def test_hf_models(name, expected):
    pytest.importorskip("transformers", reason="needs the hf extra")
    from lowbit.models.hf import hf_model
    m = hf_model(name, "tiny")
    blocks = repeated_blocks(m)
    assert [n for n, _ in blocks] == expected
    assert all(m.get_submodule(n) is b for n, b in blocks)
