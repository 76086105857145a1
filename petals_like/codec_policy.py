"""The "auto" wire codec: per hop, fp32, else bf16, while its bytes cost little of the step.

Used by the client's router (petals_like.router.SwarmRouter.session_codec) when a stream opens.

The estimator: forward probes to the hop's peer, each twice, keeping the fastest: 1 token and
`probe_tokens` tokens (about 32 KiB of fp32 activations) through its first block, and 1 token
through the hop's whole span. The difference of the first two over the extra bytes is the
seconds a payload byte costs when it travels to the peer and back, as every step's activations
do (one block's compute of a few tokens rides along and only biases toward compression); the
third is a decoding step's compute and round trip on the hop. No peer change is needed and
nothing but real forwards is asked of it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import kernels
from swarm.loops import within

logger = logging.getLogger(__name__)

LOSSLESS = "none"  # fp32 on the wire: greedy text through the swarm equals --local
# Half fp32's bytes; its greedy text agreed with --local on 48/48 tokens through int8 peers at
# every link cap of bench_codec, int8-block64 on 2/48: worth more of the step than fp32 is.
NEAR_LOSSLESS = "bf16"
NEAR_LOSSLESS_SHARE = 0.25  # bf16 is kept while its transfer costs under this share of the step
# Lossy codecs auto falls back to, best first; the first one the peer advertises is the candidate.
LOSSY = ("int8-block64", "dynamic8-block64", "int8-row")
LOSSLESS_SHARE = 0.10  # lossless is kept while its transfer costs under this share of the step
PROBE_BYTES = 32 * 1024  # fp32 payload of the large probe: resolves 1-100 Mbit/s links
PROBE_REPEATS = 2  # each size is sent this often; the fastest counts (queueing only adds)

_cpu_seconds: dict[tuple[str, int], float] = {}  # (codec, elements) -> encode+decode, measured


@dataclass(frozen=True)
class LinkEstimate:
    """What the probes measured of one peer's link.

    seconds_per_byte: cost of one payload byte sent to the peer and one sent back (0: too fast
        to measure); rtt: seconds of the small probe (round trip plus one block of one token);
    step: seconds of one token through the hop's whole span (0: not measured).
    """

    seconds_per_byte: float
    rtt: float
    step: float = 0.0

    @property
    def mbit_per_s(self) -> float:
        """The round trip's bandwidth in Mbit/s (inf when unmeasurably fast)."""
        return math.inf if self.seconds_per_byte <= 0 else 8e-6 / self.seconds_per_byte


@dataclass(frozen=True)
class CodecChoice:
    """The codec chosen for one peer, and why: for logs, summaries and benchmarks."""

    codec: str
    link: LinkEstimate | None  # None: not measured (an explicit codec, or nothing to choose)
    hop_seconds: float = 0.0  # the step's expected compute + round trip on this hop
    lossless_share: float = 0.0  # lossless transfer / hop_seconds


def wire_bytes(codec: str, numel: int, row: int) -> float:
    """Payload bytes of `numel` elements (rows of `row`) under `codec`, scales included."""
    if codec == LOSSLESS:
        return 4.0 * numel
    spec = kernels.parse_codec(codec)
    if not spec.has_scales:  # fp16 / bf16
        return 2.0 * numel
    scales = numel / row if spec.kind == "linear-row" else numel / spec.block_size
    return numel + 2.0 * scales


def codec_cpu_seconds(codec: str, numel: int) -> float:
    """Seconds to encode and decode `numel` float32 elements with `codec` here (measured once)."""
    key = (codec, numel)
    if key not in _cpu_seconds:
        x = torch.randn(numel)
        kernels.dequantize(kernels.quantize(x, codec))  # first calls pay one-time dispatch
        best = math.inf
        for _ in range(5):  # the fastest: other threads and processes only add
            t0 = time.perf_counter()
            kernels.dequantize(kernels.quantize(x, codec))
            best = min(best, time.perf_counter() - t0)
        _cpu_seconds[key] = best
    return _cpu_seconds[key]


def choose(
    offered: tuple[str, ...],
    hidden_size: int,
    link: LinkEstimate,
    hop_seconds: float,
    cpu_seconds: Callable[[str, int], float] = codec_cpu_seconds,
) -> CodecChoice:
    """The codec of a one-token step on a hop: fp32 while its transfer costs under
    LOSSLESS_SHARE of the step, then bf16 while under NEAR_LOSSLESS_SHARE, else the fastest.

    offered: the codecs the peer advertises ("none" is always understood); hidden_size: the
    model's; link: what the probes measured; hop_seconds: the step's compute + round trip;
    cpu_seconds(codec, numel): one encode + decode here (measured by default).
    The expected step time of a codec is its CPU cost at both ends, both ways, plus its bytes
    over the link; ties go to the more precise codec.
    """
    lossy = next((c for c in LOSSY if c in offered), None)
    precise = [LOSSLESS] + [NEAR_LOSSLESS] * (NEAR_LOSSLESS in offered)
    hop = max(hop_seconds, 1e-6)

    def transfer(codec: str) -> float:
        return wire_bytes(codec, hidden_size, hidden_size) * link.seconds_per_byte

    share = transfer(LOSSLESS) / hop
    limits = {LOSSLESS: LOSSLESS_SHARE, NEAR_LOSSLESS: NEAR_LOSSLESS_SHARE}
    for codec in precise:
        if transfer(codec) / hop < limits[codec]:
            return CodecChoice(codec, link, hop_seconds, share)

    def step_cost(codec: str) -> float:
        cpu = 2 * cpu_seconds(codec, hidden_size) if codec != LOSSLESS else 0.0
        return cpu + transfer(codec)

    # min keeps the first (the more precise) on a tie
    best = min(precise + [lossy] * (lossy is not None), key=step_cost)
    return CodecChoice(best, link, hop_seconds, share)


def probe_tokens(hidden_size: int, max_tokens: int = 64) -> int:
    """Tokens of the large probe: about PROBE_BYTES of fp32, at least 2, at most max_tokens."""
    return max(2, min(max_tokens, PROBE_BYTES // (4 * hidden_size)))


async def measure_link(
    client: Any, peer_id: Any, start: int, end: int, hidden_size: int, timeout: float
) -> LinkEstimate:
    """Probe the link to `peer_id` with forwards through its blocks [start, end) (see the module).

    client: a swarm.peer.client.PeerClient; timeout: bound on each probe. Raises what the
    forwards raise (PeerUnavailable, asyncio.TimeoutError, ...).
    """
    big = probe_tokens(hidden_size)
    gen = torch.Generator().manual_seed(0)
    probes = {"small": (1, start + 1), "big": (big, start + 1), "step": (1, end)}
    best = dict.fromkeys(probes, math.inf)
    for _ in range(PROBE_REPEATS):
        for name, (n, last) in probes.items():
            x = torch.randn(1, n, hidden_size, generator=gen)
            t0 = time.perf_counter()
            await within(
                client.forward(peer_id, x, start, last, timeout=timeout, codec=LOSSLESS),
                timeout + 0.5,
            )
            best[name] = min(best[name], time.perf_counter() - t0)
    extra = wire_bytes(LOSSLESS, (big - 1) * hidden_size, hidden_size)
    per_byte = max(0.0, best["big"] - best["small"]) / extra
    return LinkEstimate(per_byte, best["small"], best["step"])
