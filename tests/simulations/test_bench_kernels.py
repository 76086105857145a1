"""The codec benchmark (simulations/bench_kernels.py): hivemind's 8-bit row runs under numpy 2,
and a codec that cannot run says why in one whole line."""

from __future__ import annotations

import torch

from simulations.bench_kernels import hivemind_codec, measure


def test_hivemind_uniform_8bit_row_has_figures() -> None:
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    row = measure("hivemind UNIFORM_8BIT", hivemind_codec("UNIFORM_8BIT"), x, repeat=1)
    assert not row[1].startswith("n/a"), row
    assert float(row[1].rstrip("%")) < 5.0  # 8 bits over 6 sigmas: about 1.6% on Gaussian data


def test_a_missing_package_is_named_not_cut() -> None:
    def run(x):
        raise ImportError("BlockwiseQuantization requires bitsandbytes to function properly.\n...")

    row = measure("hivemind BLOCKWISE_8BIT", run, torch.zeros(4, 4), repeat=1)
    assert row == ["hivemind BLOCKWISE_8BIT", "n/a (needs bitsandbytes, which is not installed)"]
