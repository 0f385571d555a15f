"""Small reference models: the benchmark models, not the only supported ones."""
from __future__ import annotations

import torch
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


def reference_model(name: str, image_size: int = 28, vocab_size: int = 128, seed: int = 0) -> nn.Module:
    """A reference model sized for its data, seeded so every method starts from the same weights.

    ``image_size``: side of the square input images in pixels (vit picks patches of 7 or 4 pixels,
    mlp takes ``image_size**2`` inputs); ``vocab_size``: characters of the gpt's vocabulary."""
    torch.manual_seed(seed)
    if name == "vit":
        return build_model("vit", image_size=image_size, patch=7 if image_size % 7 == 0 else 4)
    if name == "gpt":
        return build_model("gpt", vocab_size=vocab_size)
    if name == "mlp":
        return build_model("mlp", in_features=image_size * image_size)
    return build_model(name)


__all__ = ["ResNet", "ViT", "CharGPT", "MLP", "CharRNN", "build_model", "reference_model", "MODELS"]
