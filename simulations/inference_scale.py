"""Inference at scale: a thousand peers over WAN latencies, churn, many clients, in virtual time.

Peers pick spans with the real balancer (`choose_span`, `should_move`); clients route with the
real route search (`petals_like.routing.find_route`) and ban list. Run
`python -m simulations.inference_scale [--peers 1000 --clients 32 --hours 1] [--json] [--plot F]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from petals_like.bans import BanList
from petals_like.routing import Hop, RouteCosts, find_route
from simulations.cli_help import DefaultsHelpFormatter
from simulations.sim.engine import EventQueue
from swarm.errors import NoRoute
from swarm.peer.balancer import block_coverage, choose_span, should_move
from swarm.peer.records import SpanRecord

JOIN, READY, LEAVE, CHECK, START, END, SAMPLE = range(7)


@dataclass
class ScaleConfig:
    """The simulated world; every field is a flag (`--mean-lifetime-h 0.5`)."""

    peers: int = 1000
    clients: int = 32
    blocks: int = 80  # a Llama-2-70B-sized chain
    hours: float = 1.0  # measured time, after the warm-up
    warmup_min: float = 10.0  # peers join over this long; clients start after it
    mean_lifetime_h: float = (
        1.0  # peers leave after an exponential lifetime; a newcomer replaces each
    )
    span_min: int = 4
    span_max: int = 16
    block_ms: float = 4.0  # median compute per block per decoded token (lognormal, sigma 0.5)
    load_ms: float = 30_000.0  # a joining or moving peer loads its blocks this long
    check_min: float = 20.0  # mean minutes between a peer's rebalancing checks
    session_tokens: int = 256  # tokens per client session
    prompt_tokens: int = 64
    think_s: float = 5.0  # a client's pause between sessions
    cache_sessions: int = 32  # sessions a peer's cache holds at once
    batch_slowdown: float = 0.03  # each session a peer serves at once slows its step by this much
    detect_s: float = 0.5  # a lost peer is noticed after this long (probe, timeout)
    prefill_ratio: float = 0.05  # a replayed token costs this fraction of a decoded one
    sample_s: float = 60.0
    seed: int = 0
    mode: str = "relay"  # relay: the client relays every hop; push: each peer sends to the next


def one_way_s(a: tuple[float, float], b: tuple[float, float]) -> float:
    """5 ms + up to 145 ms by great-circle distance: a planet of homes and data centres."""
    (la1, lo1), (la2, lo2) = a, b
    c = math.sin(la1) * math.sin(la2) + math.cos(la1) * math.cos(la2) * math.cos(lo1 - lo2)
    return 0.005 + 0.145 * math.acos(max(-1.0, min(1.0, c))) / math.pi


def random_place(rng: random.Random) -> tuple[float, float]:
    return math.asin(2 * rng.random() - 1), rng.uniform(-math.pi, math.pi)


class RoundTrips(Mapping):
    """A client's round trips to every peer, computed from places when asked (as measured)."""

    def __init__(self, place, peers: dict):
        self.place, self.peers = place, peers

    def __getitem__(self, pid):
        return 2 * one_way_s(self.place, self.peers[pid].place)

    def get(self, pid, default=None):
        return self[pid] if pid in self.peers else default

    def __iter__(self):
        return iter(self.peers)

    def __len__(self) -> int:
        return len(self.peers)


@dataclass
class Peer:
    pid: str
    place: tuple[float, float]
    length: int
    block_s: float
    start: int = 0
    state: str = "joining"
    sessions: set = field(default_factory=set)

    def record(self, cfg: ScaleConfig) -> SpanRecord:
        rps = 1.0 / (self.block_s * self.length)
        return SpanRecord(
            self.pid,
            self.start,
            self.start + self.length,
            state=self.state,
            throughput=rps,
            inference_rps=rps,
            cache_tokens_left=max(0, cfg.cache_sessions - len(self.sessions))
            * (cfg.session_tokens + cfg.prompt_tokens),
        )


@dataclass
class Session:
    client: int
    route: list[Hop]
    seg_start: float
    seg_tokens: int
    step_s: float
    version: int = 0
    started: float = 0.0
    failovers: int = 0


class World:
    def __init__(self, cfg: ScaleConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.q = EventQueue()
        self.peers: dict[str, Peer] = {}
        self.next_id = 0
        self.sessions: dict[int, Session] = {}
        self.next_session = 0
        self.clients = [random_place(self.rng) for _ in range(cfg.clients)]
        self.trips = [RoundTrips(p, self.peers) for p in self.clients]
        self.bans = [BanList(15.0, 2.0, 600.0, clock=lambda: self.q.now) for _ in self.clients]
        self.costs = RouteCosts()
        self.measure_from = cfg.warmup_min * 60
        self.stats = {"tokens": 0, "busy_s": [0.0] * cfg.clients, "tok": [0] * cfg.clients}
        self.failovers: list[float] = []  # seconds each recovery took
        self.failed_sessions = 0
        self.moves = 0
        self.route_ms: list[float] = []
        self.samples: list[dict] = []
        self._records: list[SpanRecord] | None = None

    # ---- the swarm's records -------------------------------------------------------------------
    def records(self) -> list[SpanRecord]:
        if self._records is None:
            self._records = [p.record(self.cfg) for p in self.peers.values()]
        return self._records

    def changed(self) -> None:
        self._records = None

    # ---- peers -------------------------------------------------------------------------------
    def join(self, _t, _a, _b) -> None:
        cfg, rng = self.cfg, self.rng
        pid = f"p{self.next_id}"
        self.next_id += 1
        length = rng.randint(cfg.span_min, min(cfg.span_max, cfg.blocks))
        block_s = cfg.block_ms / 1000 * math.exp(rng.gauss(0, 0.5))
        peer = Peer(pid, random_place(rng), length, block_s)
        peer.start, _ = choose_span(self.records(), cfg.blocks, length, rng)
        self.peers[pid] = peer
        self.changed()
        self.q.push(self.q.now + cfg.load_ms / 1000, READY, self.next_id - 1)
        self.q.push(
            self.q.now + rng.expovariate(1 / (cfg.mean_lifetime_h * 3600)), LEAVE, self.next_id - 1
        )
        self.q.push(self.q.now + rng.expovariate(1 / (cfg.check_min * 60)), CHECK, self.next_id - 1)

    def ready(self, _t, n, _b) -> None:
        peer = self.peers.get(f"p{n}")
        if peer is not None:
            peer.state = "online"
            self.changed()

    def leave(self, t, n, _b) -> None:
        peer = self.peers.pop(f"p{n}", None)
        if peer is None:
            return
        self.changed()
        for sid in list(peer.sessions):
            self.fail_over(t, sid, peer.pid)
        self.q.push(t + self.rng.expovariate(1 / 60.0), JOIN)  # a newcomer takes its place

    def check(self, t, n, _b) -> None:
        peer = self.peers.get(f"p{n}")
        if peer is None:
            return
        self.q.push(t + self.rng.expovariate(1 / (self.cfg.check_min * 60)), CHECK, n)
        if peer.state != "online":
            return
        move = should_move(self.records(), self.cfg.blocks, peer.pid, rng=self.rng)
        if move is None:
            return
        self.moves += 1
        for sid in list(peer.sessions):  # its sessions lose this span: they fail over
            self.fail_over(t, sid, peer.pid)
        peer.start, peer.state = move[0], "joining"
        self.changed()
        self.q.push(t + self.cfg.load_ms / 1000, READY, n)

    # ---- clients -------------------------------------------------------------------------------
    def route(self, c: int, start: int, end: int) -> list[Hop]:
        t0 = time.perf_counter()
        try:
            return find_route(
                self.records(),
                start,
                end,
                rtts=self.trips[c],
                banned=self.bans[c].banned(),
                cache_tokens_needed=self.cfg.session_tokens + self.cfg.prompt_tokens,
                costs=self.costs,
                rng=self.rng,
            )
        finally:
            self.route_ms.append((time.perf_counter() - t0) * 1000)

    def step_s(self, c: int, route: list[Hop]) -> float:
        """One decoded token. relay: a round trip from the client per hop; push: one way from
        the client to the first peer, peer to peer, and from the last back (hops + 1 delays)."""
        total, prev = 0.0, None
        for h in route:
            peer = self.peers[h.peer_id]
            load = 1 + self.cfg.batch_slowdown * len(peer.sessions)
            total += peer.block_s * len(h) * load
            if self.cfg.mode == "relay":
                total += self.trips[c][h.peer_id]
            else:
                total += one_way_s(self.clients[c] if prev is None else prev.place, peer.place)
            prev = peer
        if self.cfg.mode == "push":
            total += one_way_s(prev.place, self.clients[c])
        return total

    def start(self, t, c, _b) -> None:
        try:
            route = self.route(c, 0, self.cfg.blocks)
        except NoRoute:
            self.failed_sessions += 1
            self.q.push(t + self.cfg.think_s, START, c)
            return
        sid = self.next_session
        self.next_session += 1
        step = self.step_s(c, route)
        prefill = step * (1 + self.cfg.prefill_ratio * self.cfg.prompt_tokens)
        s = Session(c, route, t + prefill, 0, step, started=t)
        self.sessions[sid] = s
        for h in route:
            self.peers[h.peer_id].sessions.add(sid)
        self.changed()
        self.schedule_end(sid)

    def schedule_end(self, sid: int) -> None:
        s = self.sessions[sid]
        s.version += 1
        end = s.seg_start + (self.cfg.session_tokens - s.seg_tokens) * s.step_s
        self.q.push(end, END, sid, s.version)

    def tokens_at(self, s: Session, t: float) -> int:
        done = s.seg_tokens + max(0, int((t - s.seg_start) / s.step_s))
        return min(self.cfg.session_tokens, done)

    def end(self, t, sid, version) -> None:
        s = self.sessions.get(sid)
        if s is None or s.version != version:
            return  # re-routed since: a later END stands
        self.finish(t, sid, self.cfg.session_tokens)
        self.q.push(t + self.cfg.think_s, START, s.client)

    def finish(self, t: float, sid: int, tokens: int) -> None:
        s = self.sessions.pop(sid)
        for h in s.route:
            peer = self.peers.get(h.peer_id)
            if peer is not None:
                peer.sessions.discard(sid)
        self.changed()
        if s.started >= self.measure_from:
            self.stats["tokens"] += tokens
            self.stats["tok"][s.client] += tokens
            self.stats["busy_s"][s.client] += t - s.started

    def fail_over(self, t: float, sid: int, lost: str) -> None:
        """The session loses `lost`: ban it, re-route exactly its span, replay, go on."""
        s = self.sessions[sid]
        done = self.tokens_at(s, t)
        c = s.client
        self.bans[c].ban(lost, reason="(simulated loss)")
        i = next(i for i, h in enumerate(s.route) if h.peer_id == lost)
        gone = s.route[i]
        try:
            new = self.route(c, gone.start, gone.end)
        except NoRoute:
            self.failed_sessions += 1
            self.finish(t, sid, done)
            self.q.push(t + self.cfg.think_s, START, c)
            return
        s.route[i : i + 1] = new
        for h in new:
            self.peers[h.peer_id].sessions.add(sid)
        self.changed()
        step = self.step_s(c, s.route)
        replay = sum(
            self.trips[c][h.peer_id]
            + self.peers[h.peer_id].block_s
            * len(h)
            * self.cfg.prefill_ratio
            * (self.cfg.prompt_tokens + done)
            for h in new
        )
        recovery = self.cfg.detect_s + replay
        s.seg_start, s.seg_tokens, s.step_s = t + recovery, done, step
        s.failovers += 1
        if t >= self.measure_from:
            self.failovers.append(recovery)
        self.schedule_end(sid)

    # ---- figures -------------------------------------------------------------------------------
    def sample(self, t, _a, _b) -> None:
        online = [r for r in self.records() if r.state == "online"]
        cover = block_coverage(online, self.cfg.blocks)
        self.samples.append(
            {
                "t_min": round(t / 60, 2),
                "online_peers": len(online),
                "min_replicas": min(cover),
                "uncovered_blocks": sum(1 for n in cover if n == 0),
                "sessions": len(self.sessions),
            }
        )
        self.q.push(t + self.cfg.sample_s, SAMPLE)

    def run(self) -> dict:
        cfg = self.cfg
        warm = cfg.warmup_min * 60
        for i in range(cfg.peers):
            self.q.push(warm * i / cfg.peers, JOIN)
        for c in range(cfg.clients):
            self.q.push(warm + self.rng.uniform(0, cfg.think_s), START, c)
        self.q.push(0.0, SAMPLE)
        handlers = {
            JOIN: self.join,
            READY: self.ready,
            LEAVE: self.leave,
            CHECK: self.check,
            START: self.start,
            END: self.end,
            SAMPLE: self.sample,
        }
        wall = time.perf_counter()
        self.q.run(handlers, warm + cfg.hours * 3600)
        return self.result(time.perf_counter() - wall)

    def result(self, wall_s: float) -> dict:
        per_client = sorted(
            tok / busy
            for tok, busy in zip(self.stats["tok"], self.stats["busy_s"], strict=True)
            if busy
        )
        measured = [s for s in self.samples if s["t_min"] * 60 >= self.measure_from]

        def pct(xs, q):
            return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else 0.0

        return {
            "config": dataclasses.asdict(self.cfg),
            "tokens": self.stats["tokens"],
            "tokens_per_s_per_client": {
                "mean": round(statistics.fmean(per_client), 3) if per_client else 0.0,
                "p10": pct(per_client, 0.1),
                "p50": pct(per_client, 0.5),
                "p90": pct(per_client, 0.9),
            },
            "failovers": len(self.failovers),
            "recovery_s": {
                "p50": pct(sorted(self.failovers), 0.5),
                "p90": pct(sorted(self.failovers), 0.9),
            },
            "failed_sessions": self.failed_sessions,
            "peer_moves": self.moves,
            "min_replicas": min((s["min_replicas"] for s in measured), default=0),
            "max_uncovered_blocks": max((s["uncovered_blocks"] for s in measured), default=0),
            "route_ms": {
                "p50": pct(sorted(self.route_ms), 0.5),
                "p90": pct(sorted(self.route_ms), 0.9),
            },
            "wall_s": round(wall_s, 1),
            "samples": self.samples,
        }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    t = [x["t_min"] for x in s]
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    a.plot(t, [x["online_peers"] for x in s], label="online peers")
    a.plot(t, [x["sessions"] for x in s], label="open sessions")
    a.legend()
    a.set_ylabel("count")
    b.plot(t, [x["min_replicas"] for x in s], label="min replicas of a block")
    b.plot(t, [x["uncovered_blocks"] for x in s], label="uncovered blocks")
    b.axvline(result["config"]["warmup_min"], color="grey", ls=":", label="end of warm-up")
    b.legend()
    b.set_xlabel("virtual minutes")
    fig.suptitle(
        f"{result['config']['peers']} peers, {result['config']['clients']} clients: "
        f"{result['tokens_per_s_per_client']['p50']} tok/s per client (median), "
        f"{result['failovers']} failovers"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m simulations.inference_scale",
        description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelpFormatter,
    )
    for f in dataclasses.fields(ScaleConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, help="write coverage and load over time to this PNG")
    args = p.parse_args(argv)
    cfg = ScaleConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ScaleConfig)})
    if cfg.mode not in ("relay", "push"):
        p.error("--mode must be relay or push")
    result = World(cfg).run()
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result))
        return 0
    r = result
    tps = r["tokens_per_s_per_client"]
    print(
        f"{cfg.peers} peers ({cfg.span_min}-{cfg.span_max} blocks of {cfg.blocks}, mean life "
        f"{cfg.mean_lifetime_h} h), {cfg.clients} clients, {cfg.hours} h after a "
        f"{cfg.warmup_min:.0f}-min warm-up, {cfg.mode} (simulated in {r['wall_s']} s)"
    )
    print(
        f"  tokens/s per client: mean {tps['mean']}, p10 {tps['p10']}, median {tps['p50']}, "
        f"p90 {tps['p90']}"
    )
    print(
        f"  {r['tokens']} tokens; {r['failovers']} failovers (recovery median "
        f"{r['recovery_s']['p50']} s, p90 {r['recovery_s']['p90']} s); {r['failed_sessions']} "
        f"sessions found no route; {r['peer_moves']} rebalancing moves"
    )
    print(
        f"  coverage after warm-up: at least {r['min_replicas']} replicas per block, at most "
        f"{r['max_uncovered_blocks']} blocks uncovered; route search median "
        f"{r['route_ms']['p50']} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
