"""The span backend, compute worker and cache budget, in one process (no network).

Tests swarm/peer/backend.py, swarm/peer/worker.py and swarm/peer/memory.py.
"""

import asyncio
import threading
import time

import pytest
import torch

from swarm.errors import CacheFull
from swarm.model.loading import load_span
from swarm.peer.backend import Session, SpanBackend, StepItem
from swarm.peer.memory import CacheBudget
from swarm.peer.worker import ComputeWorker


@pytest.fixture(scope="module")
def backend(tiny_model_dir) -> SpanBackend:
    return SpanBackend(load_span(tiny_model_dir, 1, 5, progress=False))


def _session(backend, sid, first=1, last=5, batch=1, max_length=16) -> Session:
    caches = backend.new_caches(batch, max_length, first, last)
    return Session(sid, first, last, max_length, batch, caches, backend)


def test_backward_matches_autograd(backend):
    x = torch.randn(2, 3, 64)
    g = torch.randn(2, 3, 64)
    grad = backend.backward(x, g, 2, 4)
    xr = x.clone().requires_grad_(True)
    with torch.enable_grad():
        backend.span(xr, 0, None, 2, 4).backward(g)
    torch.testing.assert_close(grad, xr.grad)


def test_batched_steps_equal_sequential_ones(backend):
    torch.manual_seed(0)
    sessions = [_session(backend, f"s{i}", batch=1 + i % 2) for i in range(3)]
    refs = [backend.span.new_caches(s.batch_size, 16) for s in sessions]
    # Sessions at different positions: prefill lengths 1, 2, 3.
    for s, caches in zip(sessions, refs, strict=False):
        n = int(s.session_id[1:]) + 1
        x = torch.randn(s.batch_size, n, 64)
        backend.inference_step([StepItem(s, x, 0)])
        backend.span(x, 0, caches)
        s.length = n
    xs = [torch.randn(s.batch_size, 1, 64) for s in sessions]
    outs = backend.inference_step(
        [StepItem(s, x, s.length) for s, x in zip(sessions, xs, strict=False)]
    )
    for s, x, out, caches in zip(sessions, xs, outs, refs, strict=False):
        torch.testing.assert_close(out, backend.span(x, s.length, caches), atol=1e-5, rtol=1e-5)


async def test_worker_batches_concurrent_steps(backend):
    worker = ComputeWorker()
    try:
        sessions = [_session(backend, f"s{i}") for i in range(4)]
        xs = [torch.randn(1, 1, 64) for _ in sessions]
        hold = asyncio.ensure_future(worker.call(lambda: time.sleep(0.3)))
        await asyncio.sleep(0.05)  # the worker is busy: the steps below queue up together
        outs = await asyncio.gather(
            *(worker.step(StepItem(s, x, 0)) for s, x in zip(sessions, xs, strict=False))
        )
        await hold
        assert worker.max_batch_seen == 4
        for x, out in zip(xs, outs, strict=False):
            torch.testing.assert_close(out, backend.forward(x, 1, 5), atol=1e-5, rtol=1e-5)
        with pytest.raises(ZeroDivisionError):
            await worker.call(lambda: 1 / 0)
        assert await worker.call(lambda: 7) == 7  # still serving after a failure
    finally:
        worker.stop()


def test_worker_survives_a_closed_event_loop():
    """A result for a loop closed while its task ran is dropped, queued ones are never run;
    the thread lives on."""
    worker = ComputeWorker()
    gate = threading.Event()
    ran = []
    try:
        loop = asyncio.new_event_loop()

        async def submit_and_leave():
            busy = asyncio.ensure_future(worker.call(lambda: gate.wait(30)))
            queued = [asyncio.ensure_future(worker.call(lambda i=i: ran.append(i))) for i in (1, 2)]
            failing = asyncio.ensure_future(worker.call(lambda: 1 / 0))
            await asyncio.sleep(0.1)  # all four are in the worker's queue
            for task in (busy, *queued, failing):
                task.cancel()
            await asyncio.gather(busy, *queued, failing, return_exceptions=True)

        loop.run_until_complete(submit_and_leave())
        loop.close()
        gate.set()  # the worker now replies (results and an error) to a closed loop

        async def still_serving():
            return await asyncio.wait_for(worker.call(lambda: 7), 10)

        assert asyncio.run(still_serving()) == 7
        assert ran == [] and worker.dropped == 3  # queued calls of a gone caller never run
        assert worker._thread.is_alive()
    finally:
        gate.set()
        worker.stop()


def test_cache_budget_refuses_at_once():
    budget = CacheBudget(100)
    budget.allocate(60)
    with pytest.raises(CacheFull, match="40 of 100"):
        budget.allocate(50)
    budget.free(60)
    assert budget.left == 100


def test_backward_of_int8_blocks_goes_through_their_weights():
    import copy

    from swarm.model.config import ModelConfig
    from swarm.model.int8 import quantize_blocks
    from swarm.model.llama import BlockSpan

    cfg = ModelConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )
    torch.manual_seed(0)
    span = BlockSpan(cfg, 0, 2)
    x, g = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    want = SpanBackend(copy.deepcopy(span)).backward(x, g, 0, 2)
    got = SpanBackend(quantize_blocks(span)).backward(x, g, 0, 2)
    # Without the hooks only the residual path would carry gradient (error near 100%).
    assert float((got - want).norm() / want.norm()) < 0.05
