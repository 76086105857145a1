"""Tests of kernels.dynamic_codebook: the codebook and the bucket table that replaces its search.

Run by pytest (tests/kernels); the table must give the codes of the midpoint search bit for bit.
"""

import torch

import kernels
from kernels.dynamic_codebook import bucket_table, codebook_midpoints, dynamic_codebook


def _search_codes(y: torch.Tensor) -> torch.Tensor:
    """The specification: code = number of midpoints < y."""
    return torch.searchsorted(codebook_midpoints(), y, right=False).to(torch.int64)


def _table_codes(y: torch.Tensor) -> torch.Tensor:
    bits = y.view(torch.int32).to(torch.int64)
    keys = (bits >> 16) & 0xFFFF
    lows = (bits ^ (bits >> 31)) & 0xFFFF
    return (bucket_table()[keys].to(torch.int64) + lows) >> 16


def _bucket_ends() -> torch.Tensor:
    keys = torch.arange(1 << 16, dtype=torch.int64)
    ends = torch.cat([keys << 16, (keys << 16) | 0xFFFF]).to(torch.int32).view(torch.float32)
    return ends[~ends.isnan()]


def test_every_bucket_holds_at_most_one_midpoint():
    keys = torch.arange(1 << 16, dtype=torch.int64)
    first = (keys << 16).to(torch.int32).view(torch.float32)
    last = ((keys << 16) | 0xFFFF).to(torch.int32).view(torch.float32)
    finite = ~(first.isnan() | last.isnan())
    spread = (_search_codes(first[finite]) - _search_codes(last[finite])).abs()
    assert int(spread.max()) == 1  # some buckets are split, none twice
    inside = codebook_midpoints().view(torch.int32).to(torch.int64) >> 16
    assert inside.unique().numel() == 255  # no two midpoints share a bucket


def test_table_matches_search_on_every_bucket_end_and_midpoint_neighbour():
    mid = codebook_midpoints()
    near = torch.cat(
        [mid, mid.nextafter(torch.tensor(float("inf"))), mid.nextafter(torch.tensor(-1e30))]
    )
    # within a bucket the code is monotone, so ends and midpoint neighbours cover every float
    y = torch.cat([_bucket_ends(), near, dynamic_codebook(), torch.tensor([0.0, -0.0])])
    assert torch.equal(_table_codes(y), _search_codes(y))


def test_table_matches_search_on_random_values():
    g = torch.Generator().manual_seed(0)
    y = torch.cat(
        [torch.rand(1 << 18, generator=g) * 2 - 1, torch.randn(1 << 16, generator=g) * 1e-4]
    )
    assert torch.equal(_table_codes(y), _search_codes(y))


def test_quantize_dynamic_equals_search_specification():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 300, generator=g) * torch.logspace(-8, 3, 300)
    q = kernels.quantize(x, "dynamic8-block256")
    scales = q.scales.float().repeat_interleave(256)[: x.numel()]
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    assert torch.equal(q.codes.to(torch.int64), _search_codes(x.reshape(-1) * inv))


def test_int8_codes_equal_clamped_rounding_and_reach_127():
    # the reference skips the clamp to +-127: it must be a no-op, including at the group's absmax
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 33, generator=g) * torch.logspace(-30, 30, 512)[:, None]
    x[:, 0] = x.abs().amax(dim=1) * torch.where(torch.arange(512) % 2 == 0, 1.0, -1.0)
    q = kernels.quantize(x, "int8-row")
    inv = 127.0 / q.scales.float()[:, None]
    expect = (x * inv).round().clamp(-127, 127).to(torch.int8).reshape(-1)
    assert torch.equal(q.codes, expect)
    assert q.codes.view(512, 33)[:, 0].abs().eq(127).any()
