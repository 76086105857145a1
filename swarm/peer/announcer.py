"""Announcer: keeps one peer's span records, its model entry and its next-hop pings on the DHT.

Used by `swarm.peer.server.Peer` (and so by training peers), which owns one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence

import hivemind

from swarm.peer import pings
from swarm.peer.client import PeerClient
from swarm.peer.config import PeerConfig
from swarm.peer.dht_view import dht_time, store_model_entry_async, store_records_async
from swarm.peer.records import ModelEntry, SpanRecord
from swarm.peer.throughput import BlockThroughput

logger = logging.getLogger(__name__)

WARM_NEXT_HOPS = 4  # nearest next hops whose tickets and push streams are made ready ahead
NO_NEXT_HOP_RETRY = 5.0  # seconds before looking again when no next hop answered


class Announcer:
    """Builds and stores the records of one peer, as Petals' module announcer does.

    Records live two announce periods, so `run` re-stores the peer's current record every
    period; `ping_loop` times the peers serving the block after the span last announced online
    and the next records carry those round trips (`SpanRecord.next_pings`).
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        config: PeerConfig,
        entry: ModelEntry,
        peer_id: str,
        addrs: Sequence[str],
    ):
        self.dht = dht
        self.config = config
        self.entry = entry  # the model, as `swarm-peer status` lists it
        self.peer_id = peer_id
        self.addrs = tuple(addrs)
        self.reachability = "direct"  # the server sets "relayed" (and keeps addrs current)
        self.direct_port = 0  # the server sets its direct channel's port once it listens
        self.next_pings: dict[str, float] = {}  # round trips to the peers serving block pings_end
        self.pings_end: int | None = None
        self._online_end: int | None = None  # end of the span last announced online

    def record(
        self,
        state: str,
        start: int,
        end: int,
        speed: BlockThroughput,
        cache_tokens_left: int,
        codecs: Sequence[str] = (),
    ) -> SpanRecord:
        """The record of this peer serving [start, end) in `state` at one block's `speed`."""
        n = max(1, end - start)
        return SpanRecord(
            peer_id=self.peer_id,
            start=start,
            end=end,
            state=state,
            throughput=speed.forward_tps / n,  # through each block while serving all n
            cache_tokens_left=cache_tokens_left,
            codecs=tuple(codecs),
            quant=self.config.quant,
            version=self.config.version,
            inference_rps=speed.inference_rps / n,
            forward_tps=speed.forward_tps / n,
            addrs=self.addrs,
            reachability=self.reachability,
            direct_port=self.direct_port,
            run_id=self.config.run_id if self.config.train else "",
            # Pings are to the peers after `pings_end`: a record of another span has none yet.
            next_pings=dict(self.next_pings) if end == self.pings_end else {},
        )

    async def announce(self, record: SpanRecord, blocks: Iterable[int] | None = None) -> bool:
        """Store `record` under each of `blocks` (default: its span) for two announce periods.

        A serving record also refreshes the model entry. Returns False if a store failed.
        """
        blocks = list(blocks) if blocks is not None else list(range(record.start, record.end))
        expiration = dht_time() + 2 * self.config.announce_period
        timeout = self.config.dht_timeout
        ok = await store_records_async(
            self.dht, self.entry.prefix, blocks, record, expiration, timeout
        )
        if record.state != "offline":
            await store_model_entry_async(self.dht, self.entry, self.peer_id, expiration, timeout)
        if record.state == "online":
            self._online_end = record.end
        if not ok:
            logger.warning(
                "announcing %s for blocks %s did not fully succeed", record.state, blocks
            )
        return ok

    async def run(self, current: Callable[[], SpanRecord]) -> None:
        """Every announce period, announce `current()` (the peer's record now), until cancelled."""
        while True:
            await asyncio.sleep(self.config.announce_period)
            try:
                await self.announce(current())
            except Exception:
                logger.exception("announce failed; retrying next period")

    async def ping_loop(
        self,
        client: PeerClient,
        fetch: Callable[[], Awaitable[list[SpanRecord]]],
        warm: Callable[[list[str]], None] | None = None,
    ) -> None:
        """Each announce period, time the peers serving block `end` (Petals' next-hop pings).

        `fetch` reads the swarm's records; the span is the one last announced online. The
        nearest WARM_NEXT_HOPS of those that answered go to `warm` (the push streams to open
        ahead, with their direct-channel tickets), so that a session's first push waits for
        neither.
        """
        while True:
            end, measured = self._online_end, {}
            try:
                if end is not None and end < self.entry.num_blocks:  # the last span has no next hop
                    peers = pings.next_hop_peers(await fetch(), end, self.peer_id)
                    measured = await pings.measure_next_pings(client, peers)
                    if warm is not None:
                        warm(sorted(measured, key=measured.get)[:WARM_NEXT_HOPS])
                self.next_pings, self.pings_end = measured, end
            except Exception:
                logger.exception("measuring next-hop pings failed; retrying next period")
            period = self.config.announce_period
            if end is not None and end < self.entry.num_blocks and not measured:
                period = min(period, NO_NEXT_HOP_RETRY)  # a new swarm: its next hop may be starting
            await asyncio.sleep(period)
