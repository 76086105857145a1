"""A failover's replay rebuilds a span's caches bit for bit only in the step shapes first used.

Checks the rule behind RouterConfig.exact_replay on real spans (the tiny model, fp32, bf16, int8).
"""

from __future__ import annotations

import pytest
import torch

from swarm.model.loading import load_span

HIDDEN = 64  # the tiny model's


def _steps(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    first = [torch.randn(1, 7, HIDDEN, generator=gen)]
    return [first[0].to(dtype)] + [
        torch.randn(1, 1, HIDDEN, generator=gen).to(dtype) for _ in range(12)
    ]


def _caches_after(span, steps: list[torch.Tensor], dtype: torch.dtype):
    caches = span.new_caches(1, 32, dtype=dtype)
    position = 0
    with torch.inference_mode():
        for x in steps:
            span(x, position, caches)
            position += x.shape[1]
    return caches, position


def _equal(a, b, n: int) -> bool:
    return all(
        torch.equal(x.k[:, :, :n], y.k[:, :, :n]) and torch.equal(x.v[:, :, :n], y.v[:, :, :n])
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize(
    "quant,dtype", [("none", torch.float32), ("none", torch.bfloat16), ("int8", torch.float32)]
)
def test_replay_in_the_first_shapes_is_bit_exact_one_step_is_not_promised(
    tiny_model_dir, quant, dtype
):
    span = load_span(str(tiny_model_dir), 0, 6, quant=quant, dtype=dtype, progress=False)
    steps = _steps(dtype)
    first, n = _caches_after(span, steps, dtype)
    again, _ = _caches_after(span, steps, dtype)  # a replacement replaying step by step
    assert _equal(first, again, n), "a replay in the first step shapes must rebuild the caches"
    one, _ = _caches_after(span, [torch.cat(steps, dim=1)], dtype)  # the whole prefix at once
    worst = max((x.k[:, :, :n].float() - y.k[:, :, :n].float()).abs().max().item()
                for x, y in zip(first, one, strict=True))  # fmt: skip
    # Not asserted either way: whether one step matches depends on the matmul kernels. On this
    # machine SmolLM2 differs even in fp32 (|dk| up to 3e-5), so every replay keeps the shapes.
    print(f"{quant}/{dtype}: one-step replay bit-exact: {_equal(first, one, n)}, max |dk| {worst}")
