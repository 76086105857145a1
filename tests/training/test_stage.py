"""Training stages in one process with real hivemind DHTs: group steps, averaging, download.

Two replicas of one span step together and match single-process AdamW; a third downloads state.
"""

import copy
import time

import pytest
import torch

from swarm.errors import BadRequest
from swarm.model import BlockSpan
from swarm.training.optim8bit import AdamConfig, AdamW
from swarm.training.progress import TrainerRecord, fetch_progress, store_trainer
from swarm.training.stage import SHORT_GRACE_S
from tests.conftest import wait_for
from tests.training.conftest import STAGE_MODEL, make_stage


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sync", [True, False], ids=["lock-step", "asynchronous"])
def test_two_replicas_average_and_match_single_process(dhts, sync):
    torch.manual_seed(0)
    span = BlockSpan(STAGE_MODEL, 0, 2)
    adam = AdamConfig(lr=1e-2)
    store_trainer(
        dhts[3],
        "t1",
        TrainerRecord(dhts[3].peer_id.to_base58(), 6, adam, sync=sync),
        ttl=60,
        timeout=5,
    )
    a, b = make_stage(dhts[0], span), make_stage(dhts[1], span)
    try:
        assert a.join() is False
        assert b.join() is True  # a is alive: b downloads its (identical) state
        ref = copy.deepcopy(span).float()
        ref_opt = AdamW(list(ref.parameters()), adam)
        for step in range(2):
            x = torch.randn(6, 5, 32)
            g = torch.randn(6, 5, 32)
            # Replica a gets 4 samples, b gets 2: weighting by samples must give the batch mean.
            gin_a = a.backward(x[:4], g[:4])
            gin_b = b.backward(x[4:], g[4:])
            xr = x.clone().requires_grad_(True)
            ref.zero_grad()
            torch.autograd.backward(ref(xr), g)
            assert torch.allclose(torch.cat([gin_a, gin_b]), xr.grad, atol=1e-5)
            for p in ref.parameters():
                p.grad /= 6
            ref_opt.step()
            wait_for(lambda s=step: a.epoch > s and b.epoch > s, 30, what=f"epoch {step + 1}")
        va, vb = a.parameters_vector(), b.parameters_vector()
        vr = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
        assert (va - vb).abs().max() < 1e-6
        assert (va - vr).abs().max() < 1e-5
        assert a.steps_averaged == 2 and b.steps_averaged == 2

        # A third replica joins and downloads the current parameters, not the checkpoint's.
        c = make_stage(dhts[2], span)
        try:
            assert c.join() is True
            assert c.epoch == 2
            assert (c.parameters_vector() - va).abs().max() < 1e-6
            assert c.optimizer.step_count == 2
        finally:
            c.shutdown()
    finally:
        a.shutdown()
        b.shutdown()


@pytest.mark.timeout(60)
def test_a_replica_in_a_lock_step_round_still_counts_its_samples(dhts):
    """A replica that reads its partner's record mid-round sees the full batch and joins.

    Its record said 0 samples once the round began (the heartbeat republished it): the partner
    saw the batch short and never joined; the round failed after its timeout (10 s a step).
    """
    span = BlockSpan(STAGE_MODEL, 0, 2)
    store_trainer(
        dhts[3],
        "t1",
        TrainerRecord(dhts[3].peer_id.to_base58(), 6, AdamConfig(lr=1e-2), sync=True),
        ttl=60,
        timeout=5,
    )
    a = make_stage(dhts[0], span, averaging_timeout=30.0)
    b = make_stage(dhts[1], span, poll_period=60.0)  # b looks only when woken below
    try:
        a.join()
        b.join()
        a.backward(torch.randn(6, 5, 32), torch.randn(6, 5, 32))
        wait_for(lambda: a._round_samples == 6, 10, what="a in its round")
        time.sleep(2.0)  # past a heartbeat (progress_ttl / 4), which republished 0 samples
        seen = fetch_progress(dhts[2], "t1", (0, 2), timeout=5)
        assert seen is not None and seen[a.peer_id].samples == 6 and seen[a.peer_id].epoch == 0
        b._wake.set()
        wait_for(lambda: a.epoch == 1 and b.epoch == 1, 25, what="both replicas stepping")
        assert a.steps_averaged == 1 and b.steps_averaged == 1
        assert (a.parameters_vector() - b.parameters_vector()).abs().max() < 1e-6
    finally:
        a.shutdown()
        b.shutdown()


@pytest.mark.timeout(120)
def test_a_lock_step_round_short_of_the_batch_waits_for_the_resend(dhts):
    """A replica died holding 2 of the batch's 6 samples; its record still counts them.

    The survivor (4 samples) and a joiner (none) form a round: it holds 4 samples, and stepping
    on it parted the run from single-process training (a CI run's loss gap 0.15). The round is
    retried until the trainer's resend of the lost 2 samples reaches the joiner.
    """
    torch.manual_seed(0)
    span = BlockSpan(STAGE_MODEL, 0, 2)
    adam = AdamConfig(lr=1e-2)
    trainer = TrainerRecord(dhts[3].peer_id.to_base58(), 6, adam, sync=True)
    store_trainer(dhts[3], "t1", trainer, ttl=60, timeout=5)
    x, g = torch.randn(6, 5, 32), torch.randn(6, 5, 32)
    ref = copy.deepcopy(span).float()
    torch.autograd.backward(ref(x), g)
    for p in ref.parameters():
        p.grad /= 6
    AdamW(list(ref.parameters()), adam).step()
    # Records outlive the test's waits: the dead replica is counted throughout.
    a = make_stage(dhts[0], span, progress_ttl=40.0)
    dead = make_stage(dhts[1], span, progress_ttl=40.0)
    b = None
    try:
        a.join()
        dead.join()
        dead.backward(x[4:], g[4:])
        wait_for(
            lambda: (
                (fetch_progress(dhts[3], "t1", (0, 2), timeout=5) or {}).get(dead.peer_id)
                and fetch_progress(dhts[3], "t1", (0, 2), timeout=5)[dead.peer_id].samples == 2
            ),
            10,
            what="the doomed replica's 2 samples published",
        )
        # It dies: its threads and averager stop, its record stays (no retraction).
        dead._stop.set()
        dead._wake.set()
        dead._thread.join(5)
        dead._beat.join(5)
        dead.averager.shutdown()
        b = make_stage(dhts[2], span, progress_ttl=40.0)
        b.join()
        a.backward(x[:4], g[:4])
        wait_for(lambda: a._retrying is not None, 40, what="a round short of the batch")
        assert a.epoch == 0 and b.epoch == 0 and a.samples == 4
        b.backward(x[4:], g[4:])  # the trainer resends what the dead replica held
        wait_for(lambda: a.epoch == 1 and b.epoch == 1, 40, what="both replicas stepping")
        va, vb = a.parameters_vector(), b.parameters_vector()
        vr = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
        assert (va - vb).abs().max() < 1e-6
        assert (va - vr).abs().max() < 1e-5
    finally:
        for stage in (a, b):
            if stage is not None:
                stage.shutdown()


@pytest.mark.timeout(60)
def test_a_download_folds_in_only_the_buckets_it_overtook(dhts):
    """Asynchronous mode: a replica that downloads a newer epoch counts the buckets for steps
    now due toward the coming step; a later step's bucket stays its own. Folding it in too ran
    a replica one batch ahead of the trainers' step tags for the rest of a run."""
    span = BlockSpan(STAGE_MODEL, 0, 2)
    record = TrainerRecord(dhts[3].peer_id.to_base58(), 100, AdamConfig(), sync=False)
    store_trainer(dhts[3], "t1", record, ttl=60, timeout=5)  # a batch of 100: no step here
    a = make_stage(dhts[0], span)
    try:
        a.join()
        wait_for(lambda: a.plan is not None, 10, what="the trainer's plan read")
        x, g = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
        for i, step in enumerate([1, 2, 3]):  # the coming step (epoch 0 + 1), then two buckets
            assert a.backward_counted(x[i : i + 1], g[i : i + 1], step=step)[1] == step
        assert a.samples == 1 and sorted(a._later) == [2, 3]
        metadata, tensors = a._state_for_download()
        a._load_state({**metadata, "epoch": 1}, tensors)  # a replica one step ahead
        assert a.epoch == 1 and a.samples == 2 and sorted(a._later) == [3]
    finally:
        a.shutdown()


@pytest.mark.timeout(60)
def test_an_asynchronous_step_short_of_its_batch_goes_on_after_a_grace(dhts):
    """A coming step that stays short (counts off by a microbatch after a trainer's pause) is
    stepped on after SHORT_GRACE_S: trainers wait for that step before they send more, and the
    run stalled for good. The next step's bucket stays its own."""
    span = BlockSpan(STAGE_MODEL, 0, 2)
    record = TrainerRecord(dhts[3].peer_id.to_base58(), 6, AdamConfig(), sync=False)
    store_trainer(dhts[3], "t1", record, ttl=60, timeout=5)
    a = make_stage(dhts[0], span)
    try:
        a.join()
        wait_for(lambda: a.plan is not None, 10, what="the trainer's plan read")
        x, g = torch.randn(6, 5, 32), torch.randn(6, 5, 32)
        a.backward_counted(x[:4], g[:4], step=1)  # 4 of the first step's 6
        a.backward_counted(x[4:], g[4:], step=2)  # a part of the next one
        t0 = time.monotonic()
        wait_for(lambda: a.epoch == 1, 30, what="the short step")
        assert time.monotonic() - t0 >= SHORT_GRACE_S - 1.0
        assert a.steps_local == 1 and a.samples == 2 and not a._later
    finally:
        a.shutdown()


@pytest.mark.timeout(60)
def test_a_backward_past_its_deadline_is_not_counted(dhts):
    torch.manual_seed(0)
    a = make_stage(dhts[0], BlockSpan(STAGE_MODEL, 0, 2), run_id="t2")
    try:
        a.join()
        x, g = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
        with pytest.raises(BadRequest, match="deadline"):
            a.backward_counted(x, g, deadline=time.monotonic() - 1.0)
        assert a.samples == 0 and all(p.grad is None for p in a.params)
        _, step = a.backward_counted(x, g, deadline=time.monotonic() + 30.0)
        assert a.samples == 2 and step == a.epoch + 1  # counts toward the coming step
    finally:
        a.shutdown()


@pytest.mark.timeout(120)
def test_diloco_local_steps_then_an_outer_step_brings_replicas_together(dhts):
    torch.manual_seed(0)
    span = BlockSpan(STAGE_MODEL, 0, 2)
    record = TrainerRecord(
        dhts[3].peer_id.to_base58(),
        4,
        AdamConfig(lr=1e-2),
        average_every=2,
        outer_lr=1.0,
        outer_momentum=0.0,
    )
    store_trainer(dhts[3], "t3", record, ttl=60, timeout=5)
    a, b = make_stage(dhts[0], span, "t3"), make_stage(dhts[1], span, "t3")
    try:
        a.join()
        b.join()
        before = a.parameters_vector()
        for step in range(2):
            # Different data on each replica: local steps make them drift apart...
            a.backward(torch.randn(2, 5, 32), torch.randn(2, 5, 32))
            b.backward(torch.randn(2, 5, 32), torch.randn(2, 5, 32))
            wait_for(lambda s=step: a.epoch > s and b.epoch > s, 30, what=f"epoch {step + 1}")
        # ...until the outer step at epoch 2 averages their deltas (outer lr 1: the mean).
        wait_for(lambda: a.steps_averaged == 1 and b.steps_averaged == 1, 30, what="an outer step")
        va, vb = a.parameters_vector(), b.parameters_vector()
        assert (va - vb).abs().max() < 1e-5
        assert (va - before).abs().max() > 1e-3
        assert a.steps_local == 2
    finally:
        a.shutdown()
        b.shutdown()


@pytest.mark.timeout(60)
def test_a_stage_answers_forward_as_the_peer_handler_calls_it(dhts):
    """The handler calls every backend with (hidden, first, last, adapter, seed)."""
    torch.manual_seed(0)
    span = BlockSpan(STAGE_MODEL, 0, 2)
    a = make_stage(dhts[0], span, run_id="t3")
    try:
        x = torch.randn(2, 5, 32)
        with torch.no_grad():
            expected = span(x, 0, None)
        torch.testing.assert_close(a.forward(x, 0, 2, None, 0), expected)
        assert a.serves_adapters is False
        with pytest.raises(BadRequest, match="no adapters"):
            a.forward(x, 0, 2, object(), 0)
    finally:
        a.shutdown()
