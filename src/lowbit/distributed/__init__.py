"""Pipeline-parallel training with compressed traffic between stages (AC-SGD), on torch.distributed.

>>> from lowbit.distributed import CharLMTask, PipelineConfig, spawn_local
>>> res = spawn_local(CharLMTask(), PipelineConfig(stages=2, mode="acsgd", bits=4, grad_bits=4))
>>> res["losses"][-1], res["steady_bytes_per_step"]

(``spawn_local`` starts processes: in a script, call it under ``if __name__ == "__main__":``.)

Names are imported on first use (PEP 562), so ``lowbit.distributed.command`` (the argument
parser of ``lowbit dist-train``) loads without torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "parse_bandwidth": "bandwidth", "simulated_step_time": "bandwidth", "transfer_time": "bandwidth",
    "MODES": "channels", "ActivationChannel": "channels", "GradientChannel": "channels",
    "allreduce_gradients": "gradcomp",
    "init_from_env": "launch", "run_rank": "launch", "spawn_local": "launch",
    "ExampleMemory": "memory",
    "PipelineConfig": "config", "PipelineError": "config", "batch_ids": "schedule", "cut_layers": "schedule",
    "total_steps": "schedule", "merge_results": "results", "Stage": "stage", "train_pipeline": "pipeline",
    "train_single": "pipeline",
    "CharLMTask": "task", "PipelineTask": "task",
}

__all__ = ["PipelineConfig", "PipelineError", "PipelineTask", "CharLMTask", "ActivationChannel", "GradientChannel",
           "ExampleMemory", "MODES", "spawn_local", "init_from_env", "run_rank", "train_pipeline", "train_single",
           "cut_layers", "batch_ids", "total_steps", "Stage", "merge_results", "allreduce_gradients", "parse_bandwidth", "transfer_time",
           "simulated_step_time"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lowbit.distributed' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lowbit.distributed.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
