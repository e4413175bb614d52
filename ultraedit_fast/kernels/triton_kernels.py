"""Triton kernels for the three hot steps (semantics: :mod:`ultraedit_fast.kernels.ops`).

Each op is a private ``@triton.jit`` kernel and a host launcher with the same
signature and semantics as the default kernel in :mod:`ultraedit_fast.kernels.ops`:

``normalizer_update_(mean, acc, std, ks, gs, n)``
    One launch for the ``k`` columns and one for the ``g`` columns, whatever the
    number of blocks: a program owns ``BLOCK_D`` columns and merges every block
    into them in order, the state staying in registers between blocks.  Within
    a block rows are reduced chunk by chunk (chunk mean and squared deviations
    from it, merged with Chan's formula), which is one pass over the rows and
    free of the cancellation of sum/sum-of-squares when ``|mean| >> std``.
``shift_values(k, g, mean, std, lr) -> V``
    One program per row: one pass over ``k``'s row for ``|k_hat|^2``, one over
    ``g``'s row writing ``V``.
``rank_update_(w, a, k, transposed)``
    A tiled ``tl.dot`` matmul with a float32 accumulator and an in-place
    epilogue that loads ``w``'s tile, adds, and stores it in ``w``'s dtype: one
    rounding, no temporary of ``w``'s size.  Precision policy, by ``w``'s dtype
    (the same as the CUDA kernels'):

    * float32 ``w``: ``input_precision="ieee"``, true float32 products (the
      exact path; no tensor cores).
    * bfloat16/float16 ``w``: tensor cores, ``input_precision="tf32"`` with
      ``a`` and ``k`` rounded to TF32 to nearest in the kernel first (the
      tensor cores alone would truncate: twice the error, biased toward zero).
      An operand's relative error is then <= 2^-11, under half a bf16 ulp, and
      the update's error < 2^-10 * sum_i |a_i k_i|.  TF32 rather than bf16
      operands: bf16 ones (what ``w.addmm_(a.t().bfloat16(), k.bfloat16())``
      does) have a relative error of 2^-9, as large as ``w``'s own rounding.
      How often ``w``'s rounding differs from the exact one, measured:
      ``docs/kernels.md``.

    Under ``TRITON_INTERPRET=1`` the interpreter evaluates ``tl.dot`` in
    float32 whatever ``input_precision`` says; the explicit TF32 rounding of
    the operands makes it compute what the tensor cores compute (up to the
    order of the float32 sums), so the CPU tests check the TF32 numerics too.

They run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set
before ``triton`` is first imported), which is how the CPU-only CI checks them.
The launchers' host-side plumbing (device checks, stacking the blocks) is in
:mod:`ultraedit_fast.kernels.triton_host`.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import triton
import triton.language as tl

from .ops import EPS, check_no_alias
from .triton_host import check_device, has_overlap, interpreting, on_device, stacked_rows

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- normaliser
@triton.jit
def _block_moments(x_ptr, cols, cmask, r0, r1, width, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Mean and sum of squared deviations of rows [r0, r1) of x in columns ``cols``,
    # BLOCK_M rows at a time: each chunk's mean and squared deviations from it,
    # merged into the running ones with Chan's formula.
    cnt = tl.zeros([BLOCK_D], dtype=tl.float32)
    bmean = tl.zeros([BLOCK_D], dtype=tl.float32)
    bm2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    for rs in range(r0, r1, BLOCK_M):
        rows = rs + tl.arange(0, BLOCK_M)
        rmask = rows < r1
        msk = rmask[:, None] & cmask[None, :]
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * width + cols[None, :], mask=msk, other=0.0
        ).to(tl.float32)
        c = tl.sum(rmask.to(tl.float32), axis=0)
        cmean = tl.div_rn(tl.sum(x, axis=0), c)
        dev = tl.where(msk, x - cmean[None, :], 0.0)
        cm2 = tl.sum(dev * dev, axis=0)
        tot = cnt + c
        d = cmean - bmean
        bmean = bmean + d * tl.div_rn(c, tot)
        bm2 = bm2 + cm2 + d * d * tl.div_rn(cnt * c, tot)
        cnt = tot
    return bmean, bm2


@triton.jit
def _normalizer_kernel(
    x_ptr,
    offs_ptr,
    nblocks,
    mean_ptr,
    acc_ptr,
    std_ptr,
    width,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # offs_ptr[b] = rows merged before block b (n + rows of blocks < b), int64:
    # the counts pass 2**24 in long runs, so they stay integers and the
    # scalar factors are formed in float64.
    pid = tl.program_id(0)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < width
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    acc = tl.load(acc_ptr + cols, mask=cmask, other=0.0)
    base = tl.load(offs_ptr)
    for b in range(nblocks):
        s0 = tl.load(offs_ptr + b)
        s1 = tl.load(offs_ptr + b + 1)
        bmean, bm2 = _block_moments(
            x_ptr, cols, cmask, s0 - base, s1 - base, width, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D
        )
        n = s0.to(tl.float64)
        m = (s1 - s0).to(tl.float64)
        n_new = tl.maximum(n + m, 1.0)
        # An empty block changes nothing (f = 0); a one-row block merges with
        # var_rows = 0 (var_scale = 0); docs/algorithm.md section 3 keeps m * var_rows.
        f = (m / n_new).to(tl.float32)
        nf = (n * m / n_new).to(tl.float32)
        var_scale = tl.where(m > 1.0, m / tl.maximum(m - 1.0, 1.0), 0.0).to(tl.float32)
        delta = bmean - mean
        mean = mean + delta * f
        acc = acc + var_scale * bm2 + delta * delta * nf
    n_end = tl.load(offs_ptr + nblocks).to(tl.float64)
    denom = (n_end - 1.0 + eps).to(tl.float32)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(acc_ptr + cols, acc, mask=cmask)
    tl.store(std_ptr + cols, tl.sqrt_rn(tl.div_rn(acc, denom)), mask=cmask)


def _check_normalizer_state(
    op: str, mean: torch.Tensor, acc: torch.Tensor, std: torch.Tensor
) -> None:
    """The state tensors: contiguous float32 vectors of one length."""
    D = mean.numel()
    for name, t in (("mean", mean), ("acc", acc), ("std", std)):
        if t.dtype != torch.float32 or t.dim() != 1 or t.numel() != D or not t.is_contiguous():
            raise ValueError(
                f"{op}: {name} must be contiguous float32 of shape [{D}], got {t.dtype} {tuple(t.shape)}"
            )


def _block_rows(
    op: str, ks: Sequence[torch.Tensor], gs: Sequence[torch.Tensor], d_in: int, d_out: int
) -> List[int]:
    """The rows of each (k, g) block, after checking their shapes and dtypes."""
    rows: List[int] = []
    for i, (k, g) in enumerate(zip(ks, gs)):
        if (
            k.dim() != 2
            or g.dim() != 2
            or k.shape[0] != g.shape[0]
            or k.shape[1] != d_in
            or g.shape[1] != d_out
        ):
            raise ValueError(
                f"{op}: block {i}: expected ks[i] (m x {d_in}) and gs[i] "
                f"(m x {d_out}), got {tuple(k.shape)} and {tuple(g.shape)}"
            )
        if k.dtype not in _FLOATS or g.dtype not in _FLOATS:
            raise TypeError(
                f"{op}: block {i}: ks/gs must be float32, bfloat16 or float16, got {k.dtype} and {g.dtype}"
            )
        rows.append(k.shape[0])
    return rows


def _launch_normalizer(K, G, offs, nblocks, mean, acc, std, d_in, d_out, dev) -> None:
    """One launch over ``K``'s columns (the state's first ``d_in``), one over ``G``'s."""
    small = interpreting()
    BLOCK_M, BLOCK_D = (16, 32) if small else (32, 64)
    with on_device(dev):
        for x, width, off in ((K, d_in, 0), (G, d_out, d_in)):
            if width == 0:
                continue
            grid = (triton.cdiv(width, BLOCK_D),)
            _normalizer_kernel[grid](
                x,
                offs,
                nblocks,
                mean[off:],
                acc[off:],
                std[off:],
                width,
                EPS,
                BLOCK_M=BLOCK_M,
                BLOCK_D=BLOCK_D,
            )


def normalizer_update_(
    mean: torch.Tensor,
    acc: torch.Tensor,
    std: torch.Tensor,
    ks: Sequence[torch.Tensor],
    gs: Sequence[torch.Tensor],
    n: int,
) -> None:
    op = "triton normalizer_update_"
    if len(ks) != len(gs):
        raise ValueError(f"{op}: ks and gs must have the same length, got {len(ks)} and {len(gs)}")
    if n < 0:
        raise ValueError(f"{op}: n (rows merged so far) must be >= 0, got {n}")
    _check_normalizer_state(op, mean, acc, std)
    if not ks:
        return
    d_in = ks[0].shape[1] if ks[0].dim() == 2 else -1
    d_out = mean.numel() - d_in
    rows = _block_rows(op, ks, gs, d_in, d_out)
    dev = check_device(op, mean, acc, std, *ks, *gs)
    if sum(rows) == 0:
        return  # nothing merged: state unchanged, as in the default kernel
    offs = torch.tensor([n] + rows, dtype=torch.int64).cumsum(0).to(dev)
    K = stacked_rows(ks)
    G = stacked_rows(gs)
    _launch_normalizer(K, G, offs, len(rows), mean, acc, std, d_in, d_out, dev)


# --------------------------------------------------------------------------- shift values
@triton.jit
def _shift_values_kernel(
    k_ptr, g_ptr, mean_ptr, std_ptr, v_ptr, d_in, d_out, neg_lr, eps, BLOCK: tl.constexpr
):
    r = tl.program_id(0).to(tl.int64)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, d_in, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        msk = j < d_in
        x = tl.load(k_ptr + r * d_in + j, mask=msk, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + j, mask=msk, other=0.0)
        sd = tl.load(std_ptr + j, mask=msk, other=1.0)
        z = tl.where(msk, tl.div_rn(x - mu, sd + eps), 0.0)
        s += z * z
    scale = neg_lr * tl.sum(s, axis=0)
    for j0 in range(0, d_out, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        msk = j < d_out
        x = tl.load(g_ptr + r * d_out + j, mask=msk, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + d_in + j, mask=msk, other=0.0)
        sd = tl.load(std_ptr + d_in + j, mask=msk, other=1.0)
        tl.store(v_ptr + r * d_out + j, scale * tl.div_rn(x - mu, sd + eps), mask=msk)


def shift_values(
    k: torch.Tensor, g: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, lr: float
) -> torch.Tensor:
    op = "triton shift_values"
    if k.dim() != 2 or g.dim() != 2 or k.shape[0] != g.shape[0]:
        raise ValueError(
            f"{op}: k (N x d_in) and g (N x d_out) must be 2-D with the same N, "
            f"got {tuple(k.shape)} and {tuple(g.shape)}"
        )
    N, d_in = k.shape
    d_out = g.shape[1]
    if mean.shape != (d_in + d_out,) or std.shape != (d_in + d_out,):
        raise ValueError(
            f"{op}: mean and std must have shape ({d_in + d_out},), "
            f"got {tuple(mean.shape)} and {tuple(std.shape)}"
        )
    if k.dtype not in _FLOATS or g.dtype not in _FLOATS:
        raise TypeError(
            f"{op}: k and g must be float32, bfloat16 or float16, got {k.dtype} and {g.dtype}"
        )
    if mean.dtype != torch.float32 or std.dtype != torch.float32:
        raise TypeError(f"{op}: mean and std must be float32, got {mean.dtype} and {std.dtype}")
    dev = check_device(op, k, g, mean, std)
    V = torch.empty((N, d_out), dtype=torch.float32, device=dev)
    if N == 0 or d_out == 0:
        return V
    BLOCK = 128 if interpreting() else 1024
    with on_device(dev):
        _shift_values_kernel[(N,)](
            k.contiguous(),
            g.contiguous(),
            mean.contiguous(),
            std.contiguous(),
            V,
            d_in,
            d_out,
            float(-lr),
            EPS,
            BLOCK=BLOCK,
        )
    return V


# --------------------------------------------------------------------------- rank update
@triton.jit
def _round_tf32(x):
    # float32 -> TF32 (10 mantissa bits) to nearest, ties away from zero: what
    # CUDA's cvt.rna.tf32.f32 (wmma::__float_to_tf32) does.  Without it the
    # tensor cores would use the truncated bits (twice the error, and biased
    # toward zero).  Inf stays Inf; NaN is passed through as it is (adding to
    # its bits could make an Inf of some NaN payloads).
    u = x.to(tl.uint32, bitcast=True)
    r = ((u + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(x == x, r, x)


@triton.jit
def _rank_update_kernel(
    w_ptr,
    l_ptr,
    r_ptr,
    N,
    R,
    C,
    ws0,
    ws1,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    TF32: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    # w (R x C) += L^T @ Rm,  L: N x R and Rm: N x C row-major float32.
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask = rows < R
    cmask = cols < C
    ks = tl.arange(0, BK)
    # Pointers to the first BK rows of the two operand tiles, advanced by BK rows
    # a step (pointer arithmetic is 64-bit; the offsets within a step are small).
    lp = l_ptr + ks[None, :] * R + rows[:, None]  # BM x BK: L^T's tile
    rp = r_ptr + ks[:, None] * C + cols[None, :]  # BK x BN: Rm's tile
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, N, BK):
        kmask = ks < N - k0
        lt = tl.load(lp, mask=rmask[:, None] & kmask[None, :], other=0.0)
        rt = tl.load(rp, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if TF32:
            # 16-bit w: TF32 tensor cores (wgmma on sm_90, mma.sync on sm_80),
            # operands rounded to nearest first.
            acc = tl.dot(_round_tf32(lt), _round_tf32(rt), acc, input_precision="tf32")
        else:
            # float32 w: true float32 products.
            acc = tl.dot(lt, rt, acc, input_precision="ieee")
        lp += BK * R
        rp += BK * C
    wmask = rmask[:, None] & cmask[None, :]
    wp = w_ptr + rows[:, None].to(tl.int64) * ws0 + cols[None, :].to(tl.int64) * ws1
    if BF16_BITS:
        # bfloat16 w handled as its bits: widen by a shift, round to nearest even
        # by hand.  Triton's interpreter (3.9) flushes bf16 subnormals on load and
        # truncates float32 -> bf16 casts (even with fp_downcast_rounding="rtne");
        # on bits, the interpreted and compiled kernels agree with torch exactly.
        wp16 = wp.to(tl.pointer_type(tl.uint16))
        bits = tl.load(wp16, mask=wmask, other=0).to(tl.uint32)
        out = (bits << 16).to(tl.float32, bitcast=True) + acc
        u = out.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(out != out, 0x7FC0, r)  # NaN -> the quiet NaN torch produces
        tl.store(wp16, r.to(tl.uint16), mask=wmask)
    else:
        wt = tl.load(wp, mask=wmask, other=0.0)
        tl.store(wp, (wt.to(tl.float32) + acc).to(w_ptr.dtype.element_ty), mask=wmask)


# Launch configurations (BM, BN, BK, num_warps, num_stages).  No @triton.autotune:
# it would run the in-place kernel repeatedly on the caller's w, and its
# restore_value would clone w, the w-sized temporary this op exists to avoid.
# Chosen for an H100 (sm_90), UNMEASURED: the TF32 tile is 128 x 128 (m64n128k8
# wgmmas, two warpgroups), BK = 32 in 3 stages: 80 KB of shared memory, 149
# registers, no spills (compiled for sm_90 with a unit column stride, which
# Triton specialises on; the operands, MN-major, are staged through registers
# into wgmma's K-major layout, where the TF32 rounding costs a few integer ops).
# Every candidate of RANK_CONFIGS_TO_TRY compiles for sm_90 without spills and
# within 180 KB of shared memory; benchmarks/bench_ops.py times them on the
# Mistral-7B down_proj: make the fastest the default.
_RANK_CONFIG_TF32 = (128, 128, 32, 8, 3)
_RANK_CONFIG_IEEE = (64, 64, 32, 4, 3)  # Triton's default num_stages
_RANK_CONFIG_INTERPRET = (32, 32, 16, 4, 1)
RANK_CONFIGS_TO_TRY = [
    (128, 128, 32, 8, 3),
    (128, 128, 32, 8, 4),
    (128, 128, 64, 8, 3),
    (128, 128, 16, 8, 5),
    (128, 256, 32, 8, 3),
    (256, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
]


def rank_update_(w: torch.Tensor, a: torch.Tensor, k: torch.Tensor, transposed: bool) -> None:
    op = "triton rank_update_"
    if w.dim() != 2 or a.dim() != 2 or k.dim() != 2 or a.shape[0] != k.shape[0]:
        raise ValueError(
            f"{op}: w, a (N x d_out) and k (N x d_in) must be 2-D with the same N, "
            f"got {tuple(w.shape)}, {tuple(a.shape)} and {tuple(k.shape)}"
        )
    N, d_out = a.shape
    d_in = k.shape[1]
    R, C = (d_in, d_out) if transposed else (d_out, d_in)
    if tuple(w.shape) != (R, C):
        raise ValueError(
            f"{op}: w must have shape {(R, C)} for a {tuple(a.shape)}, "
            f"k {tuple(k.shape)} and transposed={transposed}, got {tuple(w.shape)}"
        )
    if w.dtype not in _FLOATS or a.dtype not in _FLOATS or k.dtype not in _FLOATS:
        raise TypeError(
            f"{op}: w, a and k must be float32, bfloat16 or float16, got {w.dtype}, {a.dtype} and {k.dtype}"
        )
    if has_overlap(w):
        raise ValueError(
            f"{op}: w has overlapping memory (e.g. an expanded view); it cannot be updated in place"
        )
    check_no_alias(op, w, a, k)
    dev = check_device(op, w, a, k)
    if N == 0 or w.numel() == 0:
        return
    a32 = a.to(torch.float32).contiguous()  # small (N rows)
    k32 = k.to(torch.float32).contiguous()
    L, Rm = (k32, a32) if transposed else (a32, k32)
    _launch_rank_update(w, L, Rm, dev, None)


def _launch_rank_update(w, L, Rm, dev, config) -> None:
    """w (R x C) += L^T Rm; ``config`` (BM, BN, BK, num_warps, num_stages) or None for
    the default of w's dtype (benchmarks/bench_ops.py passes its candidates)."""
    N, R = L.shape
    C = Rm.shape[1]
    tf32 = w.dtype != torch.float32
    if config is None:
        if interpreting():
            config = _RANK_CONFIG_INTERPRET
        else:
            config = _RANK_CONFIG_TF32 if tf32 else _RANK_CONFIG_IEEE
    BM, BN, BK, warps, stages = config
    grid = (triton.cdiv(R, BM), triton.cdiv(C, BN))
    with on_device(dev):
        _rank_update_kernel[grid](
            w,
            L,
            Rm,
            N,
            R,
            C,
            w.stride(0),
            w.stride(1),
            BM=BM,
            BN=BN,
            BK=BK,
            TF32=tf32,
            BF16_BITS=w.dtype == torch.bfloat16,
            num_warps=warps,
            num_stages=stages,
        )
