"""Activation-compressed training: compress the tensors autograd saves for backward."""
from lowbit.act.compressor import ActivationCompressor
from lowbit.act.gact import GactPolicy, allocate_bits
from lowbit.act.policy import POLICIES, Policy, UniformPolicy, register_policy
from lowbit.act.report import MemoryReport, ReportRow

__all__ = [
    "ActivationCompressor",
    "MemoryReport",
    "ReportRow",
    "Policy",
    "UniformPolicy",
    "GactPolicy",
    "POLICIES",
    "register_policy",
    "allocate_bits",
]
