"""Gradient helpers the activation-compression tests share."""
import torch
import torch.nn.functional as F


def grad(model, loss_fn, act=None) -> torch.Tensor:
    """Flattened parameter gradient of ``loss_fn()``, computed inside ``act`` when given."""
    model.zero_grad(set_to_none=True)
    if act is None:
        loss = loss_fn()
    else:
        with act:
            loss = loss_fn()
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def cos(a, b) -> float:
    return float(F.cosine_similarity(a, b, dim=0))
