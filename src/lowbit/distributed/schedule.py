"""How a run is cut up, the same on every rank: layers into stages, examples into batches."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.distributed.config import PipelineConfig


def cut_layers(layers: list[nn.Module], stages: int) -> list[nn.Sequential]:
    """Contiguous split of ``layers`` into ``stages`` parts with the largest part (in parameters,
    +1 per layer) as small as possible."""
    if not 1 <= stages <= len(layers):
        raise ValueError(f"cannot cut {len(layers)} layers into {stages} stages")
    cost = [1 + sum(p.numel() for p in layer.parameters()) for layer in layers]
    n = len(cost)
    prefix = [0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    # best[k][i]: smallest max part for the first i layers in k parts; arg for the cut
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    arg = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], arg[k][i] = v, j
    cuts, i = [], n
    for k in range(stages, 0, -1):
        cuts.append((arg[k][i], i))
        i = arg[k][i]
    return [nn.Sequential(*layers[a:b]) for a, b in reversed(cuts)]


def batch_ids(n_examples: int, batch_size: int, step: int, seed: int) -> tuple[int, torch.Tensor]:
    """(epoch, example ids int64 [batch_size]) of global ``step``: a seeded permutation per epoch,
    the last incomplete batch dropped. Every rank computes the same ids."""
    per_epoch = n_examples // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {n_examples} examples")
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return epoch, perm[i * batch_size : (i + 1) * batch_size]


def total_steps(cfg: PipelineConfig, n_examples: int) -> int:
    """Steps of a run: ``epochs`` over ``n_examples`` in whole batches, capped at ``max_steps``."""
    steps = cfg.epochs * (n_examples // cfg.batch_size)
    return steps if cfg.max_steps is None else min(steps, cfg.max_steps)
