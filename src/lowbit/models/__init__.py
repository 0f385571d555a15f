"""Small reference models: the benchmark models, not the only supported ones."""
from __future__ import annotations

from torch import nn

from lowbit.models.gpt import CharGPT
from lowbit.models.mlp import MLP
from lowbit.models.resnet import ResNet
from lowbit.models.rnn import CharRNN
from lowbit.models.vit import ViT

MODELS: dict[str, type[nn.Module]] = {"resnet": ResNet, "vit": ViT, "gpt": CharGPT, "mlp": MLP, "rnn": CharRNN}


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate a reference model by name ("resnet", "vit", "gpt", "mlp", "rnn")."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


__all__ = ["ResNet", "ViT", "CharGPT", "MLP", "CharRNN", "build_model", "MODELS"]
