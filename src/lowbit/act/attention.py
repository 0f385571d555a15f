"""Which modules are attention modules, and how many heads they have: `nn.MultiheadAttention`,
hand-written attention with a ``heads`` attribute, and `transformers`' attention modules
(GPT-2's ``num_heads``, BERT's ``num_attention_heads``, Llama's config with grouped key/value
heads)."""
from __future__ import annotations

from torch import nn

__all__ = ["attention_heads", "looks_like_attention", "attention_modules"]

_HEAD_ATTRS = ("heads", "num_heads", "n_heads", "num_attention_heads", "n_head")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def attention_heads(module: nn.Module) -> tuple[int, int] | None:
    """(query heads, key/value heads) of an attention module, else None.

    Read from ``nn.MultiheadAttention.num_heads``; an integer ``heads`` / ``num_heads`` /
    ``n_heads`` / ``num_attention_heads`` / ``n_head`` attribute (BERT's self-attention); or, for
    a module whose class name says attention, its ``config.num_attention_heads`` (Llama), with
    ``num_key_value_heads`` or ``num_key_value_groups`` for grouped-query attention."""
    if isinstance(module, nn.MultiheadAttention):
        return module.num_heads, module.num_heads
    heads = next((h for h in (_int(getattr(module, a, None)) for a in _HEAD_ATTRS) if h is not None), None)
    cfg = getattr(module, "config", None)
    if heads is None and cfg is not None and looks_like_attention(module):
        heads = next((h for h in (_int(getattr(cfg, a, None)) for a in _HEAD_ATTRS) if h is not None), None)
    if heads is None or heads < 2:
        return None
    kv = next((h for h in (_int(getattr(module, a, None)) for a in _KV_ATTRS) if h is not None), None)
    if kv is None and cfg is not None:
        kv = next((h for h in (_int(getattr(cfg, a, None)) for a in _KV_ATTRS) if h is not None), None)
    groups = _int(getattr(module, "num_key_value_groups", None))
    if kv is None and groups is not None and heads % groups == 0:
        kv = heads // groups
    return heads, kv or heads


def looks_like_attention(module: nn.Module) -> bool:
    """True for ``nn.MultiheadAttention`` and modules whose class name contains "Attention"."""
    return isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower()


def attention_modules(model: nn.Module) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """({name: (heads, kv heads)} of the attention modules of ``model`` whose heads are known,
    [names of modules that look like attention but whose heads cannot be found]).

    A wrapper such as BERT's ``BertAttention`` (which holds the ``BertSelfAttention`` doing the
    work) does not count as unknown when a module inside it, or around it, has known heads."""
    known: dict[str, tuple[int, int]] = {}
    looks: list[str] = []
    for name, m in model.named_modules():
        h = attention_heads(m)
        if h is not None:
            known[name] = h
        elif looks_like_attention(m):
            looks.append(name)

    def related(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or b.startswith(a + ".") or not a or not b

    unknown = [n for n in looks if not any(related(n, k) for k in known)]
    return known, unknown
