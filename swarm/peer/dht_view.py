"""Reading and writing span records on the hivemind DHT: the swarm as every peer sees it.

Used by `swarm-peer status`, stage choice and rebalancing, the announcer, the client's router and
the SWARM trainer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from functools import partial

from hivemind.dht import DHT, DHTNode
from hivemind.utils import get_dht_time

from swarm.errors import PeerUnavailable
from swarm.loops import within
from swarm.peer.records import MODELS_KEY, ModelEntry, SpanRecord, block_key
from swarm.signing import is_peer_id, owner_of

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0


# Coroutines run inside the DHT's process (DHT.run_coroutine pickles them): keep them top-level.
async def _get_blocks(_dht: DHT, node: DHTNode, keys: list[str]) -> dict:
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
    out = {}
    for key in keys:
        item = found.get(key)
        if item is None or not isinstance(item.value, dict):
            continue
        out[key] = {
            subkey: (entry.value, entry.expiration_time) for subkey, entry in item.value.items()
        }
    return out


async def _store_many(
    _dht: DHT, node: DHTNode, keys: list[str], subkeys: list[str], values: list, expiration: float
) -> dict:
    return await node.store_many(keys, values, expiration, subkeys=subkeys)


def _merge(found: dict, prefix: str, num_blocks: int) -> list[SpanRecord]:
    """One record per peer: its freshest serving record, else its freshest tombstone.

    A peer that moved leaves offline tombstones on its old blocks; its live span must win.
    Only records under a peer id count: the DHT checked that peer signed them (swarm.signing).
    """
    best: dict[str, tuple[tuple[bool, float], SpanRecord]] = {}
    for block in range(num_blocks):
        for subkey, (value, expiration) in found.get(block_key(prefix, block), {}).items():
            if not is_peer_id(subkey):
                logger.debug("ignoring a record at block %d under %r: not a peer id", block, subkey)
                continue
            try:
                record = SpanRecord.from_wire(subkey, value)
            except (ValueError, TypeError) as e:
                logger.debug("ignoring bad record of %s at block %d: %s", subkey, block, e)
                continue
            rank = (record.serving, expiration)
            if subkey not in best or rank > best[subkey][0]:
                best[subkey] = (rank, record)
    return sorted((r for _, r in best.values()), key=lambda r: (r.start, r.end, r.peer_id))


async def fetch_swarm_async(
    dht: DHT, model_prefix: str, num_blocks: int, timeout: float = DEFAULT_TIMEOUT
) -> list[SpanRecord]:
    """Every peer's latest record for the model's blocks (offline tombstones included).

    Raises PeerUnavailable if the DHT does not answer within `timeout` seconds.
    """
    keys = [block_key(model_prefix, b) for b in range(num_blocks)]
    future = dht.run_coroutine(partial(_get_blocks, keys=keys), return_future=True)
    try:
        found = await within(future, timeout)
    except asyncio.TimeoutError:
        future.cancel()
        raise PeerUnavailable(f"the DHT did not answer within {timeout:.0f} s") from None
    return _merge(found, model_prefix, num_blocks)


def fetch_swarm(
    dht: DHT, model_prefix: str, num_blocks: int, timeout: float = DEFAULT_TIMEOUT
) -> list[SpanRecord]:
    """Blocking form of `fetch_swarm_async`, for CLIs and threads without an event loop."""
    keys = [block_key(model_prefix, b) for b in range(num_blocks)]
    future = dht.run_coroutine(partial(_get_blocks, keys=keys), return_future=True)
    try:
        found = future.result(timeout)
    except TimeoutError:
        future.cancel()
        raise PeerUnavailable(f"the DHT did not answer within {timeout:.0f} s") from None
    return _merge(found, model_prefix, num_blocks)


async def store_records_async(
    dht: DHT,
    model_prefix: str,
    blocks: Sequence[int],
    record: SpanRecord,
    expiration: float,
    timeout: float = DEFAULT_TIMEOUT,
) -> bool:
    """Store `record` under each block's key (subkey = its peer id) until `expiration` (DHT time).

    Returns True if every block's store succeeded somewhere; False on partial failure or timeout.
    """
    keys = [block_key(model_prefix, b) for b in blocks]
    if not keys:
        return True
    value = record.to_wire()
    future = dht.run_coroutine(
        partial(
            _store_many,
            keys=keys,
            subkeys=[record.peer_id] * len(keys),
            values=[value] * len(keys),
            expiration=expiration,
        ),
        return_future=True,
    )
    try:
        result = await within(future, timeout)
    except asyncio.TimeoutError:
        future.cancel()
        logger.warning("storing records for %d blocks timed out", len(keys))
        return False
    return all(result.values())


async def store_model_entry_async(
    dht: DHT, entry: ModelEntry, subkey: str, expiration: float, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """Register `entry.prefix` in the swarm's model list (what `status` reads without --model)."""
    future = dht.run_coroutine(
        partial(
            _store_many,
            keys=[MODELS_KEY],
            subkeys=[f"{entry.prefix}|{subkey}"],
            values=[entry.to_wire()],
            expiration=expiration,
        ),
        return_future=True,
    )
    try:
        await within(future, timeout)
    except asyncio.TimeoutError:
        future.cancel()
        logger.warning("registering model %s timed out", entry.prefix)


def fetch_models(dht: DHT, timeout: float = DEFAULT_TIMEOUT) -> list[ModelEntry]:
    """The models peers currently announce, one entry per prefix (blocking).

    Each peer signs its own entry (subkey "{prefix}|{peer id}"); where peers disagree on a
    model's sizes, the entry most of them announce wins.
    """
    future = dht.run_coroutine(partial(_get_blocks, keys=[MODELS_KEY]), return_future=True)
    try:
        found = future.result(timeout)
    except TimeoutError:
        future.cancel()
        raise PeerUnavailable(f"the DHT did not answer within {timeout:.0f} s") from None
    votes: dict[str, Counter[ModelEntry]] = {}
    for subkey, (value, _exp) in found.get(MODELS_KEY, {}).items():
        if owner_of(subkey) is None or "|" not in subkey:  # unsigned: anyone could write it
            continue
        prefix = subkey.rsplit("|", 1)[0]
        try:
            votes.setdefault(prefix, Counter())[ModelEntry.from_wire(prefix, value)] += 1
        except (ValueError, TypeError) as e:
            logger.debug("ignoring bad model entry %s: %s", subkey, e)
    return [votes[p].most_common(1)[0][0] for p in sorted(votes)]


def dht_time() -> float:
    """The DHT's clock (expirations are in this time)."""
    return get_dht_time()
