"""Calibrated 4-bit is what loading gives for nf4/fp4/int4 (swarm.model.loading): codes cached on
disk (swarm.model.calibration_cache), a span's codes equal the whole model's, bytes counted.
"""

from __future__ import annotations

import time

import pytest
import torch

from swarm.model.calibrate import LOAD_CALIBRATION, CalibrationConfig, sample_calibration_ids
from swarm.model.fourbit import FourBitLinear
from swarm.model.int8 import Int8Linear, weight_bytes
from swarm.model.loading import load_model, load_span
from swarm.model.quantize import quantized_params

SMALL = CalibrationConfig(sequences=8, length=32, sequential=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_MESH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "calibrated"


def codes(module) -> list[torch.Tensor]:
    return [
        b
        for m in module.modules()
        if isinstance(m, (FourBitLinear, Int8Linear))
        for b in m.buffers()
    ]


def logits_error(model, ref, ids) -> float:
    with torch.inference_mode():
        want = ref(ids)
        return ((model(ids) - want).norm() / want.norm()).item()


def test_nf4_loads_calibrated_and_a_second_load_reads_the_cache(tiny_model_dir, cache):
    t0 = time.perf_counter()
    first = load_model(str(tiny_model_dir), quant="nf4", progress=False)
    t1 = time.perf_counter()
    second = load_model(str(tiny_model_dir), quant="nf4", progress=False)
    t2 = time.perf_counter()
    blocks = first.span.blocks
    assert len(list(cache.rglob("block*.safetensors"))) == len(blocks)
    assert len(list(cache.rglob("ids-*.safetensors"))) == 1
    assert t2 - t1 < (t1 - t0) / 2, (t1 - t0, t2 - t1)
    assert all(isinstance(b.self_attn.v_proj, Int8Linear) for b in blocks)  # calibrated layout
    downs = [isinstance(b.mlp.down_proj, Int8Linear) for b in blocks]
    assert downs == [i == 3 for i in range(len(blocks))]
    assert all(torch.equal(a, b) for a, b in zip(codes(first), codes(second), strict=True))
    with torch.inference_mode():  # the cached norms (AWQ's folded scales) are read back too
        ids = torch.tensor([[5, 17, 42, 8, 60, 11]])
        assert torch.equal(first(ids), second(ids))
    # nf4-rtn keeps the old round-to-nearest path; calibration is closer to fp32 on held-out text
    rtn = load_model(str(tiny_model_dir), quant="nf4-rtn", progress=False)
    assert not any(isinstance(m, Int8Linear) for m in rtn.span.modules())
    fp32 = load_model(str(tiny_model_dir), progress=False)
    held_out = sample_calibration_ids(fp32, 4, 32, seed=LOAD_CALIBRATION.seed + 1)
    assert logits_error(first, fp32, held_out) < logits_error(rtn, fp32, held_out)
    # bytes: what int8 k/v add over round-to-nearest, and a bound per parameter
    extra = sum(
        b.get_submodule(n).nbytes - r.get_submodule(n).nbytes
        for b, r in zip(blocks, rtn.span.blocks, strict=True)
        for n in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    assert extra > 0 and weight_bytes(first.span) == weight_bytes(rtn.span) + extra
    assert weight_bytes(first.span) / quantized_params(first.span) < 0.7  # tiny: k/v are 20%


def test_a_span_alone_calibrates_the_codes_the_whole_model_has(
    tiny_model_dir, cache, tmp_path, monkeypatch
):
    whole = load_model(str(tiny_model_dir), quant="fp4", progress=False, calibration=SMALL)
    monkeypatch.setenv("SWARM_MESH_CACHE", str(tmp_path / "other"))  # nothing cached there
    span = load_span(str(tiny_model_dir), 2, 4, quant="fp4", progress=False, calibration=SMALL)
    assert not list(cache.parent.parent.joinpath("other", "calibrated").rglob("block0*"))
    for i in (2, 3):
        got, want = codes(span.blocks[i - 2]), codes(whole.span.blocks[i])
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        # the norms too: AWQ folds its scales into them
        got, want = span.blocks[i - 2].state_dict(), whole.span.blocks[i].state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got)


def test_an_unreadable_cache_file_is_calibrated_again(tiny_model_dir, cache):
    want = load_span(str(tiny_model_dir), 0, 1, quant="nf4", progress=False, calibration=SMALL)
    (path,) = cache.rglob("block0-*.safetensors")
    path.write_bytes(b"\x00garbage")
    got = load_span(str(tiny_model_dir), 0, 1, quant="nf4", progress=False, calibration=SMALL)
    assert all(torch.equal(a, b) for a, b in zip(codes(got), codes(want), strict=True))
