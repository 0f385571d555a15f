"""Activation-compressed training: compress the tensors autograd saves for backward."""
from lowbit.act import comet, division, mesa  # noqa: F401  (register their policies)
from lowbit.act.checkpoint import checkpoint_blocks, checkpointed_blocks, remove_checkpoints
from lowbit.act.comet import CometPolicy
from lowbit.act.context import PolicyContext
from lowbit.act.compressor import ActivationCompressor
from lowbit.act.division import DivisionPolicy
from lowbit.act.mesa import MesaPolicy
from lowbit.act.gact import GactPolicy, allocate_bits
from lowbit.act.policy import POLICIES, Policy, UniformPolicy, register_policy
from lowbit.act.report import MemoryReport, ReportRow

__all__ = [
    "ActivationCompressor",
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
