"""The compute worker: one thread that runs every request's model compute, batching steps.

Used by the peer's handlers (`swarm.peer.handler`): they await results and never block the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from swarm.peer.backend import SpanBackend, StepItem

logger = logging.getLogger(__name__)

MAX_BATCH_SESSIONS = 32  # most sessions whose steps run in one batch


@dataclass
class _Task:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    fn: Callable[[], Any] | None = None  # a one-off call (forward, backward)
    step: StepItem | None = None  # an inference step, batchable with others

    def batch_key(self) -> tuple | None:
        if self.step is None:
            return None
        s, x = self.step.session, self.step.hidden
        return (id(s.backend), s.first, s.last, x.shape[1], x.dtype, s.adapter_key)


class ComputeWorker:
    """Runs tasks in FIFO order on one thread; inference steps go first and are batched."""

    def __init__(self, name: str = "swarm-compute"):
        self._steps: deque[_Task] = deque()
        self._calls: deque[_Task] = deque()
        self._cv = threading.Condition()
        self._stopped = False
        self.batches_run = 0  # how many inference batches ran (tests, benchmarks)
        self.max_batch_seen = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the worker thread and return its result (or raise its exception)."""
        return await self._submit(_Task(asyncio.get_running_loop(), None, fn=fn), self._calls)

    async def step(self, item: StepItem) -> Any:
        """Run one inference step, batched with other sessions' steps of the same shape."""
        return await self._submit(_Task(asyncio.get_running_loop(), None, step=item), self._steps)

    async def _submit(self, task: _Task, queue: deque) -> Any:
        task.future = task.loop.create_future()
        with self._cv:
            if self._stopped:
                raise RuntimeError("the compute worker has stopped")
            queue.append(task)
            self._cv.notify()
        return await task.future

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _take(self) -> list[_Task] | None:
        with self._cv:
            while not self._steps and not self._calls and not self._stopped:
                self._cv.wait()
            if self._stopped:
                return None
            if self._steps:
                first = self._steps.popleft()
                batch, rest, key = [first], deque(), first.batch_key()
                while self._steps:
                    task = self._steps.popleft()
                    if task.batch_key() == key and len(batch) < MAX_BATCH_SESSIONS:
                        batch.append(task)
                    else:
                        rest.append(task)
                self._steps = rest
                return batch
            return [self._calls.popleft()]

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                if batch[0].step is not None:
                    backend: SpanBackend = batch[0].step.session.backend
                    results = backend.inference_step([t.step for t in batch])
                    self.batches_run += 1
                    self.max_batch_seen = max(self.max_batch_seen, len(batch))
                else:
                    results = [batch[0].fn()]
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
            leftover = list(self._steps) + list(self._calls)
            self._steps.clear()
            self._calls.clear()
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
