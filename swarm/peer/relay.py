"""Serving from behind NAT: a p2pd holding circuit-relay reservations, and our /p2p-circuit addrs.

Used by `swarm.peer.server.Peer` when nobody can dial it; `swarm.peer.client` uses `dial_maddr`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import base58
from hivemind import hivemind_cli
from hivemind.utils.multiaddr import Multiaddr

from swarm.errors import Unreachable
from swarm.signing import fresh_identity

logger = logging.getLogger(__name__)

# Why we start p2pd ourselves: hivemind's `P2P.create` cannot pass `-relayDiscovery=0`, so with
# `use_auto_relay=True` p2pd only looks for relays through its DHT, and go-libp2p's autorelay then
# waits its boot delay (3 min) for 4 candidates before it reserves anything. With static relays
# (`-trustedRelays`, `-relayDiscovery=0`) it reserves at once, on every relay given. The DHT then
# runs on this daemon (`hivemind.DHT(p2p=...)` only reads `daemon_listen_maddr`).
#
# Why we build the circuit addrs ourselves: go-libp2p advertises a relay's circuit addrs only for
# its public addrs (manet.IsPublicAddr), so a relay on a documentation or benchmarking range (as
# in the namespace test) is never announced though the reservation works; and hivemind's Python
# multiaddr encodes `/p2p/ID` as a CIDv1, which p2pd cannot decode ("length greater than
# remaining number of bytes"), so `circuit_maddr` writes the bytes as go-multiaddr reads them.

P2P_CODE = b"\xa5\x03"  # varint of the multiaddr protocol code 421 (p2p)
CIRCUIT_CODE = b"\xa2\x02"  # varint of 290 (p2p-circuit)
MAX_RELAYS = 4  # most relays we hold reservations on (each costs the relay a slot)
START_TIMEOUT = 15.0  # seconds p2pd may take to print its peer id


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _p2p(peer_id: str) -> bytes:
    raw = base58.b58decode(peer_id)
    return P2P_CODE + _varint(len(raw)) + raw


def relay_parts(relay_maddr: str) -> tuple[str, str]:
    """'/ip4/A/tcp/P/p2p/ID' -> ('/ip4/A/tcp/P', 'ID'); ValueError if it names no peer."""
    head, sep, peer_id = relay_maddr.rpartition("/p2p/")
    if not sep or not head or not peer_id or "/" in peer_id:
        raise ValueError(f"relay multiaddr {relay_maddr!r} must end in /p2p/PEER_ID")
    return head, peer_id


def circuit_text(relay_maddr: str, peer_id: str) -> str:
    """Our address through a relay: '{relay}/p2p-circuit/p2p/{peer_id}'."""
    head, relay_id = relay_parts(relay_maddr)
    return f"{head}/p2p/{relay_id}/p2p-circuit/p2p/{peer_id}"


def circuit_maddr(text: str) -> Multiaddr:
    """A '/.../p2p/RELAY/p2p-circuit[/p2p/ID]' string as a Multiaddr p2pd can decode.

    The trailing /p2p/ID (the target) is dropped: p2pd's connect takes the peer id apart.
    """
    before, sep, _target = text.partition("/p2p-circuit")
    if not sep:
        raise ValueError(f"{text!r} is no /p2p-circuit multiaddr")
    head, relay_id = relay_parts(before)
    return Multiaddr(Multiaddr(head).to_bytes() + _p2p(relay_id) + CIRCUIT_CODE)


def is_circuit(maddr: str) -> bool:
    return "/p2p-circuit" in maddr


def dial_maddr(text: str) -> Multiaddr:
    """An announced multiaddr as p2pd's connect takes it: circuits encoded right, others
    without their trailing /p2p/ID (the peer id travels apart)."""
    if is_circuit(text):
        return circuit_maddr(text)
    head, sep, _peer = text.rpartition("/p2p/")
    return Multiaddr(head if sep else text)


@dataclass
class RelayedDaemon:
    """Our own p2pd, private to NAT: reserves slots on `relays` and serves no relay itself.

    `daemon_listen_maddr` is what `hivemind.DHT(p2p=...)` reads. Reservations are read from
    p2pd's autorelay log (the control API has no call for them).
    """

    relays: list[str]
    host_maddrs: Sequence[str]
    identity_path: str | None = None
    daemon_listen_maddr: Multiaddr = field(init=False)
    process: subprocess.Popen | None = field(init=False, default=None)
    peer_id: str = field(init=False, default="")

    def start(self) -> RelayedDaemon:
        # A peer we reach only through a relay cannot relay for us.
        self.relays = [r for r in dict.fromkeys(self.relays) if not is_circuit(r)][:MAX_RELAYS]
        if not self.relays:
            raise Unreachable(
                "this peer cannot be dialled from outside and no initial peer is one others can "
                "dial (to relay for it): pass --initial-peers of a public peer"
            )
        for relay in self.relays:
            relay_parts(relay)
        token = secrets.token_urlsafe(8)
        self.daemon_listen_maddr = Multiaddr(f"/unix/tmp/hivemind-p2pd-{token}.sock")
        # The log has no name on disk once p2pd has it open: nothing is left behind, however
        # this process ends; we read it through our own descriptor.
        fd, name = tempfile.mkstemp(prefix="swarm-p2pd-", suffix=".log")
        self._log = open(name, "rb")  # noqa: SIM115 - kept open for the daemon's lifetime
        args = [
            str(Path(hivemind_cli.__file__).parent / "p2pd"),
            f"-listen={self.daemon_listen_maddr}",
            f"-hostAddrs={','.join(self.host_maddrs)}",
            f"-bootstrapPeers={','.join(self.relays)}",
            "-b=1",
            "-dhtClient=1",
            "-autoRelay=1",
            "-relayDiscovery=0",
            f"-trustedRelays={','.join(self.relays)}",
            "-forceReachabilityPrivate=1",
            "-relayService=0",  # we cannot be dialled: relaying for others would fail anyway
            "-natPortMap=1",
            "-connManager=1",
            "-idleTimeout=30s",  # p2pd ends itself if its clients vanish (hivemind's default)
        ]
        # Always a key file: the DHT on this daemon signs our records with it (swarm.signing).
        if self.identity_path is None:
            self.identity_path = fresh_identity()
        elif not os.path.isfile(self.identity_path):
            from hivemind.p2p import P2P

            P2P.generate_identity(self.identity_path)
        args.append(f"-id={self.identity_path}")
        env = {
            **os.environ,
            "GOLOG_LOG_FMT": "json",
            "GOLOG_LOG_LEVEL": "error,autorelay=debug",  # reservations appear at debug level
        }
        with os.fdopen(fd, "wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        os.unlink(name)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.peer_id:
            for line in self._lines():
                if line.startswith("Peer ID:"):
                    self.peer_id = line.split(":", 1)[1].strip()
            if self.process.poll() is not None or time.monotonic() > deadline:
                said = [line for line in self._lines() if not line.startswith("{")]
                self.close()
                if any("failed to connect to bootstrap peers" in line for line in said):
                    raise Unreachable(
                        f"could not connect to any initial peer ({', '.join(self.relays)}), "
                        f"so no relay can serve this peer: check --initial-peers"
                    )
                raise Unreachable(f"p2pd for relayed serving did not start: {' '.join(said[-3:])}")
            time.sleep(0.05)
        return self

    def _lines(self) -> list[str]:
        self._log.seek(0)
        return self._log.read().decode(errors="replace").splitlines()

    def reserved(self) -> list[str]:
        """Relays (their multiaddrs) that hold a reservation for us now, from p2pd's log."""
        held: set[str] = set()
        for line in self._lines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("logger") != "autorelay" or not isinstance(entry.get("id"), str):
                continue
            if entry.get("msg") == "adding new relay":
                held.add(entry["id"])
            elif entry.get("msg") == "disconnected from relay":
                held.discard(entry["id"])
        return [r for r in self.relays if relay_parts(r)[1] in held]

    def circuit_addrs(self) -> list[str]:
        """Our /p2p-circuit multiaddrs through the relays that hold a reservation now."""
        return [circuit_text(r, self.peer_id) for r in self.reserved()]

    def wait_reserved(self, timeout: float) -> list[str]:
        """Circuit addrs once at least one relay holds a reservation; Unreachable after timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            addrs = self.circuit_addrs()
            if addrs:
                return addrs
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise Unreachable(
            f"this peer cannot be dialled from outside (behind NAT or a firewall), and none of "
            f"{len(self.relays)} relay{'s' * (len(self.relays) != 1)} ({', '.join(self.relays)}) "
            f"accepted a reservation within {timeout:.0f} s. Forward a TCP port to this machine "
            f"and pass --port PORT --announce-maddrs /ip4/PUBLIC_IP/tcp/PORT, or join through "
            f"peers that can relay (any peer others can dial relays by default)"
        )

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
