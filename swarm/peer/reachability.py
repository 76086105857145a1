"""Can others dial us? Peers dial a joining peer back on a fresh connection, as Petals' check does.

`DialBackHandler` runs on every peer (registered by `swarm.peer.server.Peer`); `decide_reachability`
runs in a joining peer before its DHT starts: it serves direct or relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.utils.multiaddr import Multiaddr

from proto import reachability_pb2
from swarm.errors import Unreachable
from swarm.loops import within
from swarm.peer.config import PeerConfig

logger = logging.getLogger(__name__)

DIAL_TIMEOUT = 5.0  # seconds one dial-back may take
MAX_ADDRS = 8  # most addrs one request may ask us to dial
MAX_ADDR_CHARS = 256
MIN_INTERVAL = 0.5  # seconds between dial-backs we start (all callers together)
ASK_PEERS = 3  # how many peers a joining peer asks
QUORUM = 0.5  # share of the answers that must say "reached" for us to count as direct


class DialBackHandler(ServicerBase):
    """Dials the caller back at the addrs it names, from a probe p2pd with no prior connection.

    Bounded: one dial at a time, at most one start per MIN_INTERVAL, each within DIAL_TIMEOUT;
    circuit addrs are refused (reaching someone through a relay proves nothing).
    """

    _rpc_handlers = None
    _stub_type = None

    def __init__(self) -> None:
        self._probe: P2P | None = None
        self._lock = asyncio.Lock()
        self._last = 0.0

    async def rpc_dial_back(
        self, request: reachability_pb2.DialBackRequest, context: P2PContext
    ) -> reachability_pb2.DialBackResponse:
        addrs = list(request.addrs)
        if not addrs or len(addrs) > MAX_ADDRS or any(len(a) > MAX_ADDR_CHARS for a in addrs):
            return _declined(f"need 1 to {MAX_ADDRS} addrs of at most {MAX_ADDR_CHARS} characters")
        direct = [a for a in addrs if "/p2p-circuit" not in a]
        if not direct:
            return _declined("only circuit addrs given")
        try:
            maddrs = [Multiaddr(a.split("/p2p/")[0]) for a in direct]
        except Exception as e:  # any parse failure of untrusted text is the caller's
            return _declined(f"bad multiaddr: {e}")
        if self._lock.locked():
            return _declined("busy: another dial-back is running")
        async with self._lock:
            wait = self._last + MIN_INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last = time.monotonic()
            try:
                probe = await self._get_probe()
                # The caller's own id: we never dial a third party on someone's request.
                await within(probe._client.connect(context.remote_id, maddrs), DIAL_TIMEOUT)
            except Exception as e:  # noqa: BLE001 - every failure to dial is the answer "no"
                return _no(f"{type(e).__name__}: {e}"[:200])
            finally:
                if self._probe is not None:
                    with contextlib.suppress(Exception):
                        await self._probe._client.disconnect(context.remote_id)
        return reachability_pb2.DialBackResponse(ok=True)

    async def _get_probe(self) -> P2P:
        if self._probe is None:
            # No listening addrs and no relay: the only way to the caller is a direct dial.
            self._probe = await P2P.create(
                host_maddrs=[], no_listen=True, use_relay=False, auto_nat=False, dht_mode="client"
            )
        return self._probe

    async def shutdown(self) -> None:
        if self._probe is not None:
            with contextlib.suppress(Exception):
                await self._probe.shutdown()
            self._probe = None


def _no(error: str) -> reachability_pb2.DialBackResponse:
    return reachability_pb2.DialBackResponse(ok=False, error=error)


def _declined(error: str) -> reachability_pb2.DialBackResponse:
    return reachability_pb2.DialBackResponse(ok=False, error=error, declined=True)


async def check_reachability(
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str] = (),
    timeout: float = 2 * DIAL_TIMEOUT,
) -> bool | None:
    """Ask up to ASK_PEERS initial peers to dial a temporary p2pd on our addrs.

    True: most that answered reached us; False: most did not; None: nobody answered (old peers,
    or none reachable). The temporary p2pd listens where the peer will, then shuts down.
    """
    peers = list(dict.fromkeys(m.rsplit("/p2p/", 1)[1] for m in initial_peers if "/p2p/" in m))
    if not peers:
        return None
    p2p = await P2P.create(
        initial_peers=list(initial_peers),
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs) or None,
        use_relay=False,
        auto_nat=False,
        dht_mode="client",
    )
    try:
        ours = [str(m) for m in await p2p.get_visible_maddrs(latest=True)]
        if announce_maddrs:
            ours = list(announce_maddrs)
        request = reachability_pb2.DialBackRequest(addrs=ours[:MAX_ADDRS])

        async def ask(peer: str) -> bool | None:
            stub = DialBackHandler.get_stub(p2p, PeerID.from_base58(peer))
            try:
                reply = await within(stub.rpc_dial_back(request), timeout)
            except Exception as e:  # noqa: BLE001 - a peer that cannot answer does not vote
                logger.debug("dial-back by %s failed: %r", peer, e)
                return None
            logger.info("dial-back by ..%s: %s", peer[-8:], "ok" if reply.ok else reply.error)
            return None if reply.declined else reply.ok

        votes = [
            v for v in await asyncio.gather(*(ask(p) for p in peers[:ASK_PEERS])) if v is not None
        ]
    finally:
        await p2p.shutdown()
    if not votes:
        return None
    return sum(votes) / len(votes) >= QUORUM


def decide_reachability(config: PeerConfig, host_maddrs: Sequence[str]) -> str:
    """'direct' or 'relayed': what --reachability says, else what peers dialling back found.

    Runs `check_reachability` in a short event loop of its own: call it before the DHT forks
    (no thread outlives it). Raises Unreachable for a training peer nobody can dial.
    """
    reachability = config.reachability
    if reachability == "auto":
        reachability = _ask(config, host_maddrs)
    if reachability == "relayed" and config.train:
        # Replicas average with hivemind's averager, which dials peers by id alone.
        raise Unreachable(
            "peers of the swarm cannot dial this machine, and training peers must be reachable "
            "(stage replicas average directly): forward a TCP port and pass "
            "--port PORT --announce-maddrs /ip4/PUBLIC_IP/tcp/PORT"
        )
    return reachability


def _ask(config: PeerConfig, host_maddrs: Sequence[str]) -> str:
    if not config.initial_peers:
        return "direct"  # a new swarm's first peer: whoever joins must dial it
    if config.host.startswith("127.") or config.host in ("::1", "localhost"):
        return "direct"  # a swarm on one machine: no NAT in between
    reached = asyncio.run(
        check_reachability(config.initial_peers, host_maddrs, config.announce_maddrs)
    )
    if reached is None:
        logger.warning("no peer answered the reachability check; assuming others can dial us")
        return "direct"
    if not reached:
        logger.info("peers of the swarm cannot dial us: serving through circuit relays")
    return "direct" if reached else "relayed"
