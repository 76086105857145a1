"""Hostile inputs to training stages (real hivemind DHTs in one process): none may poison them.

Huge or NaN gradients, a poisoned averaging round, forged trainer records; honest runs learn.
"""

import math
import time

import pytest
import torch
import torch.nn.functional as F

from swarm.errors import BadRequest
from swarm.model import BlockSpan
from swarm.training.optim8bit import AdamConfig
from swarm.training.progress import TrainerRecord, fetch_trainers, store_trainer
from swarm.training.stage import TrainableStage
from tests.conftest import wait_for
from tests.training.conftest import STAGE_MODEL, make_stage


def finite(stage: TrainableStage) -> bool:
    return bool(torch.isfinite(stage.parameters_vector()).all())


@pytest.mark.timeout(60)
def test_huge_or_nan_gradients_are_refused_and_leave_the_stage_as_it_was(dhts):
    torch.manual_seed(0)
    store_trainer(
        dhts[3],
        "p1",
        TrainerRecord(dhts[3].peer_id.to_base58(), 2, AdamConfig(lr=1e-2)),
        ttl=60,
        timeout=5,
    )
    a = make_stage(dhts[0], BlockSpan(STAGE_MODEL, 0, 2), "p1")
    try:
        a.join()
        x = torch.randn(2, 5, 32)
        before = a.forward(x)
        for bad in (torch.full_like(x, 3e38), torch.full_like(x, 1e20), x * math.nan):
            with pytest.raises(BadRequest, match="refuses poisoned gradients"):
                a.backward_counted(x, bad)
            assert a.samples == 0 and all(p.grad is None for p in a.params)
        time.sleep(1.5)  # a counted gradient would have been stepped on by now
        assert a.epoch == 0 and a.guard.rejected == 3
        torch.testing.assert_close(a.forward(x), before, rtol=0, atol=0)
        # The peer keeps serving: an honest gradient is taken and stepped on.
        a.backward(x, torch.randn(2, 5, 32))
        wait_for(lambda: a.epoch == 1, 20, what="an honest step")
        after = a.forward(x)
        assert torch.isfinite(after).all() and (after - before).abs().max() < 1.0
    finally:
        a.shutdown()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("poison", [math.nan, 1e20], ids=["nan", "huge"])
def test_a_poisoned_averaging_contribution_leaves_honest_replicas_finite(dhts, poison):
    torch.manual_seed(0)
    span = BlockSpan(STAGE_MODEL, 0, 2)
    record = TrainerRecord(dhts[3].peer_id.to_base58(), 6, AdamConfig(lr=1e-2), sync=True)
    store_trainer(dhts[3], "p2", record, ttl=60, timeout=5)
    stages = [make_stage(d, span, "p2") for d in dhts[:3]]
    a, b, evil = stages
    try:
        for s in stages:
            s.join()
        # The hostile replica skips backward's checks: its own gradients are poison.
        with evil._lock:
            for p in evil.params:
                p.grad = torch.full_like(p, poison)
            evil.samples = 2
        a.backward(torch.randn(2, 5, 32), torch.randn(2, 5, 32))
        b.backward(torch.randn(2, 5, 32), torch.randn(2, 5, 32))
        wait_for(lambda: a.epoch >= 1 and b.epoch >= 1, 45, what="the honest replicas' step")
        assert finite(a) and finite(b)
        # hivemind averaged the poison into the round; each honest replica discarded it.
        assert a.rounds_discarded >= 1 and b.rounds_discarded >= 1
        assert a.steps_averaged == 0 and b.steps_averaged == 0
    finally:
        for s in stages:
            s.shutdown()


@pytest.mark.timeout(60)
def test_forged_trainer_records_are_ignored_and_training_goes_on(dhts):
    torch.manual_seed(0)
    honest = TrainerRecord(dhts[3].peer_id.to_base58(), 2, AdamConfig(lr=1e-2))
    store_trainer(dhts[3], "p3", honest, ttl=60, timeout=5)
    # Signed by their writer (dhts[2]) but out of bounds: refused for what they ask.
    forger = dhts[2].peer_id.to_base58()
    bad = [AdamConfig(lr=1e6), AdamConfig(lr=math.inf)]
    records = [TrainerRecord(forger, 2, adam) for adam in bad]
    for record in [*records, TrainerRecord(forger, 1 << 30, AdamConfig())]:
        store_trainer(dhts[2], "p3", record, 60, 5)
        assert [t.trainer_id for t in fetch_trainers(dhts[0], "p3", 5)] == [honest.trainer_id]
    # Under ids that sort first (a passing one would lead the plan), unsigned: not peer ids.
    store_trainer(dhts[2], "p3", TrainerRecord("a-fake", 2, AdamConfig(lr=0.5)), 60, 5)
    assert [t.trainer_id for t in fetch_trainers(dhts[0], "p3", 5)] == [honest.trainer_id]
    a = make_stage(dhts[0], BlockSpan(STAGE_MODEL, 0, 2), "p3")
    try:
        a.join()
        x = torch.randn(2, 5, 32)
        start = a.parameters_vector()
        level = a.forward(x).abs().mean()
        for step in range(3):
            a.backward(x, torch.randn(2, 5, 32))
            wait_for(lambda s=step: a.epoch > s, 20, what=f"step {step + 1}")
        assert a.optimizer.config.lr == 1e-2 and a.target_batch == 2
        moved = (a.parameters_vector() - start).abs().max()
        assert 1e-4 < moved < 0.1  # three AdamW steps of lr 1e-2, not of 1e6
        assert a.forward(x).abs().mean() < 2 * level
    finally:
        a.shutdown()


@pytest.mark.timeout(60)
def test_a_stage_caps_the_learning_rate_at_its_max_lr(dhts):
    store_trainer(
        dhts[3],
        "p4",
        TrainerRecord(dhts[3].peer_id.to_base58(), 2, AdamConfig(lr=0.5)),
        ttl=60,
        timeout=5,
    )
    a = make_stage(dhts[0], BlockSpan(STAGE_MODEL, 0, 2), "p4", max_lr=1e-3)
    try:
        a.join()
        wait_for(lambda: a.plan is not None, 10, what="the run's plan")
        assert a.optimizer.config.lr == 1e-3
    finally:
        a.shutdown()


@pytest.mark.timeout(60)
def test_a_stage_takes_the_plan_only_from_the_trainers_it_lists(dhts):
    # A signed, in-bounds record by a stranger whose id sorts first would lead the plan.
    listed, stranger = (d.peer_id.to_base58() for d in (dhts[3], dhts[2]))
    store_trainer(dhts[3], "p6", TrainerRecord(listed, 2, AdamConfig(lr=1e-3)), 60, 5)
    store_trainer(dhts[2], "p6", TrainerRecord(stranger, 4, AdamConfig(lr=0.5)), 60, 5)
    assert len(fetch_trainers(dhts[0], "p6", 5)) == 2
    span = BlockSpan(STAGE_MODEL, 0, 2)
    a = make_stage(dhts[0], span, "p6", trainers=(listed,))
    b = make_stage(dhts[1], span, "p6")  # lists nobody: both records count
    try:
        a.join()
        b.join()
        wait_for(lambda: a.plan is not None and b.plan is not None, 10, what="the plans")
        assert a.optimizer.config.lr == 1e-3 and a.target_batch == 2
        assert b.target_batch == 6  # the two trainers' batches, whoever leads
    finally:
        a.shutdown()
        b.shutdown()


@pytest.mark.timeout(90)
def test_the_loss_falls_in_a_short_honest_run_with_the_checks_on(dhts):
    torch.manual_seed(0)
    store_trainer(
        dhts[3],
        "p5",
        TrainerRecord(dhts[3].peer_id.to_base58(), 4, AdamConfig(lr=1e-2)),
        ttl=60,
        timeout=5,
    )
    a = make_stage(dhts[0], BlockSpan(STAGE_MODEL, 0, 2), "p5")
    try:
        a.join()
        x, y = torch.randn(4, 5, 32), torch.randn(4, 5, 32)
        losses = []
        for step in range(16):  # past the guard's warm-up: the ratio bound applies too
            out = a.forward(x).requires_grad_(True)
            loss = F.mse_loss(out, y)
            (grad_out,) = torch.autograd.grad(loss, out)
            losses.append(loss.item())
            # Two microbatches of different sizes, as a trainer's split sends them.
            a.backward(x[:1], grad_out[:1])
            a.backward(x[1:], grad_out[1:])
            wait_for(lambda s=step: a.epoch > s, 20, what=f"step {step + 1}")
        assert a.guard.rejected == 0
        assert losses[-1] < 0.8 * losses[0], losses
    finally:
        a.shutdown()


@pytest.mark.parametrize(
    "adam",
    [
        [0.0, 0.9, 0.999, 1e-8, 0.0],
        [1e6, 0.9, 0.999, 1e-8, 0.0],
        [math.inf, 0.9, 0.999, 1e-8, 0.0],
        [math.nan, 0.9, 0.999, 1e-8, 0.0],
        [1e-3, 1.0, 0.999, 1e-8, 0.0],
        [1e-3, 0.9, -0.1, 1e-8, 0.0],
        [1e-3, 0.9, 0.999, 0.0, 0.0],
        [1e-3, 0.9, 0.999, 2.0, 0.0],
        [1e-3, 0.9, 0.999, 1e-8, 1.5],
        [1e-3, 0.9, 0.999, 1e-8, math.nan],
    ],
)
def test_a_trainer_record_with_optimizer_settings_out_of_bounds_is_refused(adam):
    with pytest.raises(BadRequest, match="out of range"):
        TrainerRecord.from_wire("t", [1, 8, adam])


@pytest.mark.parametrize(
    "wire",
    [
        [1, 1 << 21, [1e-3, 0.9, 0.999, 1e-8, 0.0]],
        [1, 8, [1e-3, 0.9, 0.999, 1e-8, 0.0], 1 << 21],
        [1, 8, [1e-3, 0.9, 0.999, 1e-8, 0.0], 0, False, 4, 100.0, 0.9],
        [1, 8, [1e-3, 0.9, 0.999, 1e-8, 0.0], 0, False, 4, math.nan, 0.9],
        [1, 8, [1e-3, 0.9, 0.999, 1e-8, 0.0], 0, False, 4, 0.7, 1.0],
    ],
    ids=["batch", "target", "outer-lr", "outer-lr-nan", "outer-momentum"],
)
def test_a_trainer_record_with_run_settings_out_of_bounds_is_refused(wire):
    with pytest.raises(BadRequest, match="need"):
        TrainerRecord.from_wire("t", wire)
