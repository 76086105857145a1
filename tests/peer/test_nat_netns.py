"""A peer behind NAT serves through circuit relays, in a small internet of network namespaces.

Public hosts on 203.0.113.0/24; a serving peer behind NAT (198.51.100.0/24) and a client behind
another (192.0.2.0/24). Needs root, `ip` and `nft`; every namespace and process is gone after.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

from swarm.netlab import Netlab, leftover_links, leftover_namespaces, missing_tools
from swarm.procs import alive, kill_tree
from tests.conftest import REPO, PeerProcess, wait_for

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 8, 60, 11, 99, 23]
NEW = 12
PAUSE_AT = 4  # a relay dies after this many tokens of the second generation

# Runs in the client's home: generates greedily through the swarm twice, a line per token, and
# after each generation its tokens, route and failovers as JSON. In the second, after token
# PAUSE_AT, it prints the relays it goes through and waits for a line on stdin (the test kills
# the relay meanwhile).
CLIENT = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
from petals_like.model import DistributedModelForCausalLM
model_dir, prompt, new, pause_at, *boot = sys.argv[1:]
def on_token(token):
    on_token.n += 1
    print("token", on_token.round, on_token.n, flush=True)
    if (on_token.round, on_token.n) == (2, int(pause_at)):
        # The relays our connections go through (to the NATed peer): the test kills one.
        infos = model.loop.run(model.router.client.p2p.list_peers(), 10)
        circuits = [str(a) for i in infos for a in i.addrs if "p2p-circuit" in str(a)]
        relays = [c.split("/p2p-circuit")[0].rsplit("/p2p/", 1)[1] for c in circuits]
        print("relays", json.dumps(relays), flush=True)
        sys.stdin.readline()
# verify=0: tokens reach on_token as they come (checks would hold them), so the pause is mid-way.
model = DistributedModelForCausalLM.from_pretrained(model_dir, boot, compression="none", verify=0)
with model:
    for on_token.round in (1, 2):
        on_token.n = 0
        out = model.generate(
            json.loads(prompt), max_new_tokens=int(new), stop_on_eos=False, on_token=on_token
        )
        stats = model.last_stats
        route = [[h.peer_id, h.start, h.end] for h in stats.route]
        result = {"tokens": out[0].tolist(), "route": route, "failovers": len(stats.failovers)}
        print(json.dumps(result), flush=True)
"""


def _skip_reason() -> str | None:
    missing = missing_tools()
    if missing:
        return f"needs {', '.join(missing)} (CI installs nftables; run as root)"
    return None


@dataclass
class Lab(Netlab):
    """The namespaces and the peers started in them (killed before the namespaces go)."""

    started: list[PeerProcess] = field(default_factory=list)


@pytest.fixture
def lab(request) -> Lab:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    net = Lab()

    def teardown() -> None:
        for p in net.started:
            p.kill()
        net.close()

    request.addfinalizer(teardown)  # runs when the test fails too
    return net.build(public=("pub",), homes=("home1", "home2"))


def _run_in(lab: Netlab, host: str, args: list[str], timeout: float) -> str:
    done = subprocess.run(
        [*lab.exec(host), sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        start_new_session=True,
    )
    if done.returncode != 0:
        pytest.fail(f"{args[:3]} in {host} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def _generate_twice(lab: Netlab, model_dir, boot: list[str], at_pause) -> list[dict]:
    """Two generations in the client's home; `at_pause(relay_ids)` runs mid-way through the
    second, with the peer ids of the relays the client's connections go through."""
    args = ["-c", CLIENT, str(model_dir), json.dumps(PROMPT), str(NEW), str(PAUSE_AT), *boot]
    proc = subprocess.Popen(
        [*lab.exec("home2"), sys.executable, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    results: list[dict] = []
    try:
        for line in proc.stdout:
            if line.startswith("relays "):
                at_pause(json.loads(line.split(" ", 1)[1]))
                proc.stdin.write("go\n")
                proc.stdin.flush()
            elif line.startswith("{"):
                results.append(json.loads(line))
                if len(results) == 2:
                    return results
        pytest.fail(f"the client printed {len(results)} results:\n{proc.stderr.read()[-12000:]}")
    finally:
        kill_tree(proc)


def _status(lab: Netlab, boot: list[str]) -> dict:
    args = ["-m", "swarm.cli.peer", "status", "--initial-peers", *boot, "--json"]
    return json.loads(_run_in(lab, "home2", args, 60))


@pytest.mark.timeout(400)
def test_nat_peer_serves_through_relays_and_survives_losing_one(
    lab, tmp_path, tiny_model_dir, throughput_cache
):
    from swarm.generation import generate_local
    from swarm.model.loading import load_model

    env = {"SWARM_MESH_CACHE": str(throughput_cache.parent)}
    base = ["join", "--model", str(tiny_model_dir), "--max-start-delay", "0", "--quant", "none"]
    base += ["--announce-period", "3"]

    def start(name: str, host: str, *args: str) -> PeerProcess:
        proc = PeerProcess(
            [*base, "--host", lab.address(host), *args],
            env,
            tmp_path / f"{name}.log",
            lab.exec(host),
        )
        lab.started.append(proc)
        return proc

    marks = {"start": time.monotonic()}  # phase ends, printed at the end (the suite's time)
    boot_proc = start("boot", "pub", "--stage", "0:3")
    boot = boot_proc.wait_maddrs(120)
    marks["boot"] = time.monotonic()
    relay2 = start("relay2", "pub", "--stage", "0:3", "--initial-peers", *boot)
    relay2_addrs = relay2.wait_maddrs(120)  # its dial-back answers from now on
    marks["relay2"] = time.monotonic()

    t0 = time.monotonic()
    nat = start("nat", "home1", "--stage", "3:6", "--initial-peers", *boot, *relay2_addrs)
    nat_addrs = nat.wait_maddrs(90)
    assert all("/p2p-circuit/" in a for a in nat_addrs), nat_addrs
    nat_id = nat.peer_id
    nat.wait_log("serving blocks", 60)  # logged once its online record is stored
    announced_s = time.monotonic() - t0
    marks["nat online"] = time.monotonic()
    assert announced_s < 60, f"the NATed peer was announced after {announced_s:.0f} s"

    relay2.wait_log("serving blocks", 60)  # all three online: one status call sees them

    def peers() -> dict[str, dict]:
        return {p["peer_id"]: p for p in _status(lab, boot)["peers"]}

    seen = wait_for(
        lambda: (
            (x := peers()) and all(p["state"] == "online" for p in x.values()) and len(x) == 3 and x
        ),
        60,
        0.5,
        "three peers online in status --json",
    )
    assert {k: p["reachability"] for k, p in seen.items()} == {
        boot_proc.peer_id: "direct",
        relay2.peer_id: "direct",
        nat_id: "relayed",
    }
    assert sorted(seen[nat_id]["addrs"]) == sorted(nat_addrs)
    marks["status"] = time.monotonic()

    # The first generation goes through the NATed peer; in the second, the relay that carries
    # the client's connection to it dies mid-way (with the replica of 0:3 it serves): the client
    # fails over, the NATed peer keeps its other relay, and the text stays local greedy's.
    want = generate_local(
        load_model(str(tiny_model_dir), progress=False), None, PROMPT, NEW, stop_on_eos=False
    )
    publics = {boot_proc.peer_id: boot_proc, relay2.peer_id: relay2}
    victims: list[PeerProcess] = []

    def kill_relay(relay_ids: list[str]) -> None:
        used = [publics[r] for r in relay_ids if r in publics]
        assert used, f"the client reaches the NATed peer through no relay of ours: {relay_ids}"
        victims.append(used[0])
        used[0].kill()

    both = [*boot, *relay2_addrs]  # the client survives either one's death
    first, second = _generate_twice(lab, tiny_model_dir, both, at_pause=kill_relay)
    marks["generations"] = time.monotonic()
    dead = victims[0].peer_id
    survivor = next(p for p in publics.values() if p is not victims[0])
    assert first["tokens"][len(PROMPT) :] == want
    assert first["route"][-1][0] == nat_id
    assert second["tokens"][len(PROMPT) :] == want
    assert second["failovers"] >= 1
    assert dead not in [h[0] for h in second["route"]]
    assert second["route"][-1][0] == nat_id
    nat.wait_log("relays changed", 30)
    record = {p["peer_id"]: p for p in _status(lab, survivor.maddrs)["peers"]}[nat_id]
    assert record["addrs"] and dead not in " ".join(record["addrs"]), record["addrs"]
    marks["relay dropped"] = time.monotonic()
    phases = list(marks.items())
    took = ", ".join(f"{b[0]} {b[1] - a[1]:.1f}" for a, b in zip(phases, phases[1:], strict=False))
    print(
        f"NATed peer announced online {announced_s:.1f} s after start; "
        f"killed its relay {'boot' if victims[0] is boot_proc else 'relay2'}, failovers: "
        f"{second['failovers']}; phases (s): {took}"
    )

    # Nothing outlives the test: namespaces (their veths and bridge with them) and processes.
    procs = list(lab.started)
    lab.started.clear()
    for p in procs:
        p.kill()
    tag = lab.tag
    lab.close()
    assert leftover_namespaces(tag) == []
    assert leftover_links(tag) == []
    assert not [pid for p in procs for pid, st in p._family.items() if alive(pid, st)]
    assert all(p.proc.poll() is not None for p in procs)
