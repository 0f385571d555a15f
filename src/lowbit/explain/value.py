"""The value function of a prediction game: v(S) = mean_k f(x_S, b_k on the rest).

Players are features, or groups of features (a one-hot block is one player). Coalitions are
boolean masks over players; ``ValueFunction`` turns a batch of them into model inputs, calls the
model in chunks and counts every coalition it evaluates (the budget unit of the estimators)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Model = Callable[[torch.Tensor], torch.Tensor]


def check_groups(groups: Sequence[Sequence[int]] | None, n_features: int) -> list[list[int]]:
    """Players as lists of feature indices: one per feature by default; groups must partition 0..M-1."""
    if groups is None:
        return [[i] for i in range(n_features)]
    groups = [list(map(int, g)) for g in groups]
    flat = sorted(i for g in groups for i in g)
    if any(len(g) == 0 for g in groups) or flat != list(range(n_features)):
        raise ValueError(f"groups must partition the {n_features} features 0..{n_features - 1} (each exactly once, "
                         f"no empty group); got {groups}")
    return groups


def model_output(model: Model, inputs: torch.Tensor, target: int | torch.Tensor | None) -> torch.Tensor:
    """f on a batch [N, M] as a vector [N]; ``target`` picks a column of [N, C] outputs (an int, or
    one class per row as a LongTensor [N])."""
    out = model(inputs)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a torch.Tensor, got {type(out).__name__}")
    if out.dim() == 2 and out.shape[1] == 1 and target is None:
        out = out[:, 0]
    if out.dim() == 2:
        if target is None:
            raise ValueError(f"the model returns [N, C] = {list(out.shape)}: pass target= to choose the output to explain")
        if isinstance(target, torch.Tensor):
            return out.gather(1, target.reshape(-1, 1).to(out.device)).squeeze(1)
        return out[:, int(target)]
    if out.dim() != 1 or out.shape[0] != inputs.shape[0]:
        raise ValueError(f"the model must map [N, M] to [N] (or [N, C] with target=); it returned {list(out.shape)} "
                         f"for input {list(inputs.shape)}")
    return out


class ValueFunction:
    """v(S) for one instance ``x`` [M] against ``background`` [K, M].

    ``__call__(masks)``: masks bool [S, P] over the P players -> values float64 [S]. Every row
    of ``masks`` counts as one evaluation in ``evaluations`` (each costs K model rows)."""

    def __init__(self, model: Model, x: torch.Tensor, background: torch.Tensor, groups: list[list[int]],
                 target: int | None = None, batch_size: int = 8192):
        self.model, self.x, self.background, self.target = model, x, background, target
        self.players = len(groups)
        self.batch_size = max(1, batch_size)
        member = torch.zeros(self.players, x.shape[0], dtype=torch.bool, device=x.device)
        for p, g in enumerate(groups):
            member[p, g] = True
        self.member = member  # [P, M]
        self.evaluations = 0

    def feature_mask(self, masks: torch.Tensor) -> torch.Tensor:
        """[S, P] player masks -> [S, M] feature masks."""
        return (masks.to(self.member.device).float() @ self.member.float()) > 0

    @torch.no_grad()
    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        masks = masks.reshape(-1, self.players)
        self.evaluations += masks.shape[0]
        fmask = self.feature_mask(masks)  # [S, M]
        k = self.background.shape[0]
        rows_per_chunk = max(1, self.batch_size // k)
        out = []
        for i in range(0, fmask.shape[0], rows_per_chunk):
            m = fmask[i : i + rows_per_chunk]
            inputs = torch.where(m[:, None, :], self.x[None, None, :], self.background[None, :, :])  # [s, K, M]
            tgt = self.target
            if isinstance(tgt, torch.Tensor):
                tgt = tgt.expand(inputs.shape[0] * k)
            f = model_output(self.model, inputs.reshape(-1, inputs.shape[-1]), tgt)
            out.append(f.reshape(-1, k).double().mean(1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def empty_and_full(self) -> tuple[float, float]:
        """(v(empty), v(all players))."""
        v = self(torch.stack([torch.zeros(self.players, dtype=torch.bool), torch.ones(self.players, dtype=torch.bool)]))
        return float(v[0]), float(v[1])
