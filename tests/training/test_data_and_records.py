"""Data windows, microbatch splits, DHT record parsing, stage chains and wire byte counts.

Pure functions of swarm.training used by the trainer and the stages.
"""

import pytest
import torch

from swarm.errors import BadRequest, NoRoute
from swarm.peer.records import SpanRecord
from swarm.training.data import ByteTokenizer, TokenWindows, split_microbatches
from swarm.training.optim8bit import AdamConfig
from swarm.training.progress import (
    ReplicaProgress,
    TrainerRecord,
    check_run_id,
    run_plan,
    stage_prefix,
)
from swarm.training.rebalance import choose_stages
from swarm.training.trainer import TrainerConfig, payload_bytes


def test_windows_are_deterministic_and_in_vocab(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello swarm " * 50)
    w = TokenWindows.from_files(ByteTokenizer(128), [f], seq_len=16, vocab_size=128)
    a, b = w.batches(4, seed=3), w.batches(4, seed=3)
    for _ in range(3):
        x, y = next(a), next(b)
        assert x.shape == (4, 16) and torch.equal(x, y) and int(x.max()) < 128
    with pytest.raises(BadRequest):
        TokenWindows([1, 2, 3], seq_len=16)
    with pytest.raises(BadRequest):
        TokenWindows.from_files(ByteTokenizer(128), [tmp_path / "missing.txt"], 16)


def test_split_microbatches_keeps_every_row():
    batch = torch.arange(7 * 3).view(7, 3)
    parts = split_microbatches(batch, 3)
    assert [p.shape[0] for p in parts] == [3, 2, 2]
    assert torch.equal(torch.cat(parts), batch)
    assert len(split_microbatches(batch, 20)) == 7


def test_records_round_trip_and_reject_bad_values():
    rec = ReplicaProgress("peerA", epoch=3, samples=5, throughput=2.5, queue=1)
    assert ReplicaProgress.from_wire("peerA", rec.to_wire()) == rec
    for bad in (
        None,
        [1, -1, 0, 0.0, 0],
        [1, 2, 3],
        ["1", 2, 3, 4.0, 0],
        [1, 2, 3, float("nan"), 0],
    ):
        with pytest.raises(BadRequest):
            ReplicaProgress.from_wire("peerA", bad)
    busy = ReplicaProgress("peerA", epoch=3, samples=2, averaging=3)
    assert ReplicaProgress.from_wire("peerA", busy.to_wire()) == busy
    with pytest.raises(BadRequest):
        ReplicaProgress.from_wire("peerA", [1, 3, 2, 0.0, 0, -2])
    # Version-1 records (five fields) still parse: no round in flight.
    assert ReplicaProgress.from_wire("peerA", [1, 3, 5, 2.5, 1]).averaging == -1
    t = TrainerRecord("t1", 8, AdamConfig(lr=0.01, warmup_steps=3), target_batch=32)
    assert TrainerRecord.from_wire("t1", t.to_wire()) == t
    old = TrainerRecord.from_wire("t1", [1, 8, [0.01, 0.9, 0.999, 1e-8, 0.0]])
    assert old.sync and old.average_every == 1 and old.adam.warmup_steps == 0
    for bad in (
        [1, 0, AdamConfig().to_wire()],
        [1, 8, AdamConfig().to_wire(), -1],
        [1, 8, AdamConfig().to_wire(), 0, "yes"],
        [1, 8, AdamConfig().to_wire(), 0, False, 0],
        [1, 8, AdamConfig().to_wire(), 0, False, 1, float("inf")],
    ):
        with pytest.raises(BadRequest):
            TrainerRecord.from_wire("t1", bad)


def test_run_plan_of_the_live_trainers():
    adam = AdamConfig()
    assert run_plan([]) is None
    a, b = TrainerRecord("a", 8, adam), TrainerRecord("b", 4, adam, target_batch=32)
    assert run_plan([a]).target_batch == 8  # no target asked: the sum of batch sizes
    assert run_plan([a, b]).target_batch == 32
    lock = run_plan([TrainerRecord("a", 8, adam, target_batch=99, sync=True), b])
    assert lock.sync and lock.target_batch == 12  # lock-step: every trainer's batch, each step


def test_warmup_raises_the_learning_rate_linearly():
    c = AdamConfig(lr=1e-3, warmup_steps=4)
    assert [c.lr_at(s) for s in (1, 2, 4, 9)] == [2.5e-4, 5e-4, 1e-3, 1e-3]
    assert AdamConfig(lr=1e-3).lr_at(1) == 1e-3


def test_trainer_settings_fail_early_with_a_clear_message(tmp_path):
    data = tmp_path / "t.txt"
    data.write_text("hello")
    with pytest.raises(BadRequest, match="--initial-peers"):
        TrainerConfig(data=[str(data)]).validate()
    with pytest.raises(BadRequest, match="--average-every"):
        TrainerConfig(data=[str(data)], initial_peers=["x"], sync=True, average_every=4).validate()
    with pytest.raises(BadRequest, match="--wiring"):
        TrainerConfig(data=[str(data)], initial_peers=["x"], wiring="ring").validate()


def test_run_ids_cannot_break_averager_prefixes():
    assert "." not in stage_prefix("run-1", 0, 3)
    for bad in ("a.b", "", "x" * 65, "a b"):
        with pytest.raises(BadRequest):
            check_run_id(bad)


def test_choose_stages_prefers_replicated_spans():
    recs = [
        SpanRecord("a", 0, 3),
        SpanRecord("b", 0, 3),
        SpanRecord("c", 0, 2),
        SpanRecord("d", 3, 6),
        SpanRecord("e", 3, 6, state="offline"),
        SpanRecord("f", 3, 6, state="joining"),
    ]
    assert choose_stages(recs, 6) == [((0, 3), ["a", "b"]), ((3, 6), ["d"])]
    with pytest.raises(NoRoute):
        choose_stages(recs[:3], 6)
    # A joining peer has chosen its stage: placing a new training peer counts it.
    both = ("online", "joining")
    assert choose_stages(recs, 6, both) == [((0, 3), ["a", "b"]), ((3, 6), ["d", "f"])]
    assert choose_stages([*recs[:3], recs[5]], 6, both) == [((0, 3), ["a", "b"]), ((3, 6), ["f"])]


def test_payload_bytes_of_codecs():
    x = torch.randn(2, 16, 64)
    assert payload_bytes(x, "none") == x.numel() * 4
    int8 = payload_bytes(x, "int8-block64")
    assert int8 == x.numel() + 2 * (x.numel() // 64)
    assert int8 < payload_bytes(x, "none") / 3.5
