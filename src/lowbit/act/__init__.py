"""Activation-compressed training: compress the tensors autograd saves for backward.

    act = lowbit.act.compress(model, lowbit.act.GactConfig(average_bits=2))
    # the same, by its string shortcut: lowbit.act.ActivationCompressor("gact", bits=2, model=model)
"""
from lowbit.act import comet, division, mesa  # noqa: F401  (register their policies)
from lowbit.act.accounting import Ledger
from lowbit.act.checkpoint import checkpoint_blocks, checkpointed_blocks, remove_checkpoints
from lowbit.act.comet import CometPolicy
from lowbit.act.config import (
    ActConfig,
    CometConfig,
    DivisionConfig,
    GactConfig,
    MesaConfig,
    NoneConfig,
    UniformConfig,
    build_policy,
    config_for,
    register_method,
)
from lowbit.act.context import PolicyContext
from lowbit.act.compressor import ActivationCompressor, compress
from lowbit.act.division import DivisionPolicy
from lowbit.act.mesa import MesaPolicy
from lowbit.act.gact import GactPolicy, allocate_bits
from lowbit.act.policy import POLICIES, Policy, UniformPolicy, register_policy
from lowbit.act.report import MemoryReport, ReportRow

__all__ = [
    "compress",
    "ActivationCompressor",
    "ActConfig",
    "NoneConfig",
    "UniformConfig",
    "GactConfig",
    "DivisionConfig",
    "CometConfig",
    "MesaConfig",
    "register_method",
    "config_for",
    "build_policy",
    "Ledger",
    "MemoryReport",
    "ReportRow",
    "Policy",
    "PolicyContext",
    "UniformPolicy",
    "GactPolicy",
    "POLICIES",
    "register_policy",
    "allocate_bits",
    "DivisionPolicy",
    "CometPolicy",
    "MesaPolicy",
    "checkpoint_blocks",
    "checkpointed_blocks",
    "remove_checkpoints",
]
