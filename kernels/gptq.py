"""GPTQ (Frantar et al., 2022) for our 4-bit block format: codes are chosen column by column
and each column's rounding error is pushed onto the columns not yet quantized, through the
upper Cholesky factor of H^-1 (H = X^T X of the layer's inputs), so that X @ W^T moves least.

Used by swarm.model.calibrate. The result is an ordinary kernels.fourbit.FourBitWeight (same
codes, same double-quantized block scales), read by the same decoders as round-to-nearest.
Block scales are fixed before the column pass ("static groups"): the double quantization of
the scales needs all of them at once, and the decoder's scale is then the one codes are chosen
against. Each block scale is searched (clip ratios of the block absmax) for the least
diag(H)-weighted error of round-to-nearest, as GPTQ's `mse` grid does.
"""

from __future__ import annotations

import torch

from kernels.fourbit import (
    BLOCK,
    FourBitWeight,
    _check_kind,
    block_absmax,
    codebook,
    dequantize_absmax,
    midpoints,
    pack,
    quantize_absmax,
    unpack,
)
from kernels.reference import QuantizationError

# Clip ratios tried for every block scale (1.0: plain absmax, as round-to-nearest uses).
CLIP_GRID = tuple(1.0 - 0.025 * k for k in range(13))
_GPTQ_COLUMNS = 128  # columns updated eagerly; the rest get one matmul per group (lazy batch)


def _check(w: torch.Tensor) -> tuple[int, int]:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.numel() == 0:
        raise QuantizationError(f"GPTQ needs a non-empty [out, in] weight; got {type(w)}")
    return w.shape[0], w.shape[1]


def _blocks(flat: torch.Tensor) -> torch.Tensor:
    """flat [n] as [ceil(n / BLOCK), BLOCK] rows of the block layout, zero-padded at the end."""
    pad = -flat.numel() % BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)


def add_to_hessian(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """h += X^T X for inputs x [..., in] (float32 accumulation, in place); returns h."""
    x2d = x.detach().reshape(-1, x.shape[-1]).to(h.dtype)
    return h.addmm_(x2d.t(), x2d)


def _round(y: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, codebook values) of scaled values y: round to nearest, as encode_codes does."""
    codes = torch.bucketize(y, midpoints(kind, y.device))
    return codes, codebook(kind, y.device).index_select(0, codes.view(-1)).view(codes.shape)


def search_block_scales(
    w: torch.Tensor, h_diag: torch.Tensor | None, kind: str, grid=CLIP_GRID
) -> torch.Tensor:
    """float32 [ceil(numel / BLOCK)]: per block, the clipped absmax (ratio from `grid`) whose
    round-to-nearest error, weighted per input column by h_diag (None: unweighted), is least.
    """
    _check_kind(kind)
    out, n = _check(w)
    blocks = _blocks(w.detach().to(torch.float32).reshape(-1))
    col = torch.ones(n) if h_diag is None else h_diag.to(torch.float32).clamp_min(0)
    weight = _blocks(col.to(blocks.device).repeat(out))  # padding weighs nothing
    absmax = blocks.abs().amax(dim=1)
    best, best_err = absmax.clone(), None
    for ratio in grid:
        d = absmax * ratio
        safe = torch.where(d != 0, d, 1.0)[:, None]
        _, values = _round(torch.where(d[:, None] != 0, blocks / safe, 0.0), kind)
        err = ((blocks - values * d[:, None]) ** 2 * weight).sum(dim=1)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best = torch.where(better, d, best)
            best_err = torch.where(better, err, best_err)
    return best


def value_scales(d: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """float32 [out, in]: the block scale of every value (flat index // BLOCK; a block may
    span two rows when in is not a multiple of BLOCK).
    """
    return d.to(torch.float32).repeat_interleave(BLOCK)[: shape[0] * shape[1]].view(shape)


def gptq_codes(
    w: torch.Tensor,
    h: torch.Tensor,
    scale: torch.Tensor,
    kind: str,
    damp: float = 0.01,
    act_order: bool = True,
    kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 [out, in] codes of w [out, in] against fixed per-value scales [out, in]
    (value_scales), chosen by GPTQ with Hessian h [in, in] (dampened by damp * mean(diag(h))).
    act_order: quantize the inputs of largest diag(h) first, while most columns are left to
    take up their error (the scales are fixed, so any order keeps the block layout).
    kept: int64 [k] input columns kept in float16 beside the codes: they go first (so their
    values are w's own), get the zero code, and only their float16 rounding spreads onwards.
    """
    k = 0 if kept is None else kept.numel()
    if act_order or k:
        _check(w)
        if h.shape != (w.shape[1], w.shape[1]):
            raise QuantizationError(f"Hessian of shape {tuple(h.shape)} for {tuple(w.shape)}")
        key = torch.diagonal(h).to(torch.float64) if act_order else torch.zeros(w.shape[1])
        if k:
            key = key.clone()
            key[kept] = float("inf")
        perm = torch.argsort(key, descending=True, stable=True)  # kept ones first
        codes = _gptq_codes(w[:, perm], h[perm][:, perm], scale[:, perm], kind, damp, k)
        return codes[:, torch.argsort(perm)]
    return _gptq_codes(w, h, scale, kind, damp, 0)


def _gptq_codes(
    w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, kind: str, damp: float, kept: int
) -> torch.Tensor:
    """gptq_codes in the given column order, its first `kept` columns kept in float16."""
    _check_kind(kind)
    out, n = _check(w)
    if h.shape != (n, n):
        raise QuantizationError(f"Hessian of shape {tuple(h.shape)} for a weight with {n} inputs")
    W = w.detach().to(torch.float32).clone()
    H = h.detach().to(torch.float64).clone()
    dead = torch.diagonal(H) == 0  # inputs never seen: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    # U: upper Cholesky factor of H^-1; row i holds how column i's error spreads onwards.
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    U = torch.linalg.cholesky(hinv, upper=True).to(torch.float32)
    if scale.shape != W.shape:
        raise QuantizationError(f"scales of shape {tuple(scale.shape)} for {tuple(W.shape)}")
    # Columns as contiguous rows: the pass reads one input column of every output at a time.
    Wt, St = W.t().contiguous(), scale.to(torch.float32).t().contiguous()
    inv = torch.where(St != 0, 1.0 / torch.where(St != 0, St, 1.0), 0.0)  # 0: the zero code
    table, mids = codebook(kind, W.device), midpoints(kind, W.device)
    zero_code = int(torch.bucketize(torch.zeros(1, device=W.device), mids))
    codes = torch.empty(n, out, dtype=torch.uint8, device=W.device)
    for c0 in range(0, n, _GPTQ_COLUMNS):
        c1 = min(c0 + _GPTQ_COLUMNS, n)
        W1, U1 = Wt[c0:c1], U[c0:c1, c0:c1]
        err = torch.empty(c1 - c0, out, device=W.device)
        for j in range(c1 - c0):
            i = c0 + j
            col = W1[j]
            if i < kept:
                codes[i] = zero_code
                e = (col - col.to(torch.float16).to(torch.float32)).div_(U1[j, j])
            else:
                code = torch.bucketize(col * inv[i], mids)
                codes[i] = code
                e = (col - table.index_select(0, code) * St[i]).div_(U1[j, j])
            W1[j + 1 :].addr_(U1[j, j + 1 :], e, alpha=-1.0)
            err[j] = e
        Wt[c1:].addmm_(U[c0:c1, c1:].t(), err, alpha=-1.0)
    return codes.t().contiguous()


def refine_block_scales(q: FourBitWeight, w: torch.Tensor, h: torch.Tensor, damp: float) -> None:
    """Re-fit, in place, q's block scales to its codes: per output row, the scales that least
    move X @ W^T (H = X^T X, dampened as GPTQ's) given the codes GPTQ chose, a small linear
    system per row; then double-quantized again. Skipped when a block would span two rows.
    """
    out, n = _check(w)
    if n % BLOCK or h.shape != (n, n):
        return
    nb = n // BLOCK
    H = h.detach().to(torch.float32).clone()
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    d_old = q.absmax().view(out, nb)
    codes = unpack(q.packed, q.numel).to(torch.int64)
    values = codebook(q.kind, w.device).index_select(0, codes).view(out, nb, BLOCK)
    target = w.detach().to(torch.float32).clone()
    if q.kept:  # kept columns hold their float16 values beside the (zero) codes
        target.index_add_(1, q.kept_cols.to(torch.int64), -q.kept_values.to(torch.float32))
    # T[o, i, c]: H[i, block c] @ values[o, block c]; M[o, b, c] = values[o, b] . T[o, b, c]
    T = torch.einsum("ick,ock->oic", H.view(n, nb, BLOCK), values)
    M = torch.einsum("obk,obkc->obc", values, T.view(out, nb, BLOCK, nb))
    rhs = torch.einsum("obk,obk->ob", values, (target @ H).view(out, nb, BLOCK))
    # A ridge toward the old scales: blocks of all-zero codes leave their row singular.
    ridge = 1e-4 * torch.diagonal(M, dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
    M.diagonal(dim1=1, dim2=2).add_(ridge[:, None])
    d = torch.linalg.solve(M.double(), (rhs + ridge[:, None] * d_old).double()).float()
    d = torch.minimum(torch.maximum(d, 0.5 * d_old), 2.0 * d_old).reshape(-1)
    q.absmax_codes, q.absmax_scales, q.absmax_mean = quantize_absmax(d)


def gptq_quantize_4bit(
    weights: list[torch.Tensor],
    h: torch.Tensor,
    kind: str = "nf4",
    damp: float = 0.01,
    clip: bool = True,
    act_order: bool = True,
    keep: float = 0.0,
    refine: bool = False,
) -> list[FourBitWeight]:
    """GPTQ-quantize weights that share one input (and so one Hessian h [in, in]): q, k and v
    projections, or gate and up. Each weight gets its own double-quantized block scales; the
    column pass runs once over their rows stacked. Returns one FourBitWeight per weight.

    keep: fraction of input columns kept in float16 (SpQR-style outliers, whole columns so
    that an index costs 4 bytes per column): those of largest saliency diag(h) * |W[:, j]|^2,
    the inputs whose rounding would cost most. About 2 * keep bytes per parameter more.
    refine: re-fit the block scales to the chosen codes afterwards (refine_block_scales).
    """
    if not weights:
        return []
    n = weights[0].shape[-1]
    if h.shape != (n, n) or any(w.dim() != 2 or w.shape[1] != n for w in weights):
        raise QuantizationError(
            f"Hessian of shape {tuple(h.shape)} for weights of shapes "
            f"{[tuple(w.shape) for w in weights]}: all need {tuple(h.shape)[:1]} inputs"
        )
    for w in weights:
        _check(w)
        if not bool(torch.isfinite(w).all()):
            raise QuantizationError("cannot quantize a weight holding NaN or inf")
    stacked = torch.cat([w.detach().to(torch.float32) for w in weights])
    k = min(n, int(keep * n))
    kept = None
    if k:
        saliency = torch.diagonal(h).to(torch.float32) * (stacked**2).sum(dim=0)
        kept = torch.sort(torch.topk(saliency, k).indices).values
    scales = []  # per weight: (absmax codes, absmax scales, mean, dequantized block scales)
    for w in weights:
        if kept is not None:  # kept columns must not widen their blocks' scales
            w = w.detach().to(torch.float32).index_fill(1, kept, 0.0)
        if clip:
            raw = search_block_scales(w, torch.diagonal(h), kind)
        else:
            raw = block_absmax(w.detach().reshape(-1))
        codes8, s, mean = quantize_absmax(raw)
        d = dequantize_absmax(codes8, s, mean)
        scales.append((codes8, s, mean, value_scales(d, tuple(w.shape))))
    all_scales = torch.cat([sc[3] for sc in scales])
    codes = gptq_codes(stacked, h, all_scales, kind, damp, act_order, kept)
    out, row = [], 0
    for w, (codes8, s, mean, _) in zip(weights, scales, strict=True):
        rows = slice(row, row + w.shape[0])
        packed = pack(codes[rows].reshape(-1))
        q = FourBitWeight(packed, codes8, s, mean, tuple(w.shape), kind)
        if kept is not None:
            q.kept_cols = kept.to(torch.int32)
            q.kept_values = stacked[rows].index_select(1, kept).to(torch.float16)
        if refine:
            refine_block_scales(q, w, h, damp)
        out.append(q)
        row += w.shape[0]
    return out
