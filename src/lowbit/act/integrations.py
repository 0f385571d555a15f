"""Activation-compressed training inside `transformers`' ``Trainer``: one callback.

Two lines turn it on::

    from lowbit.act.integrations import ActivationCompressionCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ActivationCompressionCallback("uniform", bits=4)])

How it works: the Trainer runs forward and backward of every micro-batch of an optimizer step
between ``on_step_begin`` and ``on_pre_optimizer_step``; the callback enters the compressor's
saved-tensor hooks at the first and leaves them at the second, so every tensor the forward passes
save is compressed and nothing else is touched (backward saves nothing; the optimizer step,
evaluation and saving run outside). At ``on_step_end`` it calls ``act.step``, which gives adaptive
methods (GACT, COMET) their sensitivity estimate on the step's last micro-batch (the model's own
``loss`` output, so the batch must carry labels). ``checkpoint=`` additionally checkpoints the
model's repeated blocks (all, or every n-th so that the others are compressed). Works with
gradient accumulation, ``gradient_checkpointing=True`` and DistributedDataParallel
(``torchrun``); needs the ``hf`` extra.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("lowbit.act.integrations needs `transformers`: pip install 'lowbit[hf]'") from e

from lowbit.act.checkpoint import checkpoint_blocks
from lowbit.act.compressor import ActivationCompressor
from lowbit.act.config import ActConfig
from lowbit.act.policy import Policy

__all__ = ["ActivationCompressionCallback"]


class ActivationCompressionCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that trains with compressed activations.

    Args:
        method: an :class:`~lowbit.act.ActivationCompressor` method ("uniform", "gact",
            "division", "comet", "mesa", "none"), a config (``GactConfig(average_bits=2)``, which
            carries its own bits: ``bits`` is then ignored) or a :class:`~lowbit.act.Policy`.
        bits: the method's bits for the string form (uniform: 1, 2, 4, 8; gact: average bits).
        checkpoint: None (no checkpointing), True (every repeated block), or an int n
            (every n-th block; the others are compressed).
        log: add ``act_ratio`` and ``act_stored_mib`` (saved-tensor memory of the last step) to
            the Trainer's logs.
        **options: passed to :class:`~lowbit.act.ActivationCompressor` (``group_size``,
            ``min_numel``, ``seed``, method options).

    After training, ``callback.act`` is the compressor (``callback.act.report()``) and
    ``callback.history`` lists ``(global_step, raw_bytes, stored_bytes)`` per optimizer step."""

    def __init__(self, method: str | ActConfig | Policy = "uniform", bits: float | None = 4, checkpoint: bool | int | None = None,
                 log: bool = True, **options: Any):
        if checkpoint is not None and not isinstance(checkpoint, (bool, int)):
            raise TypeError(f"checkpoint must be None, True or an int (every n-th block), got {checkpoint!r}")
        if isinstance(checkpoint, int) and not isinstance(checkpoint, bool) and checkpoint < 1:
            raise ValueError(f"checkpoint must be a positive int, got {checkpoint}")
        self.method, self.bits, self.checkpoint, self.log, self.options = method, bits, checkpoint, log, options
        self.act: ActivationCompressor | None = None
        self.history: list[tuple[int, int, int]] = []
        self._active = False
        self._model: nn.Module | None = None
        self._last_inputs: tuple[tuple, dict] | None = None
        self._input_hook = None
        self._warned_closure = False

    # ------------------------------------------------------------------ lifecycle
    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is None:
            raise ValueError("ActivationCompressionCallback needs the Trainer's model (on_train_begin got none)")
        if self.act is not None and self._model is model:
            return  # a second train() call on the same Trainer
        self._model = model
        if self.checkpoint:
            checkpoint_blocks(model, every=1 if self.checkpoint is True else int(self.checkpoint))
        bits = None if isinstance(self.method, ActConfig) else self.bits  # a config carries its own bits
        self.act = ActivationCompressor(self.method, bits=bits, model=model, **self.options)
        if self.act.policy.adaptive:  # keep the step's last batch for the sensitivity estimate
            self._input_hook = model.register_forward_pre_hook(self._remember, with_kwargs=True)

    def _remember(self, _module, args, kwargs) -> None:
        if self._active and torch.is_grad_enabled():
            self._last_inputs = (args, kwargs)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.act is not None and not self._active:
            self.act.__enter__()
            self._active = True

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._leave()

    def on_step_end(self, args, state, control, **kwargs):
        self._leave()
        if self.act is None:
            return
        self.act.step(self._closure())
        rep = self.act.report()
        self.history.append((state.global_step, rep.raw_bytes, rep.stored_bytes))

    def on_log(self, args, state, control, logs: dict | None = None, **kwargs):
        if self.log and logs is not None and self.history and "loss" in logs:
            _, raw, stored = self.history[-1]
            logs["act_ratio"] = round(raw / stored, 2) if stored else float("inf")
            logs["act_stored_mib"] = round(stored / 2**20, 2)

    def on_train_end(self, args, state, control, **kwargs):
        self._leave()
        if self._input_hook is not None:
            self._input_hook.remove()
            self._input_hook = None
        self._last_inputs = None

    def _leave(self) -> None:
        if self._active:
            self._active = False
            self.act.__exit__(None, None, None)

    def _closure(self):
        """The loss of the step's last micro-batch, for adaptive methods (None: keep the estimate)."""
        if not self.act.policy.adaptive or self._last_inputs is None:
            return None
        model, (a, kw) = self._model, self._last_inputs

        def loss() -> torch.Tensor:
            out = model(*a, **kw)
            value = getattr(out, "loss", None)
            if value is None and isinstance(out, dict):
                value = out.get("loss")
            if value is None:
                raise ValueError("the model returned no loss: adaptive methods need batches with labels")
            return value

        if "labels" not in kw and not self._warned_closure:
            self._warned_closure = True
            warnings.warn("ActivationCompressionCallback: the batch has no `labels`; adaptive methods estimate "
                          "their sensitivities from the model's own loss output", UserWarning, stacklevel=2)
        return loss
