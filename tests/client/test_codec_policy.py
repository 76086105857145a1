"""The "auto" codec's choice from measured link figures (petals_like.codec_policy.choose)."""

from __future__ import annotations

import math

import pytest

from petals_like import codec_policy
from petals_like.codec_policy import LinkEstimate, probe_tokens, wire_bytes

SMOL = 576  # SmolLM2-135M's hidden size
OFFERED = ("fp16", "int8-block64", "dynamic8-block64", "none")
HOP = 0.020  # a hop's compute + round trip for one token, seconds


def cpu(codec: str, numel: int) -> float:
    """Fixed encode + decode costs: the measured ones vary with the machine and its load (on CI
    int8-block64's 0.3 ms made bf16 the cheaper at a 4 ms hop, where the test expects int8)."""
    return 40e-6 if codec == "bf16" else 100e-6


def choose(offered, hidden, link, hop_seconds):
    return codec_policy.choose(offered, hidden, link, hop_seconds, cpu_seconds=cpu)


def link(mbit_each_way: float) -> LinkEstimate:
    """A symmetric link: a byte goes there and back, each way at `mbit_each_way`."""
    return LinkEstimate(2 * 8 / (mbit_each_way * 1e6), rtt=0.001)


@pytest.mark.parametrize("mbit", [10_000, 1000, 100])
def test_fast_links_keep_the_lossless_codec(mbit):
    choice = choose(OFFERED, SMOL, link(mbit), HOP)
    assert choice.codec == "none" and choice.lossless_share < 0.1


def test_an_unmeasurably_fast_link_is_lossless():
    choice = choose(OFFERED, SMOL, LinkEstimate(0.0, 0.0005), HOP)
    assert choice.codec == "none" and choice.link.mbit_per_s == math.inf


@pytest.mark.parametrize("mbit", [10, 1])
def test_slow_links_take_int8(mbit):
    choice = choose(OFFERED, SMOL, link(mbit), HOP)
    assert choice.codec == "int8-block64" and choice.lossless_share > 0.1


def test_the_threshold_is_a_tenth_of_the_step():
    # fp32 of one token: 2304 bytes; at 1e-6 s per byte that is 2.3 ms of the hop's time.
    per_byte = LinkEstimate(1e-6, 0.001)
    assert choose(OFFERED, SMOL, per_byte, hop_seconds=0.030).codec == "none"  # 7.7%
    assert choose(OFFERED, SMOL, per_byte, hop_seconds=0.015).codec == "int8-block64"  # 15%


def test_bf16_where_fp32_costs_too_much_and_bf16_does_not():
    # Half fp32's bytes: bf16 is taken while its transfer is under a quarter of the step.
    with_bf16 = (*OFFERED, "bf16")
    per_byte = LinkEstimate(1e-6, 0.001)
    assert choose(with_bf16, SMOL, per_byte, hop_seconds=0.030).codec == "none"  # fp32 7.7%
    choice = choose(with_bf16, SMOL, per_byte, hop_seconds=0.015)  # fp32 15%, bf16 7.7%
    assert choice.codec == "bf16" and choice.lossless_share > 0.1
    assert choose(with_bf16, SMOL, per_byte, hop_seconds=0.005).codec == "bf16"  # bf16 23%
    assert choose(with_bf16, SMOL, per_byte, hop_seconds=0.004).codec == "int8-block64"  # 29%
    assert choose(with_bf16, SMOL, link(10), HOP).codec == "bf16"
    assert choose(with_bf16, SMOL, link(5), HOP).codec == "bf16"  # bf16 18%
    assert choose(with_bf16, SMOL, link(1), HOP).codec == "int8-block64"


def test_a_peer_without_lossy_codecs_gets_lossless_on_any_link():
    assert choose(("none",), SMOL, link(1), HOP).codec == "none"
    # Without a lossy codec, bf16 (the cheaper of the precise ones) where fp32 costs too much.
    assert choose(("none", "bf16"), SMOL, link(1), HOP).codec == "bf16"
    # The fallback order of lossy codecs follows what the peer offers.
    assert choose(("none", "dynamic8-block64"), SMOL, link(1), HOP).codec == "dynamic8-block64"


def test_wire_bytes_and_probe_size():
    assert wire_bytes("none", SMOL, SMOL) == 4 * SMOL
    assert wire_bytes("fp16", SMOL, SMOL) == 2 * SMOL
    assert wire_bytes("int8-block64", SMOL, SMOL) == SMOL + 2 * SMOL / 64
    assert wire_bytes("int8-row", 2 * SMOL, SMOL) == 2 * SMOL + 4
    assert probe_tokens(SMOL) == 14 and probe_tokens(64) == 64 and probe_tokens(1 << 16) == 2


def test_the_codecs_cpu_cost_counts():
    # At a 4 ms hop bf16's transfer is 29% of it: int8 is taken while its encode and decode are
    # cheap, bf16 when they cost more than the bytes they save (a slow CPU, a busy machine).
    per_byte, offered = LinkEstimate(1e-6, 0.001), (*OFFERED, "bf16")
    assert choose(offered, SMOL, per_byte, hop_seconds=0.004).codec == "int8-block64"
    slow_int8 = lambda codec, n: 40e-6 if codec == "bf16" else 400e-6  # noqa: E731
    choice = codec_policy.choose(offered, SMOL, per_byte, 0.004, cpu_seconds=slow_int8)
    assert choice.codec == "bf16"
