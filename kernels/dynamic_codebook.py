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


ZERO_CODE = 127
