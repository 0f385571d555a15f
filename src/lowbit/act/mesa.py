"""Mesa (Pan et al., 2021): 8-bit activations for transformers, with a quantization range per
attention head for the multi-head attention tensors, tracked with running estimates.

Attention modules and their heads are found by :mod:`lowbit.act.attention`:
``nn.MultiheadAttention``, hand-written attention with a ``heads`` attribute, and transformers'
GPT-2, BERT and Llama attention (eager or SDPA). In the eager path the per-head tensors are the
query/key/value projections in [B, heads, T, head_dim] (Llama's keys and values before
``repeat_kv`` in [B, kv_heads, T, head_dim]), the scores and probabilities [B, heads, T, T];
``scaled_dot_product_attention`` saves its query, key, value and output in [B, heads, T,
head_dim] (head-wise) and a small log-sum-exp [B, heads, T] (per group). A model with a module
that looks like attention (its class name says so) but whose heads cannot be found is refused
with an error naming the module, rather than quietly quantized per group."""
from __future__ import annotations

import functools
import warnings
import weakref

import torch
from torch import nn

from lowbit.act.attention import attention_modules
from lowbit.act.policy import Policy, register_policy
from lowbit.codecs import Packed
from lowbit.codecs.headwise import HeadwiseCodec


@register_policy("mesa")
class MesaPolicy(Policy):
    """Inside an attention module (needs ``model=``), tensors laid out [B, H, ...] (hand-written
    attention, ``scaled_dot_product_attention`` inputs) or [B*H, ...] (``nn.MultiheadAttention``)
    get 8-bit codes with one running range per head (``momentum`` of the running min/max); every
    other saved tensor gets 8-bit per-group codes."""

    needs_model = True

    def __init__(self, bits: float | None = 8, momentum: float = 0.9):
        if bits not in (None, 8):
            raise ValueError(f"mesa stores 8-bit activations; got bits={bits}")
        self.bits, self.momentum = 8, momentum
        self.codec = HeadwiseCodec()
        self.ranges: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.headwise_count = 0  # tensors stored head-wise so far (for reports and tests)
        self.headwise_modules: set[str] = set()  # attention modules whose tensors were stored head-wise
        self.attention: dict[str, tuple[int, int]] | None = None  # {module name: (heads, kv heads)}
        self._names: dict[int, str] = {}
        self._batch: dict[str, tuple[int, int]] = {}  # {attention module: (batch, tokens) of its current input}
        self._handles: list = []

    def bind(self, model: nn.Module) -> None:
        """Find the attention modules up front, so the first forward's first module is seen too."""
        if self.attention is None:
            self._check_model(model)

    def close(self) -> None:
        """Remove the input hooks on the attention modules."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _check_model(self, model: nn.Module) -> None:
        """Find the model's attention modules once; refuse attention whose heads are unknown."""
        known, unknown = attention_modules(model)
        if unknown:
            kinds = sorted({type(model.get_submodule(n)).__name__ for n in unknown})
            raise ValueError(
                f"mesa cannot find the number of heads of {', '.join(kinds)} (module {unknown[0]!r}"
                f"{f' and {len(unknown) - 1} more' if len(unknown) > 1 else ''}): give it an integer `num_heads` "
                "attribute (or `config.num_attention_heads`), or use another method such as uniform-8")
        if not known:
            warnings.warn(f"mesa: {type(model).__name__} has no attention modules; every saved tensor gets "
                          "8-bit per-group codes (as method='uniform', bits=8)", UserWarning, stacklevel=4)
        self.attention = known
        self._names = {}
        me = weakref.ref(self)
        for name in known:
            m = model.get_submodule(name)
            self._names[id(m)] = name
            self._handles.append(m.register_forward_pre_hook(functools.partial(_record_batch, me, name), with_kwargs=True))

    def _head_view(self, t: torch.Tensor, act) -> tuple[torch.Tensor, str] | None:
        """``t`` seen as [B, heads, ...] when it is an attention module's per-head tensor: 4-D
        [B, heads, T, *] as the eager path and SDPA save them, 3-D [B * heads, T, *] as batched
        matmuls and nn.MultiheadAttention save them, or the flat storage of a transposed one."""
        for m in act.enclosing_modules():
            name = self._names.get(id(m))
            if name is None:
                continue
            heads, kv = self.attention[name]
            # the input's batch size, recorded by a pre-hook (unknown only inside the forward that
            # found the attention modules: then [X, T, *] with X divisible by the heads is taken as [B * heads, T, *])
            batch, seq = self._batch.get(name, (None, None))
            for h in dict.fromkeys((heads, kv)):
                if t.dim() == 4 and t.shape[1] == h and (batch is None or t.shape[0] == batch):
                    return t, name
                if t.dim() == 3 and (t.shape[0] == batch * h if batch is not None else t.shape[0] % h == 0):
                    return t.reshape(t.shape[0] // h, h, *t.shape[1:]), name
                if t.dim() == 1 and seq and t.numel() % (batch * h * seq) == 0:
                    return t.reshape(batch, h, -1), name
            return None
        return None

    def encode(self, index: int, t: torch.Tensor, act) -> Packed | None:
        if self.attention is None:
            running = act.enclosing_modules()
            if not running:  # outside the model's forward: nothing to tell heads from
                return act.uniform_codec.encode(t, bits=8, group_size=act.group_for(t, 8))
            self._check_model(running[-1])  # the outermost running module: the model
        found = self._head_view(t, act)
        if found is None:
            return act.uniform_codec.encode(t, bits=8, group_size=act.group_for(t))
        v, name = found
        dims = [d for d in range(v.dim()) if d != 1]
        lo_now, hi_now = v.detach().amin(dim=dims).float(), v.detach().amax(dim=dims).float()
        if not bool(torch.isfinite(lo_now).all() & torch.isfinite(hi_now).all()):
            return None
        old = self.ranges.get(index)
        if old is None or old[0].shape != lo_now.shape:
            lo, hi = lo_now, hi_now
        else:
            m = self.momentum
            lo, hi = m * old[0] + (1 - m) * lo_now, m * old[1] + (1 - m) * hi_now
        self.ranges[index] = (lo, hi)
        self.headwise_count += 1
        self.headwise_modules.add(name)
        p = self.codec.encode(v, lo, hi)
        if v.shape != t.shape:
            p.info["view_from"] = tuple(t.shape)
        return p

    def codecs(self) -> dict:
        return {self.codec.name: _ReshapingHeadwise(self.codec)}

    def __del__(self) -> None:
        self.close()

    def describe(self) -> str:
        n = len(self.attention or {})
        return (f"mesa (8-bit, head-wise attention ranges: {len(self.headwise_modules)} of {n} attention modules, "
                f"{self.headwise_count} tensors so far)")


class _ReshapingHeadwise:
    """Decodes head-wise codes back to the saved tensor's own layout ([B*H, ...] for nn.MultiheadAttention)."""

    name = HeadwiseCodec.name

    def __init__(self, codec: HeadwiseCodec):
        self.codec = codec

    def decode(self, p: Packed) -> torch.Tensor:
        out = self.codec.decode(p)
        shape = p.info.get("view_from")
        return out.reshape(shape) if shape is not None else out


def _record_batch(policy_ref, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on an attention module: the batch size and token count of its input, so
    that per-head tensors saved in batched-matmul layout [B * heads, ...] can be told apart."""
    policy = policy_ref()
    if policy is None:
        return
    x = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() >= 2), None)
    if x is None:
        return
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first and x.dim() == 3:
        policy._batch[name] = (x.shape[1], x.shape[0])  # [T, B, E]
    elif x.dim() == 3:
        policy._batch[name] = (x.shape[0], x.shape[1])  # [B, T, D]
    else:
        policy._batch[name] = (x.shape[0], 0)
