"""The swarm as a table: each peer and span, every block's peers, what nobody serves.

Used by `swarm-peer status` (text and `--json`) and the dashboard's `/api/swarm` (dashboard.web).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from swarm.peer.records import SpanRecord

logger = logging.getLogger(__name__)


def reachability(record: SpanRecord) -> str:
    """ "direct" or "relayed" (behind NAT, dialled through a relay); old records say nothing."""
    value = getattr(record, "reachability", None) or record.extra.get("reachability")
    return value if value in ("direct", "relayed") else "direct"


def swarm_table(
    model: str,
    num_blocks: int,
    records: Sequence[SpanRecord],
    rtts: Mapping[str, float] | None = None,
) -> dict:
    """The status JSON object of one model: `peers`, `blocks` (each with its peers), `uncovered`.

    rtts: round trips (s) this process measured to peers, shown as each peer's `rtt_ms`.
    """
    rtts = rtts or {}
    peers = []
    for r in sorted(records, key=lambda r: (r.start, r.end, r.peer_id)):
        rtt = rtts.get(r.peer_id)
        peers.append(
            {
                "peer_id": r.peer_id,
                "start": r.start,
                "end": r.end,
                "state": r.state,
                "throughput": round(r.throughput, 3),
                "inference_rps": round(r.inference_rps, 3),
                "cache_tokens_left": r.cache_tokens_left,
                "quant": r.quant,
                "version": r.version,
                "run_id": r.run_id,
                "reachability": reachability(r),
                "addrs": list(r.addrs),
                "direct_port": r.direct_port,  # its direct channel's TCP port (0: none)
                "rtt_ms": None if rtt is None else round(rtt * 1000, 2),
                # Round trips (ms) the peer measured to peers serving its next block.
                "next_pings_ms": {k: round(v * 1000, 2) for k, v in r.next_pings.items()},
            }
        )
    blocks = [
        {"index": i, "peers": [p for p in peers if p["start"] <= i < p["end"]]}
        for i in range(num_blocks)
    ]
    uncovered = [b["index"] for b in blocks if not any(p["state"] != "offline" for p in b["peers"])]
    return {
        "model": model,
        "num_blocks": num_blocks,
        "peers": peers,
        "blocks": blocks,
        "uncovered": uncovered,
    }


def fetch_tables(
    dht: Any,
    model: str | None = None,
    timeout: float = 10.0,
    rtts: Mapping[str, float] | None = None,
) -> list[dict]:
    """One `swarm_table` per model the swarm announces (or just `model`: a prefix or a path).

    Blocking (reads the DHT from this thread); an empty list when no such model is announced.
    """
    from swarm.peer.dht_view import fetch_models, fetch_swarm

    models = fetch_models(dht, timeout=timeout)
    if model:
        wanted = {model}
        try:
            from swarm.model.loading import resolve_model

            wanted.add(resolve_model(model).name)
        except Exception:  # a name only the swarm knows is fine
            pass
        models = [m for m in models if m.prefix in wanted]
    return [
        swarm_table(m.prefix, m.num_blocks, fetch_swarm(dht, m.prefix, m.num_blocks, timeout), rtts)
        for m in models
    ]


def snapshot(tables: list[dict], **extra: Any) -> dict:
    """What `/api/swarm` answers: the tables, when they were read, and what the server adds."""
    return {"time": time.time(), "models": tables, **extra}
