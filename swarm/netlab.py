"""A small internet of Linux network namespaces: public hosts, home LANs behind NAT routers.

Used by the NAT test (`tests/peer/test_nat_netns.py`) and `simulations/bench_nat.py`; needs root,
`ip` and `nft`. Only documentation ranges are used, and everything is torn down by `close()`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

INTERNET = "203.0.113"  # the "internet" segment: routers' WAN sides and public hosts
HOME_LANS = ("198.51.100", "192.0.2")  # one /24 per home, behind its own NAT router
TOOLS = ("ip", "nft")

# Masquerade what leaves the WAN side; let in only replies (a home router's usual firewall).
NAT_RULES = """
table ip swarmnat {
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        oifname "wan" masquerade
    }
    chain forward_filter {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }
}
"""


class NetlabError(RuntimeError):
    """A namespace command failed (its stderr is in the message)."""


def missing_tools() -> list[str]:
    """What the lab needs and this machine lacks: 'root', 'ip', 'nft'."""
    missing = [] if os.geteuid() == 0 else ["root"]
    return missing + [t for t in TOOLS if shutil.which(t) is None]


def _run(args: Sequence[str], stdin: str | None = None) -> str:
    done = subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise NetlabError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


@dataclass
class Netlab:
    """Namespaces named `{tag}-...`: `net` (the internet's bridge), public hosts, homes, routers.

    `hosts` maps a host's name to (namespace, address). Use `exec(name)` as a command prefix.
    """

    tag: str = field(default_factory=lambda: "sm" + uuid.uuid4().hex[:6])
    namespaces: list[str] = field(default_factory=list)
    hosts: dict[str, tuple[str, str]] = field(default_factory=dict)
    _links = 0

    def _ns(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        _run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def _veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        # Both ends are born inside the namespaces: the host's own interfaces never change.
        self._links += 1
        tmp_a, tmp_b = f"{self.tag}a{self._links}", f"{self.tag}b{self._links}"
        _run(
            [
                "ip",
                "link",
                "add",
                tmp_a,
                "netns",
                ns_a,
                "type",
                "veth",
                "peer",
                tmp_b,
                "netns",
                ns_b,
            ]
        )
        _run(["ip", "-n", ns_a, "link", "set", tmp_a, "name", name_a])
        _run(["ip", "-n", ns_b, "link", "set", tmp_b, "name", name_b])

    def _addr(self, ns: str, dev: str, cidr: str) -> None:
        _run(["ip", "-n", ns, "addr", "add", cidr, "dev", dev])
        _run(["ip", "-n", ns, "link", "set", dev, "up"])

    def build(self, public: Sequence[str] = ("pub",), homes: Sequence[str] = ("home1", "home2")):
        """Public hosts on 203.0.113.10+, and each home at x.2 behind a router at x.1 / .2+i."""
        if len(homes) > len(HOME_LANS):
            raise ValueError(f"at most {len(HOME_LANS)} homes")
        try:
            net = self._ns("net")
            _run(["ip", "-n", net, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", net, "link", "set", "br0", "up"])
            for i, name in enumerate(public):
                ns = self._ns(name)
                self._port(net, ns, "eth0", f"{INTERNET}.{10 + i}/24")
                self.hosts[name] = (ns, f"{INTERNET}.{10 + i}")
            for i, (name, lan) in enumerate(zip(homes, HOME_LANS, strict=False)):
                router = self._ns(f"rt{i + 1}")
                self._port(net, router, "wan", f"{INTERNET}.{2 + i}/24")
                ns = self._ns(name)
                self._veth(router, "lan", ns, "eth0")
                self._addr(router, "lan", f"{lan}.1/24")
                self._addr(ns, "eth0", f"{lan}.2/24")
                _run(["ip", "-n", ns, "route", "add", "default", "via", f"{lan}.1"])
                _run(["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
                _run(["ip", "netns", "exec", router, "nft", "-f", "-"], stdin=NAT_RULES)
                self.hosts[name] = (ns, f"{lan}.2")
                self.hosts[f"rt{i + 1}"] = (router, f"{INTERNET}.{2 + i}")
        except BaseException:
            self.close()
            raise
        return self

    def _port(self, net: str, ns: str, dev: str, cidr: str) -> None:
        self._links += 1
        port = f"p{self._links}"
        self._veth(net, port, ns, dev)
        _run(["ip", "-n", net, "link", "set", port, "master", "br0", "up"])
        self._addr(ns, dev, cidr)

    def exec(self, host: str) -> list[str]:
        """The command prefix that runs a program on `host`."""
        return ["ip", "netns", "exec", self.hosts[host][0]]

    def address(self, host: str) -> str:
        return self.hosts[host][1]

    def close(self) -> None:
        """Delete every namespace (their veths and bridge go with them). Safe to call twice.

        Kill the processes you ran inside first: a namespace with live processes lingers.
        """
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=20)
        self.namespaces.clear()

    def __enter__(self) -> Netlab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def leftover_links(tag: str) -> list[str]:
    """Interfaces named `{tag}...` in the host's namespace (ours are born elsewhere: none)."""
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n.startswith(tag)]


def leftover_namespaces(tag: str) -> list[str]:
    """Namespaces of ours (named `{tag}-...`) that still exist."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{tag}-")]
