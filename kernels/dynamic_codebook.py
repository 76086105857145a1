"""The signed 8-bit dynamic (tree) codebook of the 8-bit optimizers paper (Dettmers et al., 2022).

Used by kernels.reference and kernels.triton_kernels for the "dynamic8-blockN" codec.

Layout: positive entry of rank r = 2**i + j (decade i in 0..6, j in 0..2**i - 1) is
10**(i - 6) * (0.1 + 0.9 * (j + 0.5) / 2**i); rank 128 is 1.0; negatives mirror ranks 1..127
(there is no -1.0), and zero sits in the middle. Sorted ascending, 256 entries, so a code is the
index of its entry. Same values as bitsandbytes' create_dynamic_map(signed=True) (bnb builds them
in float32; we build in float64 and round once, so an entry may differ by an ulp).
"""

from __future__ import annotations

import functools

import torch

DECADES = 7


@functools.cache
def _codebook_cpu() -> tuple[torch.Tensor, torch.Tensor]:
    positives = []
    for i in range(DECADES):
        j = torch.arange(2**i, dtype=torch.float64)
        positives.append(10.0 ** (i - 6) * (0.1 + 0.9 * (j + 0.5) / 2**i))
    pos = torch.cat(positives)
    table = torch.cat([-pos.flip(0), torch.zeros(1, dtype=torch.float64), pos, torch.ones(1)])
    table = table.to(torch.float32)
    # midpoints in float32 from float32 entries: the one table both implementations search
    midpoints = (table[:-1] + table[1:]) * 0.5
    return table, midpoints


@functools.cache
def _on_device(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    table, midpoints = _codebook_cpu()
    return table.to(device), midpoints.to(device)


def dynamic_codebook(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 codebook values (float32, ascending); code c decodes to codebook[c] * scale."""
    return _on_device(torch.device(device))[0]


def codebook_midpoints(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 255 midpoints between neighbouring entries; code = number of midpoints < x / scale."""
    return _on_device(torch.device(device))[1]


@functools.cache
def _bucket_table_cpu() -> torch.Tensor:
    midpoints = _codebook_cpu()[1]
    keys = torch.arange(1 << 16, dtype=torch.int64)
    negative = keys >= 1 << 15
    # a bucket is every float32 sharing the top 16 bits (sign, exponent, 7 mantissa bits)
    first = (keys << 16).to(torch.int32).view(torch.float32)
    last = ((keys << 16) | 0xFFFF).to(torch.int32).view(torch.float32)
    low, high = torch.where(negative, last, first), torch.where(negative, first, last)
    # the +-inf buckets are otherwise NaN; NaN never reaches the table (inputs are checked finite)
    low, high = torch.where(low.isnan(), high, low), torch.where(high.isnan(), low, high)
    code_low = torch.searchsorted(midpoints, low.nan_to_num(0.0, float("inf"), float("-inf")))
    code_high = torch.searchsorted(midpoints, high.nan_to_num(0.0, float("inf"), float("-inf")))
    if int((code_high - code_low).max()) > 1:
        raise RuntimeError("a 16-bit bucket holds two codebook midpoints; the table cannot work")
    split = code_high > code_low
    # low 16 bits of the splitting midpoint, mirrored for negatives so they grow with the value
    mid_bits = midpoints[code_low.clamp(max=254)].view(torch.int32).to(torch.int64) & 0xFFFF
    mid_bits = torch.where(negative, mid_bits ^ 0xFFFF, mid_bits)
    entry = (code_low << 16) + torch.where(split, 0xFFFF - mid_bits, 0)
    return entry.to(torch.int32)


@functools.cache
def _bucket_table_on(device: torch.device) -> torch.Tensor:
    return _bucket_table_cpu().to(device)


def bucket_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """A 65536-entry int32 table giving the same codes as the midpoint search, without a search.

    For y = fp32(x / scale) with bits b: key = (b >> 16) & 0xFFFF, low = (b ^ (b >> 31)) & 0xFFFF
    (the low half, mirrored for negatives so it grows with y); code = (table[key] + low) >> 16.
    Each bucket holds at most one midpoint (checked when built), so its entry is
    code_at_bucket_bottom << 16, plus 0xFFFF - the midpoint's low half when the bucket is split:
    adding `low` then carries into bit 16 exactly when y is above the midpoint.
    """
    return _bucket_table_on(torch.device(device))


ZERO_CODE = 127
