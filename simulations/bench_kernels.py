"""Benchmark of the wire codecs: error, bytes per element and encode/decode speed, one table.

Run as `python -m simulations.bench_kernels [--size 4096] [--repeat 3]`; compares with
bitsandbytes (block-wise 8-bit, CPU) and hivemind.compression where installed. Speeds are the
median of --repeat timed runs, in GB/s of float32 input; "small half" is the relative L2 error
on the half of the values smallest in magnitude (what a codec with one scale per row loses).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import kernels
from simulations.progress import Progress

OURS = [
    "int8-row",
    "int8-block64",
    "int8-block256",
    "int8-block2048",
    "dynamic8-block64",
    "dynamic8-block256",
    "dynamic8-block2048",
    "dynamic8-block4096",
    "fp16",
    "bf16",
]


def make_data(size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The three test distributions of the issue, [size, size] float32."""
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(size, size, generator=g)
    outl = torch.randn(size, size, generator=g)
    cols = torch.randperm(size, generator=g)[:6]
    outl[:, cols] *= 20.0
    t3 = torch.distributions.StudentT(3.0).sample((size, size))
    return {"gauss": gauss, "outlier": outl, "student-t3": t3}


BNB_BLOCKS = (4096, 2048, 256, 64)


def _timed(fn, repeat: int) -> tuple[object, float]:
    """fn's result and the median seconds of `repeat` calls after one untimed warm-up."""
    out = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def errors(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Relative L2 error, and relative L2 error on the smaller half of values by magnitude."""
    flat, err = x.reshape(-1), (y.float() - x).reshape(-1)
    small = flat.abs() <= flat.abs().median()
    return (err.norm() / flat.norm()).item(), (err[small].norm() / flat[small].norm()).item()


def our_codec(codec: str):
    def run(x):
        return kernels.quantize(x, codec), lambda q: kernels.dequantize(q), None

    return run


def bnb_blockwise(block: int):
    """bitsandbytes' dynamic 8-bit block-wise codec; it keeps one float32 absmax per block."""

    def run(x):
        import bitsandbytes.functional as F

        q, state = F.quantize_blockwise(x, blocksize=block)
        nbytes = q.numel() * q.element_size() + state.absmax.numel() * 4
        return (q, state), lambda qs: F.dequantize_blockwise(qs[0], qs[1]), nbytes

    return run


def decode_quantized(msg) -> torch.Tensor:
    """hivemind's 8-bit wire format (int64 codebook size, float32 codebook, uint8 indices),
    decoded as its `Quantization.extract` does, with the size read by `.item()`: numpy 2 refuses
    `int()` of a 1-element array, which is what breaks hivemind's own decoder."""
    import numpy as np

    size = np.frombuffer(msg.buffer, count=1, dtype=np.int64).item()
    codebook = np.frombuffer(msg.buffer, offset=8, count=size, dtype=np.float32)
    indices = np.frombuffer(msg.buffer, offset=8 + codebook.nbytes, dtype=np.uint8)
    # Copies: buffers from the wire are read-only, which torch does not support.
    indices = torch.from_numpy(indices.astype(np.int64)).reshape(tuple(msg.size))
    return torch.from_numpy(codebook.copy()).to(getattr(torch, msg.dtype))[indices]


def numpy_version() -> str:
    import numpy

    return numpy.__version__


# Rows whose decode is decode_quantized: hivemind's own fails (see decode_quantized).
DECODED_HERE: set[str] = set()


def hivemind_codec(name: str):
    def run(x):
        from hivemind.compression import serialize_torch_tensor
        from hivemind.compression.serialization import deserialize_torch_tensor
        from hivemind.proto import runtime_pb2

        kind = getattr(runtime_pb2.CompressionType, name)
        with warnings.catch_warnings():  # torch deprecates the quint8 tensors hivemind makes
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
            msg = serialize_torch_tensor(x, kind)
        decode = deserialize_torch_tensor
        if name in DECODED_HERE:
            decode = decode_quantized
        else:
            try:
                deserialize_torch_tensor(msg)
            except TypeError:  # numpy >= 2 (see decode_quantized); any other error is reported
                if not name.endswith("8BIT"):
                    raise
                DECODED_HERE.add(name)
                decode = decode_quantized
        return msg, decode, len(msg.buffer)

    return run


def why_not(e: Exception) -> str:
    """The reason a third-party codec cannot run, as one whole line."""
    if isinstance(e, ImportError):
        missing = "bitsandbytes" if "bitsandbytes" in str(e) else (e.name or "a package")
        return f"needs {missing}, which is not installed"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def measure(name: str, run, x: torch.Tensor, repeat: int) -> list[str]:
    try:
        (q, decode, nbytes), enc_s = _timed(lambda: run(x), repeat)
        y, dec_s = _timed(lambda: decode(q), repeat)
    except Exception as e:  # report any failure of a third-party codec as n/a, with its reason
        return [name, f"n/a ({why_not(e)})"]
    nbytes = q.nbytes if nbytes is None else nbytes
    rel, small = errors(x, y)
    gbps = x.numel() * x.element_size() / 1e9
    return [
        name,
        f"{100 * rel:.3f}%",
        f"{100 * small:.3f}%",
        f"{nbytes / x.numel():.4f}",
        f"{gbps / enc_s:.2f}",
        f"{gbps / dec_s:.2f}",
    ]


def gpu_throughput(size: int) -> str:
    if not torch.cuda.is_available():
        return "GPU throughput: skipped (torch.cuda.is_available() is False)"
    lines = ["GPU throughput (GB/s of input, float32):"]
    x = torch.randn(size, size, device="cuda")
    for codec in OURS:
        q = kernels.quantize(x, codec)
        kernels.dequantize(q)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            q = kernels.quantize(x, codec)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(10):
            kernels.dequantize(q)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        gb = x.numel() * 4 / 1e9
        lines.append(
            f"  {codec:20s} encode {gb * 10 / (t1 - t0):8.1f}  decode {gb * 10 / (t2 - t1):8.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="tensors are [size, size]")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per codec (median)")
    args = parser.parse_args()
    torch.manual_seed(0)
    runs = [(c, our_codec(c)) for c in OURS]
    runs += [(f"bnb blockwise-{n}", bnb_blockwise(n)) for n in BNB_BLOCKS]
    for name in ["UNIFORM_8BIT", "BLOCKWISE_8BIT", "FLOAT16"]:
        runs.append((f"hivemind {name}", hivemind_codec(name)))
    header = ["codec", "relL2", "small half", "B/elem", "enc GB/s", "dec GB/s"]
    threads = torch.get_num_threads()
    print(
        f"[{args.size}x{args.size}] float32, CPU, {threads} threads, median of {args.repeat}",
        flush=True,
    )
    current = ["making the data"]
    with Progress("bench_kernels") as progress:
        progress.update(lambda: current[0])
        for dist, x in make_data(args.size).items():
            print(f"\n== {dist}", flush=True)
            print(" | ".join(f"{h:>23s}" if i == 0 else f"{h:>10s}" for i, h in enumerate(header)))
            for name, run in runs:
                current[0] = f"{dist}: {name}"
                row = measure(name, run, x, args.repeat)
                if name.split()[-1] in DECODED_HERE:
                    row[0] += "*"
                cells = (f"{c:>23s}" if i == 0 else f"{c:>10s}" for i, c in enumerate(row))
                print(" | ".join(cells), flush=True)
        if DECODED_HERE:
            print(
                f"\n* encoded by hivemind, decoded by this bench: hivemind's decoder fails under "
                f"numpy {numpy_version()} (int() of a 1-element array).\n  Same format and "
                "lookup, so the error is hivemind's; dec GB/s is this bench's decoder."
            )
        print()
        current[0] = "GPU throughput"
        print(gpu_throughput(args.size))


if __name__ == "__main__":
    main()
