"""The dial-back check on 127.0.0.1: a listening peer is reached, a dead address is not, bad asks
are refused without dialling. Tests swarm/peer/reachability.py.
"""

import pytest
from hivemind.p2p import P2P

from proto import reachability_pb2
from swarm.peer.reachability import MAX_ADDRS, DialBackHandler, check_reachability


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_dial_back_reaches_a_listening_peer_and_refuses_bad_requests():
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    handler = DialBackHandler()
    try:
        await handler.add_p2p_handlers(server)
        boot = [str(m) for m in await server.get_visible_maddrs()]
        assert await check_reachability(boot, ["/ip4/127.0.0.1/tcp/0"]) is True
        # Nobody listens at the announced address: the dial-back fails, we count as unreachable.
        unreachable = await check_reachability(
            boot, ["/ip4/127.0.0.1/tcp/0"], announce_maddrs=["/ip4/127.0.0.1/tcp/9"]
        )
        assert unreachable is False
        for addrs, why in [
            ([], "need 1 to"),
            (["/ip4/127.0.0.1/tcp/1"] * (MAX_ADDRS + 1), "need 1 to"),
            (["/ip4/203.0.113.1/tcp/1/p2p/X/p2p-circuit"], "circuit"),
            (["not a multiaddr"], "bad multiaddr"),
        ]:
            reply = await handler.rpc_dial_back(
                reachability_pb2.DialBackRequest(addrs=addrs), context=None
            )
            assert not reply.ok and reply.declined and why in reply.error
    finally:
        await handler.shutdown()
        await server.shutdown()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_no_initial_peers_means_no_answer():
    assert await check_reachability([], ["/ip4/127.0.0.1/tcp/0"]) is None


def test_first_loopback_forced_and_training_peers_skip_or_refuse():
    from swarm.errors import Unreachable
    from swarm.peer.config import PeerConfig
    from swarm.peer.reachability import decide_reachability

    boot = ["/ip4/203.0.113.10/tcp/1/p2p/12D3KooWGTuMTU8LUDuXKGiJ5fFYWriYWn51E4mGyJhhztE961UB"]
    here = ["/ip4/127.0.0.1/tcp/0"]
    assert decide_reachability(PeerConfig(), here) == "direct"  # a new swarm's first peer
    assert decide_reachability(PeerConfig(initial_peers=boot), here) == "direct"  # loopback
    forced = PeerConfig(initial_peers=boot, host="198.51.100.2", reachability="relayed")
    assert decide_reachability(forced, here) == "relayed"
    forced.train = True
    with pytest.raises(Unreachable, match="--announce-maddrs"):
        decide_reachability(forced, here)
