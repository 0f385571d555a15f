"""End-to-end activation memory, measured as process RSS in a child: held between forward and
backward, and the step's peak.

The child runs with glibc's mmap threshold pinned low, so every large tensor lives in its own
mapping that is returned to the OS when freed: RSS then follows live tensors, and

- ``held_bytes``: the RSS growth over a forward pass, the memory autograd (or lowbit) holds for
  backward;
- ``step_peak_bytes``: the peak RSS growth over forward + backward of one step (Linux's
  high-water mark ``VmHWM``, reset before the step through ``/proc/self/clear_refs``), which is
  what runs out first: it includes every transient buffer (encoder workspace, decoded tensors,
  gradients of activations, a checkpointed block's recomputation).

Parameter gradients are allocated in the warm-up steps and kept (zeroed, not freed), so neither
figure counts them. On CUDA the same figures come from ``torch.cuda.memory_allocated`` and
``torch.cuda.max_memory_allocated``.

Models: the reference models (``resnet``, ``vit``, ``gpt``) on their benchmark data, or the
real-model matrix of :mod:`lowbit.models.hf` as ``hf-gpt2``, ``hf-bert``, ``hf-llama``,
``hf-resnet18`` (random weights and data; ``size``, ``seq`` and ``vocab`` choose the shape).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

from lowbit.bench.common import make_compressor

CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}


def trim_heap() -> None:
    """Hand free heap pages back to the OS, so that what the next forward allocates shows in RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark to its current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def start_peak(cuda: bool) -> tuple[int, bool]:
    """Collect garbage, hand free heap back and reset the high-water mark: (bytes in use now,
    whether a peak can be read: CPU needs Linux's /proc/self/clear_refs)."""
    gc.collect()
    trim_heap()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated(), True
    can_peak = reset_peak_rss()
    return rss_bytes(), can_peak


def measure_held_memory(model: str, method: str, bits: float | None, batch_size: int, repeats: int = 3,
                        device: str = "cpu", size: str = "small", seq: int | None = None, vocab: int | None = None,
                        train: bool = False, timeout: float | None = None) -> dict:
    """Run one child process; returns {"held_bytes", "step_peak_bytes", "lowbit_raw_bytes",
    "lowbit_stored_bytes", ...} (medians over ``repeats`` steps after two warm-up steps).

    model: a reference model name or ``hf-<name>`` (then ``size``, ``seq``, ``vocab`` apply);
    train: measure in train mode (dropout on, BatchNorm on batch statistics)."""
    cmd = [sys.executable, "-m", "lowbit.bench.memory", "--model", model, "--method", method,
           "--batch-size", str(batch_size), "--repeats", str(repeats), "--device", device, "--size", size]
    if bits is not None:
        cmd += ["--bits", str(bits)]
    if seq is not None:
        cmd += ["--seq", str(seq)]
    if vocab is not None:
        cmd += ["--vocab", str(vocab)]
    if train:
        cmd.append("--train")
    env = dict(os.environ, **CHILD_ENV)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed ({' '.join(cmd)}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def hf_setup(name: str, size: str = "small", batch_size: int = 8, seq: int | None = None, vocab: int | None = None,
             seed: int = 0):
    """(model, batch, loss closure) for ``name`` in lowbit.models.hf.HF_MODELS, seeded: the same
    weights and data for every method. ``seq`` longer than the size's default widens GPT-2's and
    Llama's position table (BERT's is fixed by the size)."""
    from lowbit.models.hf import hf_batch, hf_loss, hf_model

    overrides = {}
    if seq is not None and name == "gpt2":
        overrides["max_position_embeddings"] = max(seq, 64)  # GPT2Config's alias of n_positions
    torch.manual_seed(seed)
    model = hf_model(name, size, **overrides)
    if vocab is not None and name != "resnet18" and vocab != model.config.vocab_size:
        model.resize_token_embeddings(vocab, mean_resizing=False)  # hf_model fixes vocab_size per size
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # training: no key/value cache
    batch = hf_batch(name, model, batch_size, seq, size, generator=torch.Generator().manual_seed(seed + 1))
    return model, batch, lambda: hf_loss(model, batch)


def _setup(args):
    """(model, loss closure) for the child."""
    from lowbit.bench.common import fortunes_corpus, image_data, reference_model

    if args.model.startswith("hf-"):
        model, batch, _ = hf_setup(args.model[3:], args.size, args.batch_size, args.seq, args.vocab)
        model = model.to(args.device)
        batch = {k: v.to(args.device) for k, v in batch.items()}
        return model, lambda: model(**batch).loss
    if args.model == "gpt":
        corpus = fortunes_corpus()
        model = reference_model("gpt", vocab_size=corpus.vocab_size)
        x, y = corpus.batch(args.batch_size, model.block_size, torch.Generator().manual_seed(0))
        loss_fn = lambda out, t: F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1))  # noqa: E731
    else:
        (x, y), _, _ = image_data(limit=args.batch_size, test_limit=1, notice=lambda *a: None)
        model = reference_model(args.model, image_size=x.shape[-1])
        loss_fn = F.cross_entropy
    model, x, y = model.to(args.device), x.to(args.device), y.to(args.device)
    return model, lambda: loss_fn(model(x), y)


def _child(args) -> dict:
    torch.manual_seed(0)
    model, loss_closure = _setup(args)
    model.train(args.train)
    act = make_compressor(args.method, args.bits, model)
    cuda = args.device.startswith("cuda")
    held, peak, step_peak = [], [], []
    can_peak = True
    for r in range(args.repeats + 2):  # two warm-up steps: lazy allocations, gradients, kernel compilation
        before, ok = start_peak(cuda)
        can_peak = ok and can_peak
        with act:
            loss = loss_closure()
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            after, top = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        else:
            after = rss_bytes()
            top = peak_rss_bytes() if can_peak else after
        rep = act.report()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
            step_top = torch.cuda.max_memory_allocated()
        else:
            step_top = peak_rss_bytes() if can_peak else float("nan")
        del loss
        model.zero_grad(set_to_none=False)
        act.step(loss_closure)  # GACT allocates its bits on the first step
        if r >= 2:
            held.append(after - before)
            peak.append(top - before)
            step_peak.append(step_top - before)
    return {
        "model": args.model,
        "method": args.method,
        "bits": args.bits,
        "batch_size": args.batch_size,
        "device": args.device,
        "train": args.train,
        "held_bytes": statistics.median(held),
        "forward_peak_bytes": statistics.median(peak),
        "step_peak_bytes": statistics.median(step_peak),
        "lowbit_raw_bytes": rep.raw_bytes,
        "lowbit_stored_bytes": rep.stored_bytes,
        "report_method": rep.method,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet", help="resnet, vit, gpt, or hf-gpt2 / hf-bert / hf-llama / hf-resnet18")
    p.add_argument("--method", default="none")
    p.add_argument("--bits", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="small", help="hf models: tiny or small")
    p.add_argument("--seq", type=int, default=None, help="hf text models: sequence length")
    p.add_argument("--vocab", type=int, default=None, help="hf text models: vocabulary size")
    p.add_argument("--train", action="store_true", help="train mode (dropout, BatchNorm batch statistics)")
    args = p.parse_args(argv)
    if args.bits is not None and args.method.split("+")[-1] in ("uniform", "division"):
        args.bits = int(args.bits)
    print(json.dumps(_child(args)))


if __name__ == "__main__":
    main()
