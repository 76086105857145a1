"""GPU check of the Triton kernels: codecs bit-equal to the torch reference, dequantize-in-the-tile
matmuls within tolerance, and their speed as GB/s of weight read against the device's bandwidth.

Run `python -m simulations.gpu_check [--json]` on a CUDA machine (a few minutes at most); on a
machine without CUDA or Triton it says "skipped" and exits 0. Exit 1 if any check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

# Nominal HBM bandwidth (GB/s) of common parts, by a substring of the device name.
NOMINAL_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350, "A100": 2039}
# fp32 inputs multiply in IEEE fp32 (summation order differs); half inputs in their dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_codecs(dev: torch.device, small: bool) -> list[dict]:
    """Wire codecs and the 4-bit weight codec on CUDA against the CPU reference, bit for bit."""
    from kernels import codecs, fourbit, triton_fourbit, triton_kernels

    rows = []
    gen = torch.Generator().manual_seed(0)
    for codec in ("int8-block64", "dynamic8-block64", "int8-row", "dynamic8-block4096"):
        x = torch.randn(*((5, 77) if small else (513, 777)), generator=gen) * 3
        ref = codecs.quantize(x, codec)
        codes, scales = triton_kernels.quantize(x.to(dev), codecs.parse_codec(codec))
        ok = torch.equal(codes.cpu(), ref.codes) and torch.equal(
            scales.cpu().to(torch.bfloat16), ref.scales
        )
        on_dev = dataclasses.replace(ref, codes=ref.codes.to(dev), scales=ref.scales.to(dev))
        out = triton_kernels.dequantize(on_dev, codecs.parse_codec(codec))
        ok = ok and torch.equal(out.cpu().reshape(ref.shape), codecs.dequantize(ref))
        rows.append({"check": f"codec {codec}", "ok": ok})
    for kind in fourbit.KINDS:
        for shape in ((7, 13),) if small else ((4096, 4096), (1000, 333), (7, 13)):
            w = torch.randn(shape, generator=gen) * 0.02
            ref = fourbit.quantize_4bit(w, kind)
            got = triton_fourbit.quantize_4bit(w.to(dev), kind)
            ok = all(
                torch.equal(getattr(got, f).cpu(), getattr(ref, f))
                for f in ("packed", "absmax_codes", "absmax_scales", "absmax_mean")
            )
            ok = ok and torch.equal(
                triton_fourbit.dequantize_4bit(got).cpu(), fourbit.dequantize_4bit(ref)
            )
            rows.append({"check": f"4-bit codec {kind} {shape}", "ok": ok})
    return rows


def check_matmuls(dev: torch.device, small: bool) -> list[dict]:
    """Dequantize-in-the-tile matmuls against x @ reference_dequantize(W)^T, in float64."""
    import kernels
    from kernels import fourbit, triton_dequant_mm

    rows = []
    gen = torch.Generator().manual_seed(1)
    shapes = ((3, 80, 40),) if small else ((1, 4096, 4096), (16, 4096, 11008), (33, 1000, 333))
    for m, k, n in shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        q8 = kernels.quantize_weight(w)
        weights = {"int8": (q8, q8.dequantize())}
        for kind in fourbit.KINDS:
            q4 = fourbit.quantize_4bit(w, kind)
            weights[kind] = (q4, fourbit.dequantize_4bit(q4))
        # the interpreter's tl.dot works in numpy, which has no bfloat16
        for dtype in (torch.float32,) if dev.type == "cpu" else TOLERANCE:
            x = torch.randn(m, k, generator=gen).to(dtype)
            for name, (q, deq) in weights.items():
                ref = x.double() @ deq.double().t()
                xd = x.to(dev)
                if name == "int8":
                    got = triton_dequant_mm.int8_dequant_mm(xd, q.codes.to(dev), q.scales.to(dev))
                else:
                    got = triton_dequant_mm.fourbit_dequant_mm(xd, _to(q, dev))
                rel = _rel(got.cpu(), ref)
                rows.append(
                    {
                        "check": f"dequant-mm {name} {m}x{k}x{n} {str(dtype)[6:]}",
                        "ok": rel <= TOLERANCE[dtype],
                        "rel_err": rel,
                        "tolerance": TOLERANCE[dtype],
                    }
                )
    return rows


def _to(q, dev):
    from kernels import FourBitWeight

    return FourBitWeight(
        q.packed.to(dev),
        q.absmax_codes.to(dev),
        q.absmax_scales.to(dev),
        q.absmax_mean.to(dev),
        q.shape,
        q.kind,
    )


def _time_ms(fn, repeats: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def bandwidth(dev: torch.device) -> list[dict]:
    """Decode-shaped matmuls (M = 1, 16): weight bytes read per second, and a device copy's."""
    import kernels
    from kernels import fourbit, triton_dequant_mm

    name = torch.cuda.get_device_name(dev)
    nominal = next((v for k, v in NOMINAL_GBPS.items() if k in name), None)
    big = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    copy_ms = _time_ms(lambda: big.clone(), 20)
    copy_gbps = 2 * big.numel() / copy_ms / 1e6  # read + write
    rows = [{"check": "device copy", "ok": True, "gb_s": copy_gbps, "nominal_gb_s": nominal}]
    n = k = 8192
    w = torch.randn(n, k, device=dev) * 0.02
    q8 = kernels.quantize_weight(w)
    q4 = _to(fourbit.quantize_4bit(w.cpu(), "nf4"), dev)
    w16 = w.half()
    for m in (1, 16):
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        cases = {
            "fp16 cuBLAS": (lambda x=x: x @ w16.t(), 2 * n * k),
            "int8 dequant-mm": (
                lambda x=x: triton_dequant_mm.int8_dequant_mm(x, q8.codes, q8.scales),
                q8.nbytes,
            ),
            "nf4 dequant-mm": (lambda x=x: triton_dequant_mm.fourbit_dequant_mm(x, q4), q4.nbytes),
        }
        for label, (fn, nbytes) in cases.items():
            ms = _time_ms(fn)
            gbps = nbytes / ms / 1e6
            rows.append(
                {
                    "check": f"speed {label} M={m} {n}x{k}",
                    "ok": True,
                    "ms": ms,
                    "gb_s": gbps,
                    "vs_copy": gbps / copy_gbps,
                    "vs_nominal": gbps / nominal if nominal else None,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON object per line per check")
    p.add_argument("--no-speed", action="store_true", help="correctness checks only")
    p.add_argument("--small", action="store_true", help="small shapes (a smoke test)")
    args = p.parse_args(argv)
    # TRITON_INTERPRET=1 runs the kernels on CPU tensors: a smoke test of this script (--small).
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpret:
        print("gpu_check: no CUDA device here; skipped (run it on a GPU machine)")
        return 0
    from kernels import triton_dequant_mm

    if not triton_dequant_mm.available():
        print("gpu_check: CUDA but no Triton installed; skipped")
        return 0
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    rows = check_codecs(dev, args.small) + check_matmuls(dev, args.small)
    if not args.no_speed and dev.type == "cuda":
        rows += bandwidth(dev)
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            extra = ", ".join(f"{k} {v:.4g}" for k, v in r.items() if isinstance(v, float))
            print(
                f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']}" + (f"  ({extra})" if extra else "")
            )
    failed = [r["check"] for r in rows if not r["ok"]]
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "the interpreter"
    print(
        f"gpu_check on {where}: {len(rows) - len(failed)}/{len(rows)}"
        f" ok in {time.perf_counter() - t0:.0f} s" + (f"; FAILED: {failed}" if failed else ""),
        file=sys.stderr,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
