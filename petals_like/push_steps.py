"""Push mode of an inference session: every peer pushes its step's output to the next hop,
and a lost hop is replaced while the hops after it keep their sessions.

Mixed into petals_like.session.RemoteInferenceSession, whose state and relay path it uses.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch

from petals_like.probing import is_peer_failure

# Steps larger than this go through the client (relay): a push is one unary message.
PUSH_MAX_BYTES = 1 << 20


class PushSteps:
    """The push-mode steps of RemoteInferenceSession (its `_hops`, `router`, relay path)."""

    def _can_push(self, hidden: torch.Tensor, pos: int) -> bool:
        """Push mode (server to server) when asked, every hop's peer offers it, and no hop has
        anything to replay (a replay goes through the client) or previous hop to learn."""
        config = getattr(self.router, "config", None)
        if not getattr(config, "push", False) or len(self._hops) < 2:
            return False
        if hidden.numel() * 4 > PUSH_MAX_BYTES:
            return False
        return all(
            h.stream is not None
            and h.lost is None
            and getattr(h.stream, "supports_push", False)
            and h.length == h.cached == pos
            and not h.prev_untold
            for h in self._hops
        )

    async def _run_push(self, hidden: torch.Tensor, pos: int) -> torch.Tensor:
        """One step through every hop, each peer pushing its output to the next: a token costs
        (hops + 1) one-way delays. Every peer also answers us with its output, which we keep
        as the next hop's input (replay, verification). On a failure, the lost hop is
        re-routed and the step goes on through us from there."""
        n, end_pos = hidden.shape[1], pos + hidden.shape[1]
        hops = list(self._hops)
        encoded, seen = hops[0].stream.encode(hidden)  # once: the bytes sent are those kept
        hops[0].append(seen)  # what the peer decodes: replayed as is
        tasks, t0 = [], time.perf_counter()
        timeout = probe = 0.0
        for i, h in enumerate(hops):
            peer = h.hop.peer_id
            nxt = hops[i + 1] if i + 1 < len(hops) else None
            push_to = None if nxt is None else (str(nxt.hop.peer_id), nxt.stream.session_id)
            # A later hop waits on the earlier ones: its bounds add theirs.
            timeout += self.router.step_timeout(peer, n)
            probe += self.router.probe_after(peer, n)
            prev = str(hops[i - 1].hop.peer_id) if i else ""
            sent = None if i else encoded
            work = self._guarded_step(h, hidden, pos, timeout, probe, sent, push_to, prev)
            tasks.append(asyncio.ensure_future(work))
        pushes = [h.stream.watch_push() for h in hops]
        try:
            failed, error = await _first_failure(tasks, pushes)
            if failed:  # the hops before the lost one live: their step ends (its push fails)
                await asyncio.wait(tasks[:failed])
        except BaseException:
            _cancel(tasks)
            for h in hops:  # steps were cut short: these streams are out of step
                self._discard(h)
                h.cached = 0
            raise
        x, done = self._harvest(hops, tasks, hidden, pos, end_pos, failed)
        if failed is None:
            self.router.report_success(hops[0].hop.peer_id, time.perf_counter() - t0, n)
            self.pushed_steps += 1
            return x
        tasks[failed].cancel()
        later, kept = tasks[failed + 1 :], hops[failed + 1 :]
        if done < failed or not all(_alive(t) for t in later):
            # Hops cut short, or whose step failed too: open them afresh.
            _cancel(later)
            for h in hops[done:]:
                if h is not hops[failed]:
                    self._discard(h)
                    h.cached = 0
            failures = [await self._fail_over(failed, error, 0)]
            return await self._run_relay(x, pos, pos, done, failures)
        return await self._replace_keeping(failed, error, x, pos, later, kept, pushes[failed + 1 :])

    async def _replace_keeping(self, failed, error, x, pos, later, kept, pushes) -> torch.Tensor:
        """Re-route the lost hop `failed` through us while the hops after it keep their sessions:
        their pushed steps wait on; we push the replacement's output into the first of them.
        Only the lost span replays; the next step, through us, tells the kept hop its new
        previous hop (pushed, the new hop's push could arrive before the telling: refused)."""
        end_pos = pos + x.shape[1]
        try:
            failures = [await self._fail_over(failed, error, 0)]
            y = await self._run_relay(
                x, pos, pos, failed, failures, until=kept[0] if kept else None
            )
        except BaseException:
            self._drop(later, kept)
            raise
        if not kept:
            return y
        first = kept[0]
        try:
            if not later[0].done():  # the lost peer did not push before it went
                timeout = self.router.step_timeout(first.hop.peer_id, y.shape[1])
                await self.router.guarded(
                    first.hop.peer_id,
                    self.router.push(first.hop.peer_id, first.stream.session_id, y, pos, timeout),
                    timeout + 0.5,
                    self.router.probe_after(first.hop.peer_id, 1),
                )
                failures[-1].mark(f"pushed to ...{str(first.hop.peer_id)[-6:]}")
            first.append(y)  # its input, as the lost hop would have pushed it
            first.prev_untold = True
            lost, _ = await _first_failure(later, pushes)
        except BaseException as e:
            if not is_peer_failure(e):
                self._drop(later, kept)
                raise
            lost = 0
        out, done = self._harvest(kept, later, y, pos, end_pos, lost)
        failures[-1].kept_hops = len(kept) if lost is None else done
        if lost is None:
            self._record(failures)
            return out
        # A kept hop failed as well: it and those after it are opened afresh (and replayed).
        self._drop(later, kept[done:])
        return await self._run_relay(out, pos, pos, self._hops.index(kept[done]), failures)

    def _drop(self, tasks: list[asyncio.Future], hops: list[Any]) -> None:
        """Cut hops' pushed steps short: their streams are out of step, open them afresh."""
        _cancel(tasks)
        for h in hops:
            self._discard(h)
            h.cached = 0

    def _harvest(self, hops, tasks, x, pos, end_pos, stop):
        """Take the results of hops' pushed steps in order, up to the first unfinished one or
        `stop`: (the last output taken, how many were taken)."""
        done = 0
        for i, t in enumerate(tasks[: len(hops) if stop is None else stop]):
            if not t.done() or t.cancelled() or t.exception() is not None:
                break
            h, x, done = hops[i], t.result(), i + 1
            h.cached = end_pos
            if self.verifier is not None:
                h.keep_outputs(pos, x)
            if i + 1 < len(hops):
                hops[i + 1].append(x)
        return x, done

    async def _guarded_step(self, h, hidden, pos, timeout, probe, encoded, push_to, prev):
        """One hop's part of a pushed step, probing its peer if it is slow (router.guarded).
        `encoded`: the first hop's input as sent; None: a later hop, whose input is pushed."""
        pushed = encoded is None
        work = h.stream.step(
            hidden,
            pos,
            timeout=timeout,
            pushed=pushed,
            push_to=push_to,
            prev_peer=prev,
            encoded=encoded,
        )
        return await self.router.guarded(h.hop.peer_id, work, timeout + 0.5, probe)


async def _first_failure(
    tasks: list[asyncio.Future], pushes: list[asyncio.Future]
) -> tuple[int | None, BaseException | None]:
    """Wait for every hop's step, or the first failure: (the lost hop's index, why).

    A hop's own error names it; a failed push from hop i names hop i + 1 (the pushing peer
    tells us at once, where the lost peer's stream may just hang).
    """
    while True:
        for i, t in enumerate(tasks):
            if t.done() and t.exception() is not None:
                e = t.exception()
                if not is_peer_failure(e):
                    raise e
                return i, e
        for i, f in enumerate(pushes[:-1]):
            if f.done():
                return i + 1, f.result()
        if all(t.done() for t in tasks):
            return None, None
        waiting = [t for t in tasks if not t.done()] + [f for f in pushes[:-1] if not f.done()]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)


def _alive(task: asyncio.Future) -> bool:
    """Whether a hop's pushed step still runs or went through."""
    return not task.done() or (not task.cancelled() and task.exception() is None)


def _cancel(tasks: list[asyncio.Future]) -> None:
    for t in tasks:
        t.cancel()
