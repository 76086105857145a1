"""The compute worker: one thread that runs every request's model compute, batching steps.

Used by the peer's handlers (`swarm.peer.handler`): they await results and never block the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from swarm import trace
from swarm.peer.backend import SpanBackend, StepItem
from swarm.threads import pin_team

logger = logging.getLogger(__name__)

MAX_BATCH_SESSIONS = 32  # most sessions whose steps run in one batch


@dataclass
class _Task:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    fn: Callable[[], Any] | None = None  # a one-off call (forward, backward)
    step: StepItem | None = None  # an inference step, batchable with others
    cancelled: bool = False  # its caller gave up (timeout, stream closed): never run it

    def batch_key(self) -> tuple | None:
        if self.step is None:
            return None
        s, x = self.step.session, self.step.hidden
        return (id(s.backend), s.first, s.last, x.shape[1], x.dtype, s.adapter_key)


class _Turns:
    """Tasks queued per client; clients take turns (round-robin), each in FIFO order."""

    def __init__(self):
        self.queues: dict[Hashable, deque[_Task]] = {}  # in turn order: first goes next

    def __bool__(self) -> bool:
        return bool(self.queues)

    def append(self, client: Hashable, task: _Task) -> None:
        self.queues.setdefault(client, deque()).append(task)

    def drop_cancelled(self) -> int:
        dropped = 0
        for client in list(self.queues):
            q = self.queues[client]
            kept = deque(t for t in q if not t.cancelled)
            dropped += len(q) - len(kept)
            if kept:
                self.queues[client] = kept
            else:
                del self.queues[client]
        return dropped

    def pop_next(self) -> _Task:
        """The next client's oldest task; that client goes to the back of the turn."""
        client = next(iter(self.queues))
        q = self.queues.pop(client)
        task = q.popleft()
        if q:
            self.queues[client] = q
        return task

    def take_batch(self) -> list[_Task]:
        """The next client's oldest step and up to MAX_BATCH_SESSIONS - 1 more of its shape,
        taken one per client in turn, so a client with many sessions cannot fill the batch."""
        first = self.pop_next()
        batch, key = [first], first.batch_key()
        progress = True
        while progress and len(batch) < MAX_BATCH_SESSIONS:
            progress = False
            for client, q in list(self.queues.items()):
                match = next((t for t in q if t.batch_key() == key), None)
                if match is None:
                    continue
                q.remove(match)
                if not q:
                    del self.queues[client]
                batch.append(match)
                progress = True
                if len(batch) == MAX_BATCH_SESSIONS:
                    break
        return batch

    def drain(self) -> list[_Task]:
        tasks = [t for q in self.queues.values() for t in q]
        self.queues.clear()
        return tasks


class ComputeWorker:
    """Runs tasks on one thread: step batches and calls alternate when both wait (neither
    starves; steps run at once when no call waits), clients take turns within each kind, and
    tasks whose caller gave up are dropped unrun."""

    def __init__(self, name: str = "swarm-compute", pin: bool = False):
        self.pin = pin  # pin the thread's OpenMP team one thread per CPU (swarm.threads.pin_team)
        self._steps = _Turns()
        self._calls = _Turns()
        self._cv = threading.Condition()
        self._stopped = False
        self._last_was_step = False
        self.batches_run = 0  # how many inference batches ran (tests, benchmarks)
        self.max_batch_seen = 0
        self.calls_run = 0
        self.dropped = 0  # tasks dropped because their caller had gone
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def call(self, fn: Callable[[], Any], client: Hashable = None) -> Any:
        """Run `fn()` on the worker thread and return its result (or raise its exception).

        client: whose request this is (the caller's peer id); clients take turns.
        """
        task = _Task(asyncio.get_running_loop(), None, fn=fn)
        return await self._submit(task, self._calls, client)

    async def step(self, item: StepItem, client: Hashable = None) -> Any:
        """Run one inference step, batched with other sessions' steps of the same shape."""
        task = _Task(asyncio.get_running_loop(), None, step=item)
        return await self._submit(task, self._steps, client)

    async def _submit(self, task: _Task, turns: _Turns, client: Hashable) -> Any:
        task.future = task.loop.create_future()
        with self._cv:
            if self._stopped:
                raise RuntimeError("the compute worker has stopped")
            turns.append(client, task)
            self._cv.notify()
        try:
            return await task.future
        except asyncio.CancelledError:
            task.cancelled = True  # read by the worker thread: a plain flag, set once
            raise

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _take(self) -> list[_Task] | None:
        with self._cv:
            while True:
                while not self._steps and not self._calls and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    return None
                dropped = self._steps.drop_cancelled() + self._calls.drop_cancelled()
                if dropped:
                    self.dropped += dropped
                    logger.info("dropped %d queued task(s) whose callers had gone", dropped)
                if self._steps or self._calls:
                    break
            # Alternate when both kinds wait, so neither steps nor calls can starve the other.
            use_steps = bool(self._steps) and not (self._calls and self._last_was_step)
            self._last_was_step = use_steps
            if use_steps:
                return self._steps.take_batch()
            return [self._calls.pop_next()]

    def _run(self) -> None:
        if self.pin and (cpus := pin_team()):
            logger.info("compute threads pinned to CPUs %s", cpus)
        while (batch := self._take()) is not None:
            try:
                if batch[0].step is not None:
                    backend: SpanBackend = batch[0].step.session.backend
                    trace.event("compute_start")
                    results = backend.inference_step([t.step for t in batch])
                    trace.event("compute_end")
                    self.batches_run += 1
                    self.max_batch_seen = max(self.max_batch_seen, len(batch))
                else:
                    results = [batch[0].fn()]
                    self.calls_run += 1
            except BaseException as e:  # handed to the awaiting handler, which reports it
                if len(batch) > 1:
                    logger.warning("batched step failed (%s); retrying one by one", e)
                    self._run_singly(batch)
                    continue
                for task in batch:
                    _reply(task, None, e)
                continue
            # Replies outside the try: a failed reply must not re-run (or re-fail) the compute.
            for task, result in zip(batch, results, strict=True):
                _reply(task, result, None)
        with self._cv:
            leftover = self._steps.drain() + self._calls.drain()
        for task in leftover:
            _reply(task, None, RuntimeError("the compute worker has stopped"))

    def _run_singly(self, batch: list[_Task]) -> None:
        for task in batch:
            try:
                (result,) = task.step.session.backend.inference_step([task.step])
            except BaseException as e:
                _reply(task, None, e)
            else:
                _reply(task, result, None)


def _reply(task: _Task, result: Any, error: BaseException | None) -> None:
    """Hand a result to the task's event loop; never raises, so the compute thread lives on."""
    try:
        task.loop.call_soon_threadsafe(_set_result, task.future, result, error)
    except RuntimeError as e:  # the loop closed while the task was queued: nobody is waiting
        logger.debug("dropping a compute result: its event loop is gone (%s)", e)


def _set_result(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting handler was cancelled (timeout, client gone)
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except (RuntimeError, asyncio.InvalidStateError) as e:  # cancelled or its loop closing
        logger.debug("dropping a compute result: %s", e)
