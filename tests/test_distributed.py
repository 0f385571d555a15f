"""lowbit.distributed: the delta codec, example memory, and real multi-process pipelines on gloo."""
import os

import pytest
import torch
from torch import nn

from lowbit.codecs import DeltaCodec, UniformCodec
from lowbit.distributed import (CharLMTask, ExampleMemory, PipelineConfig, PipelineError, batch_ids, cut_layers,
                                parse_bandwidth, simulated_step_time, spawn_local, train_single)
from lowbit.codecs.uniform import from_bytes, quant_nbytes, to_bytes
from lowbit.distributed.wire import HEADER_LEN, WireCounter, raw_packed, recv_packed, send_packed

DIM, BLOCK = 32, 16


def small_task() -> CharLMTask:
    return CharLMTask(n_examples=128, block=BLOCK, dim=DIM, depth=2, heads=2)


def cfg(**kw) -> PipelineConfig:
    base = dict(stages=2, batch_size=16, micro_batches=4, epochs=1, threads=1, timeout_s=30)
    return PipelineConfig(**{**base, **kw})


# --- pieces, in process ---------------------------------------------------------------------

def test_delta_codec_round_trip_is_within_the_change_quantization_error():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(8, 64, generator=g)
    a = ref + 0.01 * torch.randn(8, 64, generator=g)
    codec = DeltaCodec(UniformCodec(bits=2, group_size=64, rounding="nearest"))
    p = codec.encode(a, ref)
    out = codec.decode(p, ref)
    change = a - ref
    step = (change.view(-1, 64).amax(1) - change.view(-1, 64).amin(1)) / 3  # per-group scale at 2 bits
    assert ((out - a).abs().view(-1, 64) <= step[:, None] / 2 + 1e-6).all()
    # a small change costs the same bits as a big one, but its error is small: that is the point
    assert (out - a).abs().max() < 0.02 < (UniformCodec(2, 64, "nearest").decode(UniformCodec(2, 64, "nearest").encode(a)) - a).abs().max()
    with pytest.raises(ValueError, match="reference"):
        codec.encode(a, ref[:4])


def test_delta_codec_is_unbiased_with_stochastic_rounding():
    ref = torch.linspace(-1, 1, 256).view(1, 256)
    a = ref + torch.linspace(0, 0.3, 256).view(1, 256) ** 2
    codec = DeltaCodec(UniformCodec(bits=2, group_size=256, rounding="stochastic", seed=1))
    mean = torch.stack([codec.decode(codec.encode(a, ref), ref) for _ in range(2000)]).mean(0)
    assert (mean - a).abs().max() < 3e-3


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_example_memory_stores_by_id_and_round_trips_a_checkpoint(tmp_path, where):
    mem = ExampleMemory(10, where, "float16", tmp_path)
    x = torch.randn(3, 4, 5)
    ids = torch.tensor([7, 0, 3])
    assert torch.equal(mem.get(ids, x), torch.zeros_like(x))  # never seen: zero reference
    stored = mem.put(ids, x)
    assert torch.equal(stored, x.half().float())
    assert torch.equal(mem.get(torch.tensor([3]), x[:1]), stored[2:])
    assert mem.nbytes == 10 * 4 * 5 * 2
    state = mem.state_dict()
    mem.put(ids, torch.zeros_like(x))  # training goes on after the checkpoint ...
    mem.load_state_dict(state)  # ... and resuming brings back the checkpointed references
    assert torch.equal(mem.get(ids, x), stored)
    with pytest.raises(ValueError, match="rows have shape"):
        mem.put(ids, torch.randn(3, 4))
    with pytest.raises(IndexError):
        mem.get(torch.tensor([10]), x[:1])


def test_example_memory_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        ExampleMemory(4, "disk")
    with pytest.raises(ValueError, match="dtype"):
        ExampleMemory(4, dtype="int8")


def test_cut_layers_balances_parameters_and_keeps_order():
    layers = [nn.Linear(4, 4), nn.Linear(4, 64), nn.Linear(64, 64), nn.Linear(64, 4), nn.Linear(4, 4)]
    parts = cut_layers(layers, 3)
    assert [m for p in parts for m in p] == layers
    assert [len(p) for p in parts] == [2, 1, 2]
    with pytest.raises(ValueError):
        cut_layers(layers, 6)


def test_batch_ids_is_a_seeded_permutation_per_epoch():
    seen = torch.cat([batch_ids(40, 8, s, seed=3)[1] for s in range(5)])
    assert sorted(seen.tolist()) == list(range(40))
    assert batch_ids(40, 8, 5, seed=3)[0] == 1
    assert torch.equal(batch_ids(40, 8, 2, seed=3)[1], batch_ids(40, 8, 2, seed=3)[1])


def test_bandwidth_parsing_and_simulated_time():
    assert parse_bandwidth("100Mbps") == 1e8 and parse_bandwidth("1 Gbps") == 1e9 and parse_bandwidth(5e6) == 5e6
    with pytest.raises(ValueError, match="bandwidth"):
        parse_bandwidth("fast")
    # 12.5 MB over 100 Mbit/s is one second; replicas run side by side, the slowest counts
    assert simulated_step_time(0.5, [[12_500_000], [6_000_000]], 0, "100Mbps") == pytest.approx(1.5)


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="mode"):
        PipelineConfig(mode="zip")
    with pytest.raises(ValueError, match="micro-batch would be empty"):
        PipelineConfig(batch_size=4, micro_batches=8)
    with pytest.raises(ValueError, match="unsupported bits"):
        PipelineConfig(mode="acsgd", bits=3)
    with pytest.raises(ValueError, match="unsupported bits"):
        PipelineConfig(grad_bits=5)
    with pytest.raises(ValueError, match="bandwidth"):
        PipelineConfig(bandwidths=("quick",))


def _wire_cases() -> list:
    """Encodings of every kind a link carries: metadata in float16 and float32, odd sizes, 1 to 6 dims."""
    g = torch.Generator().manual_seed(0)
    return [
        UniformCodec(2, 128, "stochastic", 1).encode(torch.randn(3, 5, 7, generator=g)),  # short last group
        UniformCodec(4, 64, "nearest").encode(torch.randn(2, 1, 2, 1, 3, 11, generator=g) * 1e6),  # 6-D
        UniformCodec(8, 32).encode(torch.linspace(0, 1, 33)),  # float16 metadata
        UniformCodec(1, 16).encode(torch.randn(40, generator=g) * 1e-9),  # tiny ranges need float32
        raw_packed(torch.randn(4, 9, generator=g)),
    ]


def test_the_wire_carries_the_codecs_byte_layout():
    for p in _wire_cases()[:4]:
        buf = to_bytes(p)
        assert buf.dtype == torch.uint8 and buf.numel() == p.nbytes
        assert buf.numel() == quant_nbytes(p.numel, p.info["bits"], p.info["group_size"], p.payload["min"].dtype)
        back = from_bytes(buf, p.shape, p.info["bits"], p.info["group_size"], p.payload["min"].dtype)
        assert back.info == p.info and back.shape == p.shape
        for k in ("codes", "min", "scale"):
            assert back.payload[k].dtype == p.payload[k].dtype and torch.equal(back.payload[k], p.payload[k])
        codec = UniformCodec(p.info["bits"], p.info["group_size"])
        assert torch.equal(codec.decode(back), codec.decode(p))
    assert {p.payload["min"].dtype for p in _wire_cases()[:4]} == {torch.float16, torch.float32}
    p = _wire_cases()[0]
    with pytest.raises(ValueError, match=f"is {p.nbytes} bytes of uint8, got {p.nbytes - 1} "):
        from_bytes(to_bytes(p)[:-1], p.shape, 2, 128, p.payload["min"].dtype)
    with pytest.raises(ValueError, match="quantized encoding"):
        to_bytes(raw_packed(torch.ones(3)))


def _wire_rank(rank: int, port: int, out: str) -> int | None:
    """Rank 0 sends every case, rank 1 receives them (and saves their decoded values in ``out``)."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        if rank == 0:
            counter = WireCounter()
            for p in _wire_cases():
                send_packed(p, 1, counter, "forward")
            dist.barrier()
            return counter.end_step()["forward"]
        got = [recv_packed(0, "uniform") for _ in _wire_cases()]
        torch.save([UniformCodec().decode(p) for p in got], out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_messages_cross_a_real_link_bit_exact_with_header_and_codes_counted(tmp_path):
    import torch.multiprocessing as mp

    from lowbit.distributed.launch import free_port

    out, port = str(tmp_path / "received.pt"), free_port()
    receiver = mp.get_context("spawn").Process(target=_wire_rank, args=(1, port, out))
    receiver.start()
    try:
        sent = _wire_rank(0, port, out)  # this process is rank 0
    finally:
        receiver.join(60)
    assert receiver.exitcode == 0
    cases, decoded = _wire_cases(), torch.load(out, weights_only=True)
    for p, d in zip(cases, decoded, strict=True):
        want = p.payload["data"] if p.info["mode"] == "raw" else UniformCodec(p.info["bits"], p.info["group_size"]).decode(p)
        assert d.shape == p.shape and torch.equal(d, want)
    assert sent == sum(HEADER_LEN * 8 + p.nbytes for p in cases)  # the header and the codec's bytes, nothing else


# --- real process groups on loopback (gloo) ----------------------------------------------------

def test_fp32_pipeline_matches_single_process_training_and_counts_bytes_exactly():
    task, c = small_task(), cfg(max_steps=6)
    res = spawn_local(task, c)
    ref = train_single(task, c)
    assert res["losses"] == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert ref[-1] < ref[0]
    header = HEADER_LEN * 8
    per_direction = c.micro_batches * header + c.batch_size * BLOCK * DIM * 4  # every micro-batch: header + fp32
    assert res["bytes_per_step"][0] == {"forward": per_direction, "backward": per_direction, "dp": 0}


def test_acsgd_both_ends_keep_identical_references_and_send_few_bytes(tmp_path):
    task = small_task()
    c = cfg(mode="acsgd", bits=2, grad_bits=4, epochs=2, memory="disk", memory_dir=str(tmp_path))
    res = spawn_local(task, c)
    sums = res["memory_checksums"]
    assert sums[0]["fwd_out"] == sums[1]["fwd_in"] != 0
    assert res["warmup_steps"] == task.n_examples // c.batch_size
    fp32 = c.batch_size * BLOCK * DIM * 4
    assert res["bytes_per_step"][0]["forward"] > fp32  # warm-up epoch: fp32
    assert res["steady_bytes_per_step"]["forward"] < fp32 / 8  # then 2-bit changes
    assert res["steady_bytes_per_step"]["backward"] < fp32 / 5  # 4-bit gradients
    assert all(torch.isfinite(torch.tensor(res["losses"])))


@pytest.mark.slow  # long end-to-end run: CI's `pytest -m slow` line
def test_checkpoint_resume_continues_exactly(tmp_path):
    task = small_task()
    kw = dict(mode="acsgd", bits=4, grad_bits=4, epochs=2, warmup_epochs=1, checkpoint_dir=str(tmp_path / "ck"),
              checkpoint_every=4)
    straight = spawn_local(task, cfg(**{**kw, "checkpoint_dir": str(tmp_path / "other")}))
    spawn_local(task, cfg(**kw, max_steps=10))  # stops after step 10, last checkpoint at step 8
    resumed = spawn_local(task, cfg(**kw, resume=True))
    assert resumed["losses"] == straight["losses"]
    assert resumed["bytes_per_step"] == straight["bytes_per_step"]


def test_data_parallel_replicas_with_compressed_gradients_stay_identical():
    task = small_task()
    res = spawn_local(task, cfg(replicas=2, mode="acsgd", bits=4, grad_bits=4, dp_bits=4, epochs=2, micro_batches=2))
    p = res["param_checksums"]
    assert p[0] == p[2] and p[1] == p[3]  # stage 0 replicas, stage 1 replicas
    assert res["steady_bytes_per_step"]["dp"] > 0
    assert res["losses"][-1] < res["losses"][0]


class FailingTask(CharLMTask):
    """Stage 1 raises (or its process dies) on the third forward call."""

    def __init__(self, how: str):
        super().__init__(n_examples=128, block=BLOCK, dim=DIM, depth=2, heads=2)
        self.how = how

    def layers(self):
        return [*super().layers()[:-1], _Fails(super().layers()[-1], self.how)]


class _Fails(nn.Module):
    def __init__(self, inner, how):
        super().__init__()
        self.inner, self.how, self.calls = inner, how, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            if self.how == "die":
                os._exit(3)
            raise ValueError("injected failure")
        return self.inner(x)


@pytest.mark.parametrize("how", ["raise", "die"])
def test_a_failing_stage_ends_every_rank_with_a_clear_error(how):
    with pytest.raises(PipelineError) as info:
        spawn_local(FailingTask(how), cfg(max_steps=4, timeout_s=20), deadline_s=60)
    text = str(info.value)
    assert "rank 0 (stage 0) lost contact" in text
    assert ("ValueError: injected failure" in text) if how == "raise" else ("rank 1 exited with code 3" in text)


# --- one rank in this process (a 1-stage pipeline on a 1-rank gloo group): fast checks ---------

def one_rank(task, c):
    from lowbit.distributed.launch import free_port, run_rank

    return run_rank(task, c, 0, 1, f"tcp://127.0.0.1:{free_port()}", backend="gloo")


def test_resume_needs_a_checkpoint_and_refuses_pickled_objects(tmp_path):
    from lowbit.checkpoints import CheckpointError

    task = CharLMTask(n_examples=32, block=BLOCK, dim=DIM, depth=2, heads=2)
    kw = dict(stages=1, batch_size=16, micro_batches=2, threads=None, mode="acsgd", checkpoint_dir=str(tmp_path))
    with pytest.raises(PipelineError, match="resume: rank 0 has no checkpoint"):
        one_rank(task, cfg(**kw, resume=True))  # an empty folder is an error, not a fresh start
    with pytest.raises(ValueError, match="resume needs checkpoint_dir"):
        cfg(stages=1, resume=True)
    first = one_rank(task, cfg(**kw, checkpoint_every=1, max_steps=1))
    resumed = one_rank(task, cfg(**kw, resume=True, max_steps=2))  # weights_only loading of what lowbit saved
    assert resumed["losses"][0] == first["losses"][0] and len(resumed["losses"]) == 2
    state = torch.load(tmp_path / "rank0.pt", weights_only=True)
    torch.save({**state, "extra": _NotATensor()}, tmp_path / "rank0.pt")
    with pytest.raises(CheckpointError, match=r"refused to load: it holds a pickled Python object \(.*_NotATensor\)"):
        one_rank(task, cfg(**kw, resume=True, max_steps=2))


class _NotATensor:
    pass


def test_warm_up_and_steady_phases_are_reported_apart():
    task = CharLMTask(n_examples=32, block=BLOCK, dim=DIM, depth=2, heads=2)  # 2 steps per epoch
    c = dict(stages=1, batch_size=16, micro_batches=2, threads=None, mode="acsgd", epochs=2, warmup_epochs=1)
    warm_only = one_rank(task, cfg(**c, max_steps=2))
    assert warm_only["phases"]["warmup"]["steps"] == 2 and warm_only["phases"]["steady"] is None
    assert warm_only["steady_bytes_per_step"] is None and warm_only["simulated_step_time_s"] == {}
    both = one_rank(task, cfg(**c, max_steps=3))
    assert both["phases"]["warmup"]["steps"] == 2 and both["phases"]["steady"]["steps"] == 1
    assert both["steady_bytes_per_step"] == both["phases"]["steady"]["bytes_per_step"]
    assert set(both["simulated_step_time_s"]) == {"100Mbps", "1Gbps"}


def test_local_ranks_share_the_cores_by_default():
    from lowbit.distributed.launch import local_threads

    c = cfg(threads=None, replicas=2, micro_batches=2)
    assert local_threads(c, c.world_size).threads == max(1, (os.cpu_count() or 1) // 4)
    assert local_threads(cfg(threads=3), 2).threads == 3  # an explicit setting stays
    assert c.threads is None  # the caller's config is not changed
