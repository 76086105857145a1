"""Where one inference step's software microseconds go, outside compute and transport.

Run: python -m simulations.profile_hop [--iters N] [--hidden H]; times each piece of one decode
step's path (client encode, split, peer join, decode, worker handoff, reply encode, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time

import torch
from hivemind.p2p import P2P

from proto import peer_pb2
from swarm import loops
from swarm.peer import streams, wire
from swarm.peer.worker import ComputeWorker


async def _one_part(parts):
    for p in parts:
        yield p


def _timed(fn, iters: int) -> float:
    """Median-free mean in microseconds (the pieces are steady; noise shows in the total)."""
    t0 = time.perf_counter_ns()
    for _ in range(iters):
        fn()
    return (time.perf_counter_ns() - t0) / iters / 1e3


async def _timed_async(fn, iters: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(iters):
        await fn()
    return (time.perf_counter_ns() - t0) / iters / 1e3


async def profile(iters: int, hidden: int) -> dict[str, float]:
    """Microseconds per step of each piece, client and peer side."""
    x = torch.randn(1, 1, hidden)
    out: dict[str, float] = {}
    out["client: encode hidden"] = _timed(lambda: wire.encode(x, "none"), iters)
    step = peer_pb2.InferenceStep(session_id="a" * 32, position=7, step_id=7)
    step.hidden.CopyFrom(wire.encode(x, "none"))
    req = peer_pb2.InferenceRequest(step=step)
    out["client: request ByteSize (link)"] = _timed(req.ByteSize, iters)
    out["both: split (serialize)"] = _timed(lambda: wire.split(req), iters)
    parts = wire.split(req)

    async def join():
        return await wire.join(_one_part(parts), peer_pb2.InferenceRequest, 1 << 24)

    out["both: join (parse)"] = await _timed_async(join, iters)
    got = await join()
    decode = wire.decode
    out["peer: decode + validate"] = _timed(
        lambda: decode(got.step.hidden, "hidden", hidden_size=hidden, max_tokens=8192), iters
    )

    async def wait_for():
        return await loops.within(asyncio.sleep(0), 30)

    async def bare():
        return await asyncio.sleep(0)

    out["peer: asyncio.wait_for wrapper"] = await _timed_async(wait_for, iters) - (
        await _timed_async(bare, iters)
    )

    async def timeout():
        async with asyncio.timeout(30):
            return await asyncio.sleep(0)

    out["peer: asyncio.timeout instead"] = await _timed_async(timeout, iters) - (
        await _timed_async(bare, iters)
    )
    out.update(await _stream_writes(req, iters))
    worker = ComputeWorker("profile")
    try:
        out["peer: worker handoff (round trip)"] = await _timed_async(
            lambda: worker.call(lambda: None, "c"), iters
        )
    finally:
        worker.stop()
    return out


async def _stream_writes(msg, iters: int) -> dict[str, float]:
    """A message written and read back over a unix socket pair (as to and from p2pd): in three
    writes (hivemind's send_protobuf) and in one (swarm.peer.streams.send)."""
    a, b = socket.socketpair()
    reader, keep = await asyncio.open_connection(sock=a)  # `keep`: its socket stays open
    _, writer = await asyncio.open_connection(sock=b)
    out = {}
    try:
        for name, send in (
            ("both: stream write, 3 writes (before)", P2P.send_protobuf),
            ("both: stream write, 1 write (after)", streams.send),
        ):

            async def one(send=send):
                await send(msg, writer)
                await streams._receive(reader, type(msg), 1 << 24)

            out[name] = await _timed_async(one, iters)
    finally:
        writer.close()
        keep.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.profile_hop")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=576, help="SmolLM2-135M's hidden size")
    args = parser.parse_args()
    rows = loops.run(profile(args.iters, args.hidden))
    for name, us in rows.items():
        print(f"{name:<38} {us:8.1f} us")


if __name__ == "__main__":
    main()
