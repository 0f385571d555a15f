"""The real-model matrix: `transformers` models built from their configs (no weight download).

``hf_model(name, size)`` builds GPT-2 (Conv1D projections, tied embeddings), BERT (a sequence
classifier, eager or SDPA attention), Llama (RMSNorm, rotary, grouped-query attention) or a
ResNet-18 (``layer_type="basic", depths=[2, 2, 2, 2]``) with random weights;
``hf_batch(name, model, batch)`` makes a matching input batch and ``hf_loss(model, batch)`` the
training loss. ``size="tiny"`` is for unit tests (a forward+backward in tens of milliseconds),
``"small"`` for benchmarks on a CPU. Needs the ``hf`` extra (``pip install lowbit[hf]``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

HF_MODELS = ("gpt2", "bert", "llama", "resnet18")

# (layers, hidden, heads, vocab, seq) per size; resnet: (widths, image side)
_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"layers": 2, "hidden": 64, "heads": 4, "vocab": 512, "seq": 32,
             "widths": [8, 16, 32, 64], "side": 32},
    "small": {"layers": 4, "hidden": 256, "heads": 4, "vocab": 1000, "seq": 256,
              "widths": [64, 128, 256, 512], "side": 96},
}


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("lowbit.models.hf needs `transformers`: pip install 'lowbit[hf]'") from e
    return transformers


def hf_model(name: str, size: str = "tiny", num_labels: int = 10, attn_implementation: str = "eager",
             **overrides: Any) -> nn.Module:
    """A randomly initialised `transformers` model of the real-model matrix.

    name: one of ``HF_MODELS``. size: "tiny" or "small" (see module doc). num_labels: classes of
    BERT's and ResNet's heads. attn_implementation: "eager" or "sdpa". overrides: config fields
    (for example ``vocab_size=50257``)."""
    if name not in HF_MODELS:
        raise ValueError(f"unknown HF model {name!r}: choose one of {HF_MODELS}")
    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}: choose one of {sorted(_SIZES)}")
    tf = _transformers()
    s = _SIZES[size]

    def cfg(defaults: dict[str, Any]) -> dict[str, Any]:
        return {**defaults, **overrides}  # the caller's fields win over the size's

    if name == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(**cfg(dict(
            n_layer=s["layers"], n_embd=s["hidden"], n_head=s["heads"], vocab_size=s["vocab"],
            n_positions=max(s["seq"], 64), bos_token_id=s["vocab"] - 1, eos_token_id=s["vocab"] - 1))))
    elif name == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(**cfg(dict(
            num_hidden_layers=s["layers"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
            intermediate_size=4 * s["hidden"], vocab_size=s["vocab"], max_position_embeddings=max(s["seq"], 64),
            num_labels=num_labels))))
    elif name == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg(dict(
            num_hidden_layers=s["layers"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
            num_key_value_heads=max(1, s["heads"] // 2), intermediate_size=3 * s["hidden"], vocab_size=s["vocab"],
            max_position_embeddings=max(s["seq"], 64)))))
    else:
        model = tf.ResNetForImageClassification(tf.ResNetConfig(**cfg(dict(
            layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=s["widths"], embedding_size=s["widths"][0],
            num_channels=3, num_labels=num_labels))))
    if name != "resnet18":
        model.config._attn_implementation = attn_implementation
    return model


def hf_batch(name: str, model: nn.Module, batch: int = 2, seq: int | None = None, size: str = "tiny",
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A random training batch for ``model`` (made by ``hf_model(name, size)``): token ids and
    labels of shape (batch, seq), or images (batch, channels, side, side) and class labels."""
    s = _SIZES[size]
    cfg = model.config
    if name == "resnet18":
        x = torch.randn(batch, cfg.num_channels, s["side"], s["side"], generator=generator)
        return {"pixel_values": x, "labels": torch.randint(0, cfg.num_labels, (batch,), generator=generator)}
    seq = seq or s["seq"]
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=generator)
    if name == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, cfg.num_labels, (batch,), generator=generator)}
    return {"input_ids": ids, "labels": ids}


def hf_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own training loss on ``batch`` (a scalar tensor)."""
    return model(**batch).loss
