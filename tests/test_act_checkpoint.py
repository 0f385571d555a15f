"""Per-block activation checkpointing on the real-model matrix, choosing blocks, and mixing it with
activation compression."""
import warnings

import pytest
import torch
from torch import nn

from _grad_helpers import cos as _cos, grad as _grad

from lowbit.act import ActivationCompressor, checkpoint_blocks, remove_checkpoints
from lowbit.act.checkpoint import checkpointed_blocks

pytest.importorskip("transformers", reason="needs the hf extra")
from lowbit.models.hf import hf_batch, hf_loss, hf_model  # noqa: E402

EXPECTED = {"gpt2": 2, "bert": 2, "llama": 2, "resnet18": 8}


def _setup(name, train=True):
    torch.manual_seed(0)
    model = hf_model(name, "tiny")
    model.train(train)
    batch = hf_batch(name, model, 4, generator=torch.Generator().manual_seed(1))
    return model, lambda: hf_loss(model, batch)


def _seeded(loss):
    def run():
        torch.manual_seed(7)  # the same dropout masks for every run
        return loss()
    return run


@pytest.mark.parametrize("name", ["gpt2", "llama", pytest.param("bert", marks=pytest.mark.slow),
                                  pytest.param("resnet18", marks=pytest.mark.slow)])
def test_each_layer_is_checkpointed_and_gradients_are_exact_in_train_mode(name):
    model, loss = _setup(name)
    exact = _grad(model, _seeded(loss))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the key/value cache notice of GPT-2 and Llama
        blocks = checkpoint_blocks(model)
        assert len(blocks) == EXPECTED[name] and len(checkpointed_blocks(model)) == EXPECTED[name]
        act = ActivationCompressor("none", model=model)
        g = _grad(model, _seeded(loss), act)
    assert torch.allclose(g, exact, rtol=1e-5, atol=1e-7)
    # inside the checkpointed layers nothing is held: only what lies outside them is saved
    inside = [r for r in act.report().rows if any(r.module.startswith(b) for b in checkpointed_blocks(model))]
    assert inside == []
    remove_checkpoints(model)
    assert checkpointed_blocks(model) == []


def test_a_key_value_cache_is_dropped_with_one_warning_and_kept_without_gradients():
    model, loss = _setup("gpt2")
    model.config.use_cache = True
    checkpoint_blocks(model)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        loss().backward()
        loss().backward()
    assert sum("cache" in str(x.message) for x in w) == 1
    with torch.no_grad():  # inference: the layers run as they are, cache included
        ids = torch.randint(0, 512, (1, 5))
        out = model(input_ids=ids, use_cache=True)
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() == 5


def test_choosing_blocks_by_every_names_pattern_and_predicate():
    model, _ = _setup("resnet18")
    names = [f"resnet.encoder.stages.{s}.layers.{b}" for s in range(4) for b in range(2)]
    checkpoint_blocks(model, every=2)
    assert checkpointed_blocks(model) == names[::2]
    remove_checkpoints(model)
    checkpoint_blocks(model, blocks=["resnet.embedder", names[3]])
    assert checkpointed_blocks(model) == ["resnet.embedder", names[3]]
    remove_checkpoints(model)
    checkpoint_blocks(model, blocks=r"resnet\.encoder\.stages\.[01]\.layers\.\d")
    assert checkpointed_blocks(model) == names[:4]
    remove_checkpoints(model)
    checkpoint_blocks(model, blocks=lambda n, m: n.endswith(".1"))
    assert checkpointed_blocks(model) == names[1::2]
    remove_checkpoints(model)
    with pytest.raises(ValueError, match="no submodule"):
        checkpoint_blocks(model, blocks=["resnet.nope"])
    with pytest.raises(ValueError, match="inside other"):
        checkpoint_blocks(model, blocks=["resnet.encoder.stages.0", names[0]])
    with pytest.raises(ValueError, match="every"):
        checkpoint_blocks(model, every=0)
    with pytest.raises(ValueError, match="repeated blocks"):
        checkpoint_blocks(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


@pytest.mark.parametrize("name", ["gpt2", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_checkpoint_half_compress_the_rest(name):
    """Checkpointed layers hold nothing, the others are compressed once (not again in the
    recomputation, which runs under checkpointing's own hooks), and the gradient stays within
    the codec's error, also when the compressor is still active during backward."""
    model, loss = _setup(name)
    exact = _grad(model, _seeded(loss))
    full = ActivationCompressor("uniform", bits=8, model=model)
    _grad(model, _seeded(loss), full)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoint_blocks(model, every=2)
        mixed = ActivationCompressor("uniform", bits=8, model=model)
        g = _grad(model, _seeded(loss), mixed)
        assert _cos(g, exact) > 0.999
        rep, whole = mixed.report(), full.report()
        ckpt = checkpointed_blocks(model)
        assert not any(r.module.startswith(b) for r in rep.rows for b in ckpt)
        assert rep.raw_bytes < 0.8 * whole.raw_bytes and rep.stored_bytes < 0.8 * whole.stored_bytes
        entries = sum(r.count for r in rep.rows)
        mixed.step()
        model.zero_grad(set_to_none=True)
        with mixed:  # backward (and its recomputation) inside the hooks, as the Trainer callback runs it
            _seeded(loss)().backward()
        g2 = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    assert _cos(g2, exact) > 0.999
    mixed.step()
    assert sum(r.count for r in mixed.report().rows) == entries  # the recomputation added no entries


@pytest.mark.slow
def test_step_peak_of_per_block_checkpointing_is_at_most_half_of_plain():
    """RSS in a child process, train mode: the step's peak (forward + backward) and the memory held."""
    from lowbit.bench.memory import measure_held_memory

    kw = dict(size="small", seq=256, vocab=1000, train=True, repeats=1)
    plain = measure_held_memory("hf-gpt2", "none", None, 4, **kw)
    ckpt = measure_held_memory("hf-gpt2", "checkpoint", None, 4, **kw)
    mixed = measure_held_memory("hf-gpt2", "checkpoint+uniform", 4, 4, **kw)
    assert plain["step_peak_bytes"] >= plain["held_bytes"] > 50 * 2**20
    assert ckpt["step_peak_bytes"] <= 0.5 * plain["step_peak_bytes"]
    assert ckpt["held_bytes"] <= 0.2 * plain["held_bytes"]
    assert mixed["held_bytes"] < ckpt["held_bytes"] * 1.5 and mixed["step_peak_bytes"] <= 0.5 * plain["step_peak_bytes"]
