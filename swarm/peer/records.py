"""The DHT record a peer announces for each block it serves, and the model registry entry.

Written by `swarm.peer.announcer`, read through `swarm.peer.dht_view` by status, routing and
placement (`swarm.peer.balancer`, `swarm.training.rebalance`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

WIRE_VERSION = 1
STATES = ("joining", "online", "offline")
# States whose blocks count as served: a joining peer is already committed to its blocks.
SERVING_STATES = frozenset({"joining", "online"})
# How clients reach a peer: dialled at its own addrs, or through circuit relays (behind NAT).
REACHABILITY = ("direct", "relayed")
# Where peers list the models they serve: key MODELS_KEY, subkey "{prefix}|{peer id}" (signed).
MODELS_KEY = "swarm_mesh.models"
MAX_NEXT_PINGS = 32  # most next-hop round trips kept from one record (advisory, for routing)
# Readers loop over a model's blocks: a record may not claim more (Llama-3.1-405B has 126).
MAX_BLOCKS = 1024


def block_key(prefix: str, block: int) -> str:
    """The DHT key of one block's records (Petals' layout: `{prefix}.{block}`)."""
    return f"{prefix}.{block}"


def format_blocks(blocks: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> '3:6, 9:10' (half-open ranges, as everywhere in the mesh)."""
    parts, run = [], None
    for b in sorted(blocks):
        if run is not None and b == run[1]:
            run[1] = b + 1
        else:
            if run is not None:
                parts.append(f"{run[0]}:{run[1]}")
            run = [b, b + 1]
    if run is not None:
        parts.append(f"{run[0]}:{run[1]}")
    return ", ".join(parts)


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"bad span record: {what}")


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SpanRecord:
    """What one peer announces: its span [start, end), state, load and capabilities.

    `throughput` is tokens/s the peer can push through each of its blocks while serving the whole
    span (one block's measured rate divided by the span length), so per-block sums compare.
    """

    peer_id: str
    start: int
    end: int
    state: str = "online"
    throughput: float = 0.0
    cache_tokens_left: int = 0
    codecs: tuple[str, ...] = ()
    quant: str = "none"
    version: str = ""
    inference_rps: float = 0.0  # single-token steps/s through the whole span (batch 1)
    forward_tps: float = 0.0  # tokens/s of large forward batches through the whole span
    addrs: tuple[str, ...] = ()  # multiaddrs to dial, when announced
    run_id: str = ""  # training peers: the run whose stage this is ("" when serving inference)
    reachability: str = "direct"  # "relayed": addrs are /p2p-circuit ones (absent in old records)
    # TCP port of the direct channel (swarm.peer.direct) at the host of `addrs`; 0: none.
    direct_port: int = 0
    # Round trips (s) to peers serving block `end`: the router's server->server edges.
    next_pings: dict[str, float] = field(default_factory=dict, hash=False)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # unknown fields, kept

    def __post_init__(self) -> None:
        _need(isinstance(self.peer_id, str) and self.peer_id != "", "peer_id must be a string")
        _need(_int(self.start) and _int(self.end), "start and end must be integers")
        _need(0 <= self.start < self.end, f"span {self.start}:{self.end} is empty or negative")
        _need(self.end <= MAX_BLOCKS, f"span {self.start}:{self.end} ends past block {MAX_BLOCKS}")
        _need(self.state in STATES, f"state {self.state!r} is not one of {STATES}")
        for name in ("throughput", "inference_rps", "forward_tps"):
            value = getattr(self, name)
            _need(_num(value) and value >= 0, f"{name} must be a finite number >= 0")
        _need(_int(self.cache_tokens_left) and self.cache_tokens_left >= 0, "bad cache_tokens_left")
        _need(all(isinstance(c, str) for c in self.codecs), "codecs must be strings")
        _need(all(isinstance(a, str) for a in self.addrs), "addrs must be strings")
        _need(isinstance(self.quant, str) and isinstance(self.version, str), "bad quant/version")
        _need(isinstance(self.run_id, str) and len(self.run_id) <= 64, "bad run_id")
        _need(self.reachability in REACHABILITY, f"reachability must be one of {REACHABILITY}")
        _need(_int(self.direct_port) and 0 <= self.direct_port < 65536, "bad direct_port")
        _need(isinstance(self.next_pings, dict), "next_pings must be a dict")
        for peer, rtt in self.next_pings.items():
            _need(isinstance(peer, str) and _num(rtt) and rtt >= 0, f"bad next_pings[{peer!r}]")

    def to_wire(self) -> tuple:
        """(wire version, state, throughput, info dict): msgpack-able, as Petals' ServerInfo."""
        info = {
            **self.extra,
            "start": self.start,
            "end": self.end,
            "cache_tokens_left": self.cache_tokens_left,
            "codecs": list(self.codecs),
            "quant": self.quant,
            "version": self.version,
            "inference_rps": float(self.inference_rps),
            "forward_tps": float(self.forward_tps),
            "addrs": list(self.addrs),
            "next_pings": {k: float(v) for k, v in self.next_pings.items()},
        }
        if self.run_id:
            info["run_id"] = self.run_id
        if self.reachability != "direct":
            info["reachability"] = self.reachability
        if self.direct_port:
            info["direct_port"] = self.direct_port
        return (WIRE_VERSION, self.state, float(self.throughput), info)

    @classmethod
    def from_wire(cls, peer_id: str, value: Any) -> SpanRecord:
        """Parse a DHT value; extra tuple items and unknown info keys are tolerated and kept."""
        _need(isinstance(value, (tuple, list)) and len(value) >= 4, "expected a 4-tuple")
        version, state, throughput, info = value[:4]
        _need(_int(version) and version >= 1, f"bad wire version {version!r}")
        _need(isinstance(info, dict), "info must be a dict")
        known = {
            "start",
            "end",
            "cache_tokens_left",
            "codecs",
            "quant",
            "version",
            "inference_rps",
            "forward_tps",
            "addrs",
            "next_pings",
            "run_id",
            "reachability",
            "direct_port",
        }
        codecs, addrs = info.get("codecs", []), info.get("addrs", [])
        _need(isinstance(codecs, (list, tuple)) and isinstance(addrs, (list, tuple)), "bad lists")
        return cls(
            peer_id=peer_id,
            start=info.get("start"),
            end=info.get("end"),
            state=state,
            throughput=throughput,
            cache_tokens_left=info.get("cache_tokens_left", 0),
            codecs=tuple(codecs),
            quant=info.get("quant", "none"),
            version=info.get("version", ""),
            inference_rps=info.get("inference_rps", 0.0),
            forward_tps=info.get("forward_tps", 0.0),
            addrs=tuple(addrs),
            run_id=info.get("run_id", ""),
            reachability=info.get("reachability", "direct"),
            direct_port=info.get("direct_port", 0),
            next_pings=_pings(info.get("next_pings")),
            extra={k: v for k, v in info.items() if k not in known},
        )

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def serving(self) -> bool:
        return self.state in SERVING_STATES


def _pings(value: Any) -> dict[str, float]:
    """next_pings from the wire: advisory, so bad entries are dropped rather than the record."""
    if not isinstance(value, dict):
        return {}
    good = {k: float(v) for k, v in value.items() if isinstance(k, str) and _num(v) and v >= 0}
    return dict(sorted(good.items(), key=lambda kv: kv[1])[:MAX_NEXT_PINGS])


@dataclass(frozen=True)
class ModelEntry:
    """A model served in the swarm: lets `swarm-peer status` find it without local files."""

    prefix: str
    num_blocks: int
    hidden_size: int = 0

    def to_wire(self) -> tuple:
        return (WIRE_VERSION, self.num_blocks, self.hidden_size)

    @classmethod
    def from_wire(cls, prefix: str, value: Any) -> ModelEntry:
        _need(isinstance(value, (tuple, list)) and len(value) >= 3, "bad model entry")
        _need(_int(value[1]) and 0 < value[1] <= MAX_BLOCKS, f"bad model entry blocks {value[1]!r}")
        _need(_int(value[2]) and value[2] >= 0, f"bad model entry hidden size {value[2]!r}")
        return cls(prefix, value[1], value[2])
