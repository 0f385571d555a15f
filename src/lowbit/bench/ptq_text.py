"""`lowbit bench ptq-text`: post-training quantization of a BERT text classifier, lowbit next to
the int8 quantizers users run today.

The task: which of six Debian ``fortunes`` files (computers, definitions, people, politics,
science, songs-poems) a fortune comes from (``lowbit.data.fortunes_classes``, a word vocabulary
built here, 48 tokens). A BERT-config classifier (``transformers`` ``BertForSequenceClassification``
from a config, 2 layers, hidden 128) is trained here once (360 AdamW steps; the weights are cached
outside the repository, so later runs start at once). Then, on the same model, the same test set and the same
calibration samples for every row:

- lowbit ``quant.ptq`` with round-to-nearest, AdaRound and AQuant at W8A8, W4A8, W4A4, W2A4
  (first and last Linear float, activation ranges by MSE clipping, static);
- torchao 0.18 ``Int8DynamicActivationInt8WeightConfig`` and ``Int8WeightOnlyConfig`` (every
  Linear, real int8 kernels), torch's own ``quantize_dynamic`` int8, and NNCF's
  ``nncf.quantize`` (int8, transformer preset) where ``nncf`` is installed.

Columns: test accuracy, difference to float, agreement with the float model's predictions and
the seconds the quantization itself took (same process, same threads)."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lowbit import quant
from lowbit.bench.common import markdown_table, save_results
from lowbit.data.fortunes_classes import FortuneClasses, load_fortune_classes

CONFIGS = [(8, 8), (4, 8), (4, 4), (2, 4)]
METHODS = ("rtn", "adaround", "aquant")
PEERS = ("torchao-int8-dynamic", "torchao-int8-weight-only", "torch-dynamic-int8", "nncf-int8")

MODEL = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 512}
DATA = {"per_class": 600, "seq_len": 48, "vocab_size": 3000}
TRAIN = {"epochs": 4, "batch": 32, "lr": 1e-3, "seed": 0}
DEFAULTS = {"model": MODEL, "data": DATA, "train": TRAIN, "calib": 128, "iters": 150}
# quick: a smoke test of every row in a few minutes; the model barely trains, so it starts from a
# wide initialisation whose predictions depend on the text (BERT's default 0.02 gives near-tied logits)
QUICK = {"model": {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256,
                   "initializer_range": 0.2},
         "data": {"per_class": 60, "seq_len": 24, "vocab_size": 600},
         "train": {"epochs": 2, "batch": 32, "lr": 1e-3, "seed": 0}, "calib": 16, "iters": 5}


def text_classifier(vocab_size: int, num_labels: int, seq_len: int, seed: int = 0, **model_cfg: Any) -> torch.nn.Module:
    """A randomly initialised (seeded) BERT-config sequence classifier for ``seq_len`` token ids."""
    from lowbit.models.hf import hf_model

    torch.manual_seed(seed)
    return hf_model("bert", size="tiny", num_labels=num_labels, vocab_size=vocab_size,
                    max_position_embeddings=max(seq_len, 64), **model_cfg)


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The class logits [N, classes] of a transformers classifier (or a plain module) on token ids."""
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def predict(model: torch.nn.Module, ids: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Logits [N, classes] in eval mode, batched."""
    model.eval()
    return torch.cat([logits_of(model, ids[i : i + batch]) for i in range(0, len(ids), batch)])


def _cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "ptq-text"


def trained_classifier(data: FortuneClasses, model_cfg: dict, train_cfg: dict, data_cfg: dict, cache: bool = True,
                       progress: bool = True, log: Callable = print) -> tuple[torch.nn.Module, dict]:
    """The BERT classifier trained on ``data.train`` (AdamW, one-cycle schedule, seeded order),
    from the cache when a run with the same settings already trained it. Returns (model in eval
    mode, info: cached, path, train_seconds)."""
    num_labels = len(data.classes)
    key = hashlib.sha256(json.dumps([model_cfg, train_cfg, data_cfg, data.vocab_size, num_labels, len(data.train[0])],
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = _cache_dir() / f"bert-fortunes-{key}.pt"
    model = text_classifier(data.vocab_size, num_labels, data.seq_len, seed=train_cfg["seed"], **model_cfg)
    if cache and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        log(f"trained model from cache {path}")
        return model.eval(), {"cached": True, "path": str(path), "train_seconds": None}
    from tqdm.auto import tqdm

    x, y = data.train
    steps_per_epoch = -(-len(x) // train_cfg["batch"])
    total = steps_per_epoch * train_cfg["epochs"]
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train_cfg["lr"], total_steps=total, pct_start=0.1)
    gen = torch.Generator().manual_seed(train_cfg["seed"])
    model.train()
    t0 = time.perf_counter()
    with tqdm(total=total, desc="train bert on fortunes", disable=not progress, leave=False) as bar:
        for _ in range(train_cfg["epochs"]):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), train_cfg["batch"]):
                idx = order[i : i + train_cfg["batch"]]
                loss = F.cross_entropy(logits_of(model, x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - t0
    log(f"trained {total} steps in {seconds:.0f} s (last loss {loss.item():.3f})")
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), {"cached": False, "path": str(path) if cache else None, "train_seconds": seconds}


# ----------------------------------------------------------------------------------------
# peers: each takes (float model, calibration ids) and returns a quantized copy
# ----------------------------------------------------------------------------------------
def _torchao(config_name: str):
    def apply(model: torch.nn.Module, calib: torch.Tensor) -> torch.nn.Module:
        from torchao import quantization as tq

        q = copy.deepcopy(model)
        tq.quantize_(q, getattr(tq, config_name)())  # every nn.Linear, weights per channel
        return q
    return apply


def _torch_dynamic(model: torch.nn.Module, calib: torch.Tensor) -> torch.nn.Module:
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao, still what many run
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def _nncf(model: torch.nn.Module, calib: torch.Tensor) -> torch.nn.Module:
    import nncf

    batches = [calib[i : i + 32] for i in range(0, len(calib), 32)]
    return nncf.quantize(copy.deepcopy(model), nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=len(calib))


# name -> (module that must import, bits label, what is quantized, function)
PEER_SPECS: dict[str, tuple[str, str, str, Callable]] = {
    "torchao-int8-dynamic": ("torchao", "W8A8 (dynamic)",
                             "torchao Int8DynamicActivationInt8WeightConfig, every Linear",
                             _torchao("Int8DynamicActivationInt8WeightConfig")),
    "torchao-int8-weight-only": ("torchao", "W8A32", "torchao Int8WeightOnlyConfig, every Linear",
                                 _torchao("Int8WeightOnlyConfig")),
    "torch-dynamic-int8": ("torch", "W8A8 (dynamic)", "torch.ao.quantization.quantize_dynamic qint8, every Linear",
                           _torch_dynamic),
    "nncf-int8": ("nncf", "W8A8 (static)", "nncf.quantize, ModelType.TRANSFORMER preset", _nncf),
}


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------
def run(quick: bool = False, out: str | Path = "benchmarks/results/ptq-text", seed: int = 0, configs=CONFIGS,
        methods=METHODS, peers=PEERS, cache: bool = True, progress: bool = True, log: Callable = print) -> dict:
    """Train (or load) the classifier, then one row per (bits, lowbit method) and per peer; write
    ``out/ptq-text.{json,md,png}`` and return the results dict."""
    unknown = [p for p in peers if p not in PEER_SPECS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}: choose from {list(PEER_SPECS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown lowbit methods {bad}: choose from {list(METHODS)}")
    cfg = QUICK if quick else DEFAULTS
    data = load_fortune_classes(seed=seed, **cfg["data"])
    model, train_info = trained_classifier(data, cfg["model"], {**cfg["train"], "seed": seed}, cfg["data"],
                                           cache=cache, progress=progress, log=log)
    test_x, test_y = data.test
    pick = torch.randperm(len(data.train[0]), generator=torch.Generator().manual_seed(seed))[: cfg["calib"]]
    calib = data.train[0][pick]
    float_logits = predict(model, test_x)
    float_pred = float_logits.argmax(1)
    float_acc = 100.0 * float((float_pred == test_y).float().mean())
    log(f"float32 BERT: {float_acc:.2f}% test accuracy on {len(test_y)} fortunes, {len(data.classes)} classes")
    results: dict[str, Any] = {
        "quick": quick, "seed": seed, "threads": torch.get_num_threads(), "config": copy.deepcopy(cfg),
        "data": {"classes": list(data.classes), "train": len(data.train[0]), "test": len(test_y),
                 "vocab_size": data.vocab_size, "seq_len": data.seq_len},
        "train": train_info, "float_accuracy": float_acc, "rows": [], "peers": [], "skipped": {}}
    versions = {"torch": torch.__version__}

    def measure(q: torch.nn.Module) -> dict:
        logits = predict(q, test_x)
        acc = 100.0 * float((logits.argmax(1) == test_y).float().mean())
        return {"accuracy": acc, "delta": acc - float_acc,
                "agreement": 100.0 * float((logits.argmax(1) == float_pred).float().mean()),
                "logit_rmse": float((logits - float_logits).pow(2).mean().sqrt())}

    def save() -> None:
        results["versions"] = versions
        save_results(results, out, "ptq-text", table_markdown, plot, log)

    for wb, ab in configs:
        for method in methods:
            t0 = time.perf_counter()
            q = quant.ptq(model, calib, w_bits=wb, a_bits=ab, method=method, adaround={"iters": cfg["iters"]},
                          progress=progress)
            seconds = time.perf_counter() - t0
            row = {"library": "lowbit", "method": method, "w_bits": wb, "a_bits": ab, "seconds": seconds, **measure(q)}
            results["rows"].append(row)
            log(f"lowbit W{wb}A{ab} {method}: {row['accuracy']:.2f}% ({row['delta']:+.2f}), {seconds:.1f} s")
        save()  # after each width: a long run on a busy machine keeps what it has measured
    for name in peers:
        module, bits, what, fn = PEER_SPECS[name]
        if not _available(module):
            results["skipped"][name] = f"{module} is not installed"
            log(f"{name}: skipped ({module} is not installed)")
            continue
        try:
            t0 = time.perf_counter()
            q = fn(model, calib)
            seconds = time.perf_counter() - t0
            row = {"library": name, "bits": bits, "what": what, "seconds": seconds, **measure(q)}
        except Exception as e:  # a peer that fails on this model is reported, not fatal
            results["skipped"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            log(f"{name}: failed ({results['skipped'][name]})")
            continue
        mod = __import__(module)
        versions[module] = getattr(mod, "__version__", "?")
        results["peers"].append(row)
        log(f"{name} {bits}: {row['accuracy']:.2f}% ({row['delta']:+.2f}), {row['seconds']:.1f} s")
    save()
    return results


def table_markdown(results: dict) -> str:
    d = results["data"]
    head = (f"BERT ({results['config']['model']['num_hidden_layers']} layers, hidden "
            f"{results['config']['model']['hidden_size']}) on fortunes ({len(d['classes'])} classes, "
            f"{d['test']} test fortunes), float32 {results['float_accuracy']:.2f}%, "
            f"{results['config']['calib']} calibration samples, {results['threads']} threads")
    rows = [["float32", "", "", f"{results['float_accuracy']:.2f}", "", "100.0", ""]]
    for r in results["rows"]:
        rows.append([f"lowbit {r['method']}", f"W{r['w_bits']}A{r['a_bits']}", "static, first/last Linear float",
                     f"{r['accuracy']:.2f}", f"{r['delta']:+.2f}", f"{r['agreement']:.1f}", f"{r['seconds']:.1f}"])
    for r in results["peers"]:
        rows.append([r["library"], r["bits"], r["what"], f"{r['accuracy']:.2f}", f"{r['delta']:+.2f}",
                     f"{r['agreement']:.1f}", f"{r['seconds']:.1f}"])
    text = head + "\n\n" + markdown_table(
        ["quantizer", "bits", "scope", "test acc %", "Δ vs float", "agrees with float %", "quantize s"], rows)
    if results.get("skipped"):
        text += "\n\n" + "\n".join(f"- {k}: not run ({v})" for k, v in results["skipped"].items())
    return text


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    rows = results["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    configs = list(dict.fromkeys((r["w_bits"], r["a_bits"]) for r in rows))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        acc = {(r["w_bits"], r["a_bits"]): r["accuracy"] for r in rows if r["method"] == m}
        ax.bar([k + i * width for k in range(len(configs))], [acc.get(c, 0) for c in configs], width,
               label=f"lowbit {m}")
    ticks = [k + width * (len(methods) - 1) / 2 for k in range(len(configs))]
    labels = [f"W{w}A{a}" for w, a in configs]
    base = len(configs)
    for j, r in enumerate(results["peers"]):
        ax.bar(base + j * 0.8, r["accuracy"], 0.6, color=f"C{3 + j}", label=f"{r['library']} ({r['bits']})")
    if results["peers"]:
        ticks.append(base + 0.4 * (len(results["peers"]) - 1))
        labels.append("peers, int8")
    ax.axhline(results["float_accuracy"], color="k", lw=1, ls="--", label="float32")
    ax.set_xticks(ticks, labels)
    ax.set_ylabel("test accuracy (%)")
    every = [r["accuracy"] for r in rows + results["peers"]] or [0]
    ax.set_ylim(max(0, min(every) - 5), min(100, max(every + [results["float_accuracy"]]) + 5))
    ax.set_title("BERT on fortunes: post-training quantization")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
