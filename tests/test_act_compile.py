"""ActivationCompressor under torch.compile (inductor, CPU): compiled forward+backward with
compressed saved tensors gives gradients as close to exact as eager mode does."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _grad_helpers import cos as _cos, grad as _grad

from lowbit.act import ActivationCompressor


def _compiled_vs_eager(model, loss_of, bits=8, min_numel=1024):
    exact = _grad(model, lambda: loss_of(model))
    eager = _grad(model, lambda: loss_of(model), ActivationCompressor("uniform", bits=bits, model=model, min_numel=min_numel))
    compiled = torch.compile(model)
    act = ActivationCompressor("uniform", bits=bits, model=model, min_numel=min_numel)
    comp = _grad(model, lambda: loss_of(compiled), act)
    assert act.report().stored_bytes < act.report().raw_bytes  # the compiled graph's saved tensors were compressed
    return _cos(eager, exact), _cos(comp, exact)


@pytest.mark.slow  # inductor compiles for ~20 s of CPU
def test_compiled_conv_net_gradients_match_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    eager, comp = _compiled_vs_eager(model, lambda m: F.cross_entropy(m(x), y))
    assert comp > 0.999 and abs(comp - eager) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_compiled_hf_models_gradients_match_eager(name):
    pytest.importorskip("transformers", reason="needs the hf extra")
    from lowbit.models.hf import hf_batch, hf_loss, hf_model

    torch.manual_seed(0)
    model = hf_model(name, "tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) if name == "bert" \
        else hf_model(name, "tiny")
    model.eval()  # no dropout: compiled and eager draw different masks
    batch = hf_batch(name, model, 8, generator=torch.Generator().manual_seed(0))
    eager, comp = _compiled_vs_eager(model, lambda m: hf_loss(m, batch), bits=4, min_numel=4096)
    assert comp > 0.95 and comp > eager - 0.01  # compiled as close to exact as eager
