"""Pipeline-parallel training with compressed traffic between stages (AC-SGD), on torch.distributed.

>>> from lowbit.distributed import CharLMTask, PipelineConfig, spawn_local
>>> res = spawn_local(CharLMTask(), PipelineConfig(stages=2, mode="acsgd", bits=4, grad_bits=4))
>>> res["losses"][-1], res["steady_bytes_per_step"]
"""
from lowbit.distributed.bandwidth import parse_bandwidth, simulated_step_time, transfer_time
from lowbit.distributed.channels import MODES, ActivationChannel, GradientChannel
from lowbit.distributed.gradcomp import allreduce_gradients
from lowbit.distributed.launch import init_from_env, run_rank, spawn_local
from lowbit.distributed.memory import ExampleMemory
from lowbit.distributed.pipeline import (PipelineConfig, PipelineError, batch_ids, cut_layers, merge_results,
                                         train_pipeline, train_single)
from lowbit.distributed.task import CharLMTask, PipelineTask

__all__ = ["PipelineConfig", "PipelineError", "PipelineTask", "CharLMTask", "ActivationChannel", "GradientChannel",
           "ExampleMemory", "MODES", "spawn_local", "init_from_env", "run_rank", "train_pipeline", "train_single",
           "cut_layers", "batch_ids", "merge_results", "allreduce_gradients", "parse_bandwidth", "transfer_time",
           "simulated_step_time"]
