"""The namespace lab: homes reach the internet through their NAT, nobody reaches into a home,
and nothing is left once it closes. Tests swarm/netlab.py (root, `ip` and `nft`)."""

import subprocess
import sys

import pytest

from swarm.netlab import Netlab, leftover_links, leftover_namespaces, missing_tools

SERVE = """
import socket, sys
s = socket.socket(); s.bind(("0.0.0.0", 7000)); s.listen(); print("ready", flush=True)
c, addr = s.accept(); c.sendall(addr[0].encode()); c.close()
"""
DIAL = """
import socket, sys
try:
    print(socket.create_connection((sys.argv[1], 7000), timeout=2).recv(64).decode())
except OSError as e:
    print("failed", type(e).__name__)
"""


def _dial(lab: Netlab, src: str, dst: str) -> str:
    cmd = [*lab.exec(src), sys.executable, "-c", DIAL, lab.address(dst)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()


@pytest.mark.timeout(60)
def test_homes_are_behind_nat_and_the_lab_leaves_nothing():
    missing = missing_tools()
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    lab = Netlab()
    servers = []
    try:
        lab.build()
        for host in ("pub", "home1"):
            cmd = [*lab.exec(host), sys.executable, "-c", SERVE]
            servers.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
            assert servers[-1].stdout.readline().strip() == "ready"
        # The public host sees the home's router, never the home's own address.
        assert _dial(lab, "home2", "pub") == lab.address("rt2")
        assert _dial(lab, "pub", "home1").startswith("failed")
        assert _dial(lab, "home2", "home1").startswith("failed")
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
        lab.close()
    assert leftover_namespaces(lab.tag) == [] and leftover_links(lab.tag) == []
