"""Unit tests of output verification (petals_like.verify): comparison, settlement, bans.

The router here is a small double whose replicas compute a real function; the multi-process
scenarios are in test_scenario_verify.py.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from petals_like.bans import BanList
from petals_like.routing import Hop
from petals_like.verify import TOLERANCE, Verifier, first_mismatch, relative_errors
from swarm.errors import PeerTimeout


def honest(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * 2 + x


class Replicas:
    """Peers of one span: each answers `honest`, or a lie from position `lies_from` on, or
    raises its error in `fails`."""

    def __init__(self, lies: dict[str, int] | None = None, peers=("p", "q", "r"), fails=None):
        self.peers, self.lies = list(peers), lies or {}
        self.fails: dict[str, Exception] = fails or {}
        self.banned: list[str] = []
        self.failed: list[str] = []

    def answer(self, peer: str, x: torch.Tensor) -> torch.Tensor:
        out = honest(x)
        if peer in self.lies:
            out[:, self.lies[peer] :] += 1.0
        return out

    def replicas(self, start, end, exclude):
        return [p for p in self.peers if p not in exclude and p not in self.banned]

    async def forward(self, peer, hidden, start, end, timeout, adapter):
        if peer in self.fails:
            raise self.fails[peer]
        return self.answer(peer, hidden)

    def ban_liar(self, peer_id, reason, period):
        self.banned.append(peer_id)

    def report_failure(self, peer_id, error):
        self.failed.append(peer_id)

    def step_timeout(self, peer_id, n_tokens):
        return 5.0


def check(router: Replicas, route_peer: str, x: torch.Tensor, seed: int = 0):
    v = Verifier(1.0, seed=seed)
    out = router.answer(route_peer, x)
    return v, asyncio.run(v.check(router, Hop(route_peer, 0, 3), x, out))


def test_relative_errors_and_first_mismatch():
    ref = torch.ones(2, 5, 8)
    got = ref.clone()
    assert first_mismatch(got, ref, TOLERANCE) is None
    got[1, 3] *= 1.5  # one row of one position
    assert first_mismatch(got, ref, TOLERANCE) == 3
    assert relative_errors(got, ref)[3] == pytest.approx(0.5)
    got[0, 1, 0] = float("nan")
    assert first_mismatch(got, ref, TOLERANCE) == 1


def test_honest_route_passes_and_counts_a_check():
    x = torch.randn(1, 6, 8)
    v, liar = check(Replicas(), "p", x)
    assert liar is None and v.checks == 1 and not v.liars


@pytest.mark.parametrize("seed", range(4))
def test_route_liar_is_settled_by_a_third_replica_whoever_checks(seed):
    router = Replicas(lies={"p": 4})
    v, liar = check(router, "p", torch.randn(1, 6, 8), seed)
    assert liar is not None and liar.peer_id == "p" and liar.on_route
    assert liar.position == 4 and liar.error > TOLERANCE
    assert router.banned == ["p"] and v.liars == [liar]


@pytest.mark.parametrize("seed", range(6))
def test_lying_checker_is_banned_and_the_route_stands(seed):
    router = Replicas(lies={"q": 0})
    v, liar = check(router, "p", torch.randn(1, 6, 8), seed)
    assert liar is None
    # Whether q was asked depends on the draw; if it was, it is banned as a checker.
    assert router.banned in ([], ["q"])
    assert [(x.peer_id, x.on_route) for x in v.liars] == [("q", False)] * len(router.banned)


def test_no_second_replica_is_said_not_failed(caplog):
    with caplog.at_level("INFO"):
        v, liar = check(Replicas(lies={"p": 0}, peers=("p",)), "p", torch.randn(1, 3, 8))
    assert liar is None and v.unverifiable == {(0, 3)}
    assert "verification impossible for blocks 0:3" in caplog.text


def test_two_replicas_that_disagree_ban_nobody():
    router = Replicas(lies={"p": 0}, peers=("p", "q"))
    v, liar = check(router, "p", torch.randn(1, 3, 8))
    assert liar is None and not router.banned and len(v.unsettled) == 1


def test_failing_checker_is_reported_and_another_asked():
    router = Replicas(lies={"p": 2}, fails={"q": ConnectionError("gone")})
    v, liar = check(router, "p", torch.randn(1, 4, 8))
    # q failed; r disagrees with p but nobody is left to settle it.
    assert router.failed == ["q"] and liar is None and len(v.unsettled) == 1


def test_a_slow_checker_is_skipped_not_banned():
    router = Replicas(lies={"p": 2}, fails={"q": PeerTimeout("q did not answer in 5 s")})
    v, liar = check(router, "p", torch.randn(1, 4, 8))
    # q is alive as far as we know: not reported; r alone cannot settle against p.
    assert router.failed == [] and not router.banned and liar is None and len(v.unsettled) == 1


def test_a_checker_that_timed_out_is_asked_last_for_a_while():
    x = torch.randn(1, 4, 8)
    router = Replicas(fails={"q": PeerTimeout("q did not answer in 5 s")})
    v = Verifier(1.0, seed=0)
    asked: list[str] = []
    forward = router.forward

    async def recording(peer, *args):
        asked.append(peer)
        return await forward(peer, *args)

    router.forward = recording
    for _ in range(20):
        asked.clear()
        asyncio.run(v.check(router, Hop("p", 0, 3), x, router.answer("p", x)))
        if asked[0] == "q":
            break
    assert asked == ["q", "r"]  # the draw reached q once: it timed out, r answered
    for _ in range(10):  # then r goes first every time while q cools down
        asked.clear()
        asyncio.run(v.check(router, Hop("p", 0, 3), x, router.answer("p", x)))
        assert asked == ["r"]
    assert router.failed == [] and not router.banned


def test_fraction_is_validated_and_drawn():
    with pytest.raises(ValueError):
        Verifier(0.0)
    v = Verifier(0.2, seed=1)
    share = sum(v.due() for _ in range(5000)) / 5000
    assert 0.17 < share < 0.23


def test_a_liars_ban_is_long_and_not_shortened():
    now = [0.0]
    bans = BanList(15.0, 2.0, 600.0, clock=lambda: now[0])
    assert bans.ban("x", period=3600.0) == 3600.0
    now[0] = 1000.0
    assert "x" in bans
    assert bans.ban("x", period=10.0) == pytest.approx(2600.0)  # a shorter ban keeps the long one


def test_verify_flag_and_defaults_agree():
    import inspect

    from petals_like.api.cli import ApiConfig
    from petals_like.cli import parse_args
    from petals_like.model import DistributedModelForCausalLM
    from petals_like.verify import DEFAULT_FRACTION
    from swarm.errors import BadRequest

    peer = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWRSrtAgMjDciZ9gDyPK1Qe69UHzHKZw9i5ipozd7DvF1L"
    assert parse_args(["--initial-peers", peer, "hi"]).verify == DEFAULT_FRACTION
    assert parse_args(["--verify", "1", "--initial-peers", peer, "hi"]).verify == 1.0
    with pytest.raises(SystemExit):
        parse_args(["--verify", "1.5", "--initial-peers", peer, "hi"])
    signature = inspect.signature(DistributedModelForCausalLM.from_pretrained)
    assert signature.parameters["verify"].default == DEFAULT_FRACTION
    assert ApiConfig(initial_peers=[peer]).verify == DEFAULT_FRACTION
    with pytest.raises(BadRequest):
        ApiConfig(initial_peers=[peer], verify=-0.1)


async def test_router_believes_an_unmeasured_peer_no_faster_than_the_best_measured(fake_swarm):
    fake_swarm.add("h", 0, 6, rps=100.0)
    fake_swarm.add("x", 0, 6, rps=1e9)
    router = fake_swarm.router()
    await router.start()
    try:
        assert router.block_time_floors() == {}  # nobody measured: claims are all there is
        router.report_success("h", 0.002, 1)  # h served a one-token step
        floors = router.block_time_floors()
        assert floors["x"] == pytest.approx(1.0 / (100.0 * 6))  # h's claim: slower than its step
        router.rtts.update(h=0.01, x=0.01)  # pings measured in-process differ by noise only
        hops = await router.route(0, 6, 100)
        assert hops[0].peer_id == "h"  # a tie at best for x: records order decides
        router.report_success("x", 0.5, 1)  # x measured: half a second a step, not a nanosecond
        assert router.block_time_floors()["x"] > 0.05
        assert (await router.route(0, 6, 100))[0].peer_id == "h"
    finally:
        await router.close()


@pytest.mark.timeout(60)
def test_with_one_replica_per_span_text_streams_at_once_and_the_log_says_why(
    fake_swarm, tiny_model, caplog
):
    from swarm.generation import generate_local

    prompt = [5, 17, 42, 8, 60, 11]
    fake_swarm.add("a", 0, 3)
    fake_swarm.add("b", 3, 6)
    want = generate_local(tiny_model, None, prompt, 8, stop_on_eos=False)
    streamed: list[tuple[int, int]] = []  # (token, positions fed when it was passed on)
    with fake_swarm.distributed_model() as model, caplog.at_level("INFO"):
        model.verify = 0.5
        with model.inference_session(max_length=len(prompt) + 8) as session:

            def on_token(t: torch.Tensor) -> None:
                streamed.append((int(t[0]), session.position))

            out = model.generate(prompt, max_new_tokens=8, stop_on_eos=False, on_token=on_token)
        stats = model.last_stats
    assert out[0, len(prompt) :].tolist() == want == [t for t, _ in streamed]
    # Nothing to check against: each token is passed on as soon as it is sampled, not held back.
    assert [pos for _, pos in streamed] == list(range(len(prompt), len(prompt) + 8))
    assert stats.unverifiable == [(0, 3), (3, 6)] and stats.verify_checks == 0
    assert "verification impossible for blocks 0:3" in caplog.text
