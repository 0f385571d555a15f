"""Text classification from the fortunes files and post-training quantization of a BERT classifier on it."""
import json
from pathlib import Path

import pytest
import torch

from lowbit import quant
from lowbit.data.fortunes_classes import (
    CLS,
    PAD,
    UNK,
    FortuneClasses,
    WordTokenizer,
    load_fortune_classes,
    read_fortunes,
    words,
)
from lowbit.data.images import DatasetNotFound
from lowbit.data.text import FORTUNES_DIR

if not Path(FORTUNES_DIR, "computers").is_file():
    pytest.skip("needs the Debian `fortunes` package", allow_module_level=True)

SMALL = {"per_class": 30, "seq_len": 16, "vocab_size": 300}


@pytest.fixture(scope="module")
def small() -> FortuneClasses:
    return load_fortune_classes(**SMALL)


def test_read_fortunes_splits_on_percent_lines(tmp_path):
    f = tmp_path / "topic"
    f.write_text("first one\n  on two lines\n%\n\n%\nsecond 100% sure\n%\n")
    assert read_fortunes(f) == ["first one\n  on two lines", "second 100% sure"]


def test_tokenizer_is_frequency_ranked_and_pads():
    tok = WordTokenizer(["b a a", "c b a", "d"], vocab_size=5, min_count=1)
    assert tok.itos == ["[PAD]", "[UNK]", "[CLS]", "a", "b"]  # c and d did not fit
    assert tok.encode("A b, zzz", 6) == [CLS, 3, 4, UNK, UNK, PAD]  # "," and "zzz" unknown
    assert tok.encode("a a a a a a a", 3) == [CLS, 3, 3]  # cut to seq_len
    assert words("Don't panic!") == ["don't", "panic", "!"]
    with pytest.raises(ValueError, match="special tokens"):
        WordTokenizer(["a"], vocab_size=3)


def test_fortune_classes_are_balanced_disjoint_and_deterministic(small):
    n_cls = len(small.classes)
    x, y = small.train
    tx, ty = small.test
    assert x.shape == (len(y), 16) and tx.shape == (len(ty), 16) and x.dtype == torch.int64
    assert torch.equal(torch.bincount(y), torch.full((n_cls,), 24)) and torch.equal(torch.bincount(ty), torch.full((n_cls,), 6))
    assert bool((x[:, 0] == CLS).all()) and int(x.max()) < small.vocab_size <= 300
    assert not set(small.train_texts) & set(small.test_texts)
    # a fortune's label is the file it was read from
    for text, label in zip(small.test_texts[:10], ty[:10].tolist()):
        assert text in read_fortunes(Path(FORTUNES_DIR) / small.classes[label])
    again = load_fortune_classes(**SMALL)
    assert torch.equal(again.train[0], x) and torch.equal(again.test[1], ty) and again.tokenizer.itos == small.tokenizer.itos
    other = load_fortune_classes(**SMALL, seed=1)
    assert not torch.equal(other.train[0], x)
    # the vocabulary comes from the training split only
    train_words = {w for t in small.train_texts for w in words(t)}
    assert set(small.tokenizer.itos[3:]) <= train_words


def test_fortune_classes_reject_bad_arguments(tmp_path):
    with pytest.raises(DatasetNotFound, match="no-such-file"):
        load_fortune_classes(classes=("computers", "no-such-file"), **SMALL)
    with pytest.raises(ValueError, match="at least 2 classes"):
        load_fortune_classes(classes=("computers",))
    with pytest.raises(ValueError, match="repeat"):
        load_fortune_classes(classes=("computers", "computers"))
    with pytest.raises(ValueError, match="test_fraction"):
        load_fortune_classes(test_fraction=1.0)
    with pytest.raises(ValueError, match="seq_len"):
        load_fortune_classes(seq_len=1)


def test_bert_ptq_on_fortunes_keeps_logits_at_w8a8(small):
    """The text PTQ path on a tiny BERT classifier: token-id calibration, every inner Linear gets a
    quantized weight and a quantized input, W8A8 stays close to float and W4A2 does not. The
    classifier is random with a wide initialisation (a trained one costs minutes): its logits
    still depend strongly on the text, unlike BERT's default 0.02 init whose logits barely move.
    Min/max ranges keep the test fast (the MSE range search is what the benchmark uses)."""
    pytest.importorskip("transformers", reason="needs the hf extra")
    from lowbit.bench.ptq_text import predict, text_classifier

    model = text_classifier(small.vocab_size, len(small.classes), small.seq_len, num_hidden_layers=1,
                            initializer_range=0.2).eval()
    calib, (x, y) = small.train[0][:16], small.test
    ref = predict(model, x)
    assert len(torch.unique(ref.argmax(1))) >= 2  # the float model's predictions depend on the text
    q8 = quant.ptq(model, calib, w_bits=8, a_bits=8, calibration="minmax", progress=False)
    lin = dict(quant.quant_layers(q8))
    inner = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][1:-1]
    assert sorted(lin) == sorted(inner) and "classifier" not in lin
    assert all(m.input_quantizer is not None and m.input_quantizer.bits == 8 for m in lin.values())
    out8 = predict(q8, x)
    err8 = float((out8 - ref).pow(2).mean() / ref.var(0).mean())
    assert err8 < 0.02
    assert float((out8.argmax(1) == ref.argmax(1)).float().mean()) >= 0.9
    acc = lambda logits: float((logits.argmax(1) == y).float().sum())  # noqa: E731
    assert abs(acc(out8) - acc(ref)) <= 2  # test fortunes
    q2 = quant.ptq(model, calib, w_bits=4, a_bits=2, calibration="minmax", progress=False)
    assert float((predict(q2, x) - ref).pow(2).mean() / ref.var(0).mean()) > 10 * err8


@pytest.mark.slow
def test_ptq_text_benchmark_quick(tmp_path):
    pytest.importorskip("transformers", reason="needs the hf extra")
    from lowbit.bench import ptq_text

    res = ptq_text.run(quick=True, out=tmp_path, cache=False, progress=False, log=lambda *a: None)
    assert {(r["w_bits"], r["a_bits"], r["method"]) for r in res["rows"]} == {
        (w, a, m) for w, a in ptq_text.CONFIGS for m in ptq_text.METHODS}
    assert all(r["seconds"] > 0 and 0 <= r["accuracy"] <= 100 for r in res["rows"])
    w8a8 = [r for r in res["rows"] if (r["w_bits"], r["a_bits"]) == (8, 8)]
    assert all(r["agreement"] >= 90 for r in w8a8)
    peers = {r["library"] for r in res["peers"]}
    assert "torch-dynamic-int8" in peers
    if "torchao" not in " ".join(res["skipped"]):
        assert {"torchao-int8-dynamic", "torchao-int8-weight-only"} <= peers
    saved = json.loads((tmp_path / "ptq-text.json").read_text())
    assert saved["float_accuracy"] == res["float_accuracy"]
    table = (tmp_path / "ptq-text.md").read_text()
    assert "lowbit aquant" in table and "W2A4" in table and "torch-dynamic-int8" in table
