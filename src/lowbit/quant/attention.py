"""nn.MultiheadAttention rewritten with separate query / key / value projections.

nn.MultiheadAttention keeps its input projections packed in one ``in_proj_weight`` [3E, E] and
applies them functionally (``F.multi_head_attention_forward``), so no layer-replacing recipe can
reach them. ``SplitMultiheadAttention.from_mha`` builds the same computation from three nn.Linear
(``q_proj``, ``k_proj``, ``v_proj``) and the original ``out_proj``; ``quantize`` swaps it in and
then quantizes those four like any other linear. Outputs equal the original module's (float
rounding) for the call signature torch's transformer layers use.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SplitMultiheadAttention(nn.Module):
    """Multi-head attention with q/k/v as separate linears; same call as nn.MultiheadAttention:
    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (output, weights or None)``.
    Shapes: [L, N, E] (or [N, L, E] with batch_first); unbatched [L, E] inputs work too."""

    # read by nn.TransformerEncoderLayer's fast-path checks: this module never takes that path
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, kdim: int, vdim: int, bias: bool, dropout: float,
                 batch_first: bool):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim, self.dropout, self.batch_first = kdim, vdim, dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias)
        self.k_proj = nn.Linear(kdim, embed_dim, bias)
        self.v_proj = nn.Linear(vdim, embed_dim, bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias)

    @classmethod
    @torch.no_grad()
    def from_mha(cls, mha: nn.MultiheadAttention) -> "SplitMultiheadAttention":
        """The same attention with the packed projections split (weights copied)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True has no split form")
        e = mha.embed_dim
        m = cls(e, mha.num_heads, mha.kdim, mha.vdim, mha.in_proj_bias is not None, mha.dropout, mha.batch_first)
        m.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
        if mha._qkv_same_embed_dim:
            ws = mha.in_proj_weight.split(e)
        else:
            ws = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        bs = mha.in_proj_bias.split(e) if mha.in_proj_bias is not None else (None, None, None)
        for lin, w, b in zip((m.q_proj, m.k_proj, m.v_proj), ws, bs):
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        m.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            m.out_proj.bias.copy_(mha.out_proj.bias)
        m.train(mha.training)
        return m

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # [N, L, E] -> [N, H, L, D]
        n, l, _ = t.shape
        return t.reshape(n, l, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:  # [L, N, E] -> [N, L, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, lq, _ = query.shape
        ls = key.shape[1]
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # [N, H, L, S]
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(lq, ls, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            mask = attn_mask.reshape(n, self.num_heads, lq, ls) if attn_mask.dim() == 3 else attn_mask
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(n, 1, 1, ls)
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
        weights = scores.softmax(-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        out = (weights @ v).transpose(1, 2).reshape(n, lq, self.embed_dim)
        out = self.out_proj(out)
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        w = weights.mean(1) if average_attn_weights else weights
        return out, (w.squeeze(0) if unbatched else w)


def split_attention(model: nn.Module, skip=()) -> list[str]:
    """Replace every nn.MultiheadAttention of ``model`` (in place; none under a ``skip`` prefix)
    by its SplitMultiheadAttention; returns the names replaced."""
    from lowbit.quant.layers import set_submodule

    done = []
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.MultiheadAttention) and not any(name == p or name.startswith(p + ".") for p in skip):
            set_submodule(model, name, SplitMultiheadAttention.from_mha(m))
            done.append(name)
    return done
