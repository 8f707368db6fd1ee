"""Depthwise 2-D convolution (groups == channels, stride 1, 'same' padding, odd kernel) in Triton.

Why: timm's ConvMixer spends almost all of its training time in cuDNN's depthwise kernel (9x9,
~2 TFLOP/s on an H100: 30.5 ms fwd+bwd per layer at 512x256x32x32 vs 2.5 ms for the 1x1 conv).

Public API
----------
``dwconv2d(x, weight, bias=None, impl=None)``
    ``x`` (N, C, H, W), ``weight`` (C, 1, k, k), ``bias`` (C,) or None.  Triton kernels when ``x`` is
    on CUDA (and triton imports) or when ``ETC_DATA_TRITON_INTERPRET=1`` / ``TRITON_INTERPRET=1``
    is set (Triton's CPU interpreter, for tests); ``F.conv2d`` otherwise.
``DepthwiseConv2d(channels, kernel_size, bias=True)``
    A subclass of ``nn.Conv2d(C, C, k, groups=C, padding=k//2)`` with the same parameters (weight
    (C,1,k,k), bias (C,)) and init; only ``forward`` differs.
``patch_convmixer(model)``
    Swaps every depthwise ``nn.Conv2d`` (e.g. ``blocks[i][0].fn[0]`` of a timm ConvMixer) for a
    ``DepthwiseConv2d`` reusing the same Parameter objects, so state_dict keys are unchanged.

Implementations (``impl`` argument or env ``ETC_DATA_DWCONV_IMPL``)
--------------------------------------------------------------------
``"mma"`` (default for ``"auto"``): tensor cores.  A k x k depthwise conv of one plane is a sum of k
    matrix products: for each kernel row ``kh``, the input rows shifted by ``kh - p`` (an M x W
    tile) times a banded Toeplitz matrix ``T_kh`` (W x W, ``T_kh[j, w] = weight[kh, j - w + p]``)
    that applies the k taps of row ``kh`` along the width.  That spends W/k times more FLOPs than
    the direct sum (32/9 for CIFAR ConvMixer) but they run on tensor cores (bf16: ~10x more
    FLOP/s than FMA, and 9 loads per output instead of 81).  All images of one channel share the
    same ``T``, so several images are stacked along M (rows = (image, row)) to give M = 64..128.
    The ``T`` matrices (C, k, BK, BW) are built once per call with torch (a few MB) and streamed
    from L2 as plain 2-D tiles.  Widths above 64 are cut into column tiles that load a halo of
    ``p`` columns each side (K dim = next_pow2(BW + 2p)).
    Input gradient: the same kernel with the kernel flipped (dx = conv(dy, flip(w))).
    Weight gradient: for kernel row ``i``, ``G_i = dY^T @ X_i`` (BW x BK, X_i = input rows shifted
    by ``i - p``) is accumulated over all images/rows of a channel on tensor cores (contraction over
    (image, row)), and ``dW[i, j]`` is the sum of ``G_i``'s diagonal ``j`` -- extracted once per
    program at the end.  One program per (channel, group of IPP=3 (or 1) kernel rows, batch split):
    the dY tile is loaded once for the IPP rows; the per-split partial sums are written to a
    (SPLIT, C, k*k) buffer and summed by torch (two-stage, deterministic, no atomics).  The bias
    gradient rides along in the same pass.
    fp32 operands use ``input_precision="tf32x3"`` (3 TF32 MMAs, ~fp32 accuracy); bf16/fp16 use
    one bf16/fp16 MMA with fp32 accumulation.  H and W are compile-time constants (one compile per
    spatial size) so row offsets/masks are provably 16-byte aligned and loads vectorize (W=56 too).
    Checked by compiling for sm_90 without a GPU (tests/test_dwconv.py): wgmma, cp.async pipelining,
    no register spills for the CIFAR ConvMixer shapes.
``"direct"``: plain FMA kernels (one program per (plane, spatial tile), k*k shifted loads from L1,
    weights as scalars in registers; the weight gradient reduces each tile per tap).  Exact fp32;
    kept as a reference / fallback and for comparison in ``benchmarks/bench_convmixer_gpu.py``.
``"torch"``: ``F.conv2d``.

Under ``torch.autocast`` the input is cast to the autocast dtype (as autocast does for conv2d),
the weight stays fp32 (cast to the compute dtype inside), the output has the input's (autocast)
dtype and the weight/bias gradients are returned in the parameters' dtype.

On CUDA the MMA kernels are autotuned (<= 12 configs per shape and kernel: images per tile, warps,
pipeline stages, rows per program; first call only, results cached by triton; disable with
``ETC_DATA_DWCONV_AUTOTUNE=0`` to use the built-in heuristic).  ``ETC_DATA_DWCONV_SPLIT`` forces the
number of batch splits of the weight gradient.  Nothing here has been timed on a GPU yet: run
``benchmarks/bench_convmixer_gpu.py`` on the H100.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

if os.environ.get("ETC_DATA_TRITON_INTERPRET") == "1":  # must precede the @triton.jit decorations below
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None
    tl = None
    HAVE_TRITON = False

__all__ = ["DepthwiseConv2d", "dwconv2d", "patch_convmixer", "triton_enabled", "interpret_mode"]

_IMPLS = ("auto", "mma", "direct", "torch")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpret_mode() -> bool:
    """True when Triton runs in its CPU interpreter (kernels take CPU tensors)."""
    return HAVE_TRITON and (os.environ.get("TRITON_INTERPRET") == "1"
                            or os.environ.get("ETC_DATA_TRITON_INTERPRET") == "1")


def triton_enabled(x: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether ``dwconv2d`` would run the Triton kernels for ``x`` (computed in ``dtype``, default x's)."""
    if not HAVE_TRITON or (dtype or x.dtype) not in _DTYPES or x.numel() == 0:
        return False
    if interpret_mode():
        return x.device.type == "cpu"
    return x.is_cuda


def _autotune_enabled() -> bool:
    return not interpret_mode() and os.environ.get("ETC_DATA_DWCONV_AUTOTUNE", "1") != "0"


def _np2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _mma_conv_kernel(x_ptr, t_ptr, b_ptr, y_ptr, N, C, H_TILES, W_TILES,
                         H: tl.constexpr, W: tl.constexpr, K: tl.constexpr, PAD: tl.constexpr,
                         HALO: tl.constexpr, HAS_BIAS: tl.constexpr, NB: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr,
                         PREC: tl.constexpr, DOT_F32: tl.constexpr):
        """y[n, c, h0:h0+BH, w0:w0+BW] for NB images of one channel: sum_kh X_shift(kh) @ T[c, kh].

        Rows of the MMA are (image, row) pairs: M = NB * BH.  Columns (N dim) are output columns
        w0 + [0, BW); the contraction (K dim) runs over input columns: [0, BK) when the whole width
        is one tile (HALO=False: out-of-image columns are zero padding, never loaded), else
        w0 - PAD + [0, BK) (HALO=True).  T[c, kh] is (BK, BW) with T[j, w] = weight[kh, j - w + OFF].
        """
        pid = tl.program_id(0)
        wt = pid % W_TILES
        tmp = pid // W_TILES
        ht = tmp % H_TILES
        tmp = tmp // H_TILES
        n_blocks = tl.cdiv(N, NB)
        nb = tmp % n_blocks
        c = tmp // n_blocks  # channel slowest: neighbouring programs share T[c] in L2

        r = tl.arange(0, NB * BH)
        n = nb * NB + r // BH
        h = ht * BH + r % BH
        row_ok = (n < N) & (h < H)
        plane = (n.to(tl.int64) * C + c) * H * W  # (M,) int64: >2**31 elements are fine

        wo = wt * BW + tl.arange(0, BW)  # output columns
        if HALO:
            ci = wt * BW - PAD + tl.arange(0, BK)  # input columns incl. halo
        else:
            ci = tl.arange(0, BK)
        ci_ok = (ci >= 0) & (ci < W)

        t_base = t_ptr + c.to(tl.int64) * (K * BK * BW)
        t_off = tl.arange(0, BK)[:, None] * BW + tl.arange(0, BW)[None, :]

        acc = tl.zeros((NB * BH, BW), dtype=tl.float32)
        for kh in range(K):  # dynamic loop: lets Triton pipeline the loads of step kh+1 under the MMA of kh
            hi = h + (kh - PAD)
            a_mask = (row_ok & (hi >= 0) & (hi < H))[:, None] & ci_ok[None, :]
            a = tl.load(x_ptr + (plane + hi * W)[:, None] + ci[None, :], mask=a_mask, other=0.0)
            t = tl.load(t_base + kh * (BK * BW) + t_off)
            if DOT_F32:  # interpreter only: its tl.dot mishandles bf16 (stored as uint16); products are exact in fp32
                a = a.to(tl.float32)
                t = t.to(tl.float32)
            acc = tl.dot(a, t, acc, input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + c).to(tl.float32)
        y_mask = row_ok[:, None] & (wo < W)[None, :]
        tl.store(y_ptr + (plane + h * W)[:, None] + wo[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)

    @triton.jit
    def _wgrad_rows(x_ptr, plane, h, row_ok, ci, ci_ok, dyt, g, i, H: tl.constexpr, W: tl.constexpr,
                    PAD: tl.constexpr, K: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr):
        """g += dy^T @ X_i, X_i = the input rows shifted by i - PAD (rows with i >= K contribute nothing)."""
        hi = h + (i - PAD)
        ok = row_ok & (hi >= 0) & (hi < H) & (i < K)
        xs = tl.load(x_ptr + (plane + hi * W)[:, None] + ci[None, :], mask=ok[:, None] & ci_ok[None, :], other=0.0)
        if DOT_F32:  # interpreter only (see _mma_conv_kernel)
            xs = xs.to(tl.float32)
        return tl.dot(dyt, xs, g, input_precision=PREC)

    @triton.jit
    def _wgrad_store(g, pw_ptr, s, c, C, i, cw, ck, K: tl.constexpr, OFF: tl.constexpr):
        """dW[c, i, j] = sum_w G[w, w + j - OFF] (diagonal sums of G), written to the split's partial row."""
        d = ck[None, :] - cw[:, None] + OFF  # kernel column each entry of G belongs to
        out = pw_ptr + ((s * C + c) * K + i) * K
        for j in tl.static_range(K):
            tl.store(out + j, tl.sum(tl.sum(tl.where(d == j, g, 0.0), axis=1), axis=0), mask=i < K)

    @triton.jit
    def _mma_wgrad_kernel(x_ptr, dy_ptr, pw_ptr, pb_ptr, N, C, SPLIT, N_PER, H_TILES, W_TILES,
                          H: tl.constexpr, W: tl.constexpr, K: tl.constexpr, PAD: tl.constexpr,
                          HALO: tl.constexpr, OFF: tl.constexpr,
                          HAS_BIAS: tl.constexpr, NB: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                          BK: tl.constexpr, IPP: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr):
        """Partial dW[c, i0:i0+IPP, :] (and db[c] when i0 == 0) over images [s*N_PER, (s+1)*N_PER).

        G_i = sum over (image, row) tiles of dY^T @ X_i   (BW x BK, fp32, tensor cores; contraction over
              M = NB*BH (image, row) pairs), for the IPP (1..3) kernel rows i of this program: the dY tile is
              loaded once for all of them and the shifted X tiles overlap (L1 hits).
        dW[c, i, j] = sum_w G_i[w, w + j - OFF]            (diagonal sums, once at the end)
        One flat loop over (image block, row tile, column tile) so Triton can pipeline the loads.
        """
        KG: tl.constexpr = (K + IPP - 1) // IPP
        pid = tl.program_id(0)
        i0 = (pid % KG) * IPP  # row group fastest: the KG programs of one (channel, split) read the same data
        tmp = pid // KG
        s = tmp % SPLIT
        c = tmp // SPLIT

        rr = tl.arange(0, NB * BH)
        cw = tl.arange(0, BW)
        ck = tl.arange(0, BK)
        n_lo = s * N_PER
        n_hi = tl.minimum(n_lo + N_PER, N)
        tiles = H_TILES * W_TILES
        n_iter = tl.cdiv(n_hi - n_lo, NB) * tiles

        g0 = tl.zeros((BW, BK), dtype=tl.float32)
        g1 = tl.zeros((BW, BK), dtype=tl.float32)
        g2 = tl.zeros((BW, BK), dtype=tl.float32)
        gb = tl.zeros((NB * BH, BW), dtype=tl.float32)
        for it in range(n_iter):
            t = it % tiles
            n = n_lo + (it // tiles) * NB + rr // BH
            h = (t // W_TILES) * BH + rr % BH
            wt = t % W_TILES
            row_ok = (n < n_hi) & (h < H)
            plane = (n.to(tl.int64) * C + c) * H * W
            wo = wt * BW + cw
            if HALO:
                ci = wt * BW - PAD + ck
            else:
                ci = ck
            ci_ok = (ci >= 0) & (ci < W)
            dy = tl.load(dy_ptr + (plane + h * W)[:, None] + wo[None, :],
                         mask=row_ok[:, None] & (wo < W)[None, :], other=0.0)
            if HAS_BIAS:
                gb += dy.to(tl.float32)
            if DOT_F32:
                dy = dy.to(tl.float32)
            dyt = tl.trans(dy)
            g0 = _wgrad_rows(x_ptr, plane, h, row_ok, ci, ci_ok, dyt, g0, i0, H, W, PAD, K, PREC, DOT_F32)
            if IPP >= 2:
                g1 = _wgrad_rows(x_ptr, plane, h, row_ok, ci, ci_ok, dyt, g1, i0 + 1, H, W, PAD, K, PREC, DOT_F32)
            if IPP >= 3:
                g2 = _wgrad_rows(x_ptr, plane, h, row_ok, ci, ci_ok, dyt, g2, i0 + 2, H, W, PAD, K, PREC, DOT_F32)

        _wgrad_store(g0, pw_ptr, s, c, C, i0, cw, ck, K, OFF)
        if IPP >= 2:
            _wgrad_store(g1, pw_ptr, s, c, C, i0 + 1, cw, ck, K, OFF)
        if IPP >= 3:
            _wgrad_store(g2, pw_ptr, s, c, C, i0 + 2, cw, ck, K, OFF)
        if HAS_BIAS:
            tl.store(pb_ptr + s * C + c, tl.sum(tl.sum(gb, axis=1), axis=0), mask=i0 == 0)

    @triton.jit
    def _direct_conv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W, W_TILES,
                            K: tl.constexpr, PAD: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BH: tl.constexpr, BW: tl.constexpr):
        """FMA version: one (plane, BH x BW tile) per program, k*k shifted (L1-cached) tile loads."""
        q = tl.program_id(0)  # plane n * C + c
        t = tl.program_id(1)
        c = q % C
        h = (t // W_TILES) * BH + tl.arange(0, BH)[:, None]
        w = (t % W_TILES) * BW + tl.arange(0, BW)[None, :]
        base = x_ptr + q.to(tl.int64) * H * W
        wbase = w_ptr + c * (K * K)
        acc = tl.zeros((BH, BW), dtype=tl.float32)
        for i in range(K):  # dynamic row loop, unrolled columns: K loads in flight (81 unrolled ones spill)
            hi = h + (i - PAD)
            r_ok = (hi >= 0) & (hi < H)
            for j in tl.static_range(K):
                wi = w + (j - PAD)
                if FLIP:
                    wv = tl.load(wbase + (K - 1 - i) * K + (K - 1 - j)).to(tl.float32)
                else:
                    wv = tl.load(wbase + i * K + j).to(tl.float32)
                xv = tl.load(base + hi * W + wi, mask=r_ok & (wi >= 0) & (wi < W), other=0.0)
                acc += xv.to(tl.float32) * wv
        if HAS_BIAS:
            acc += tl.load(b_ptr + c).to(tl.float32)
        tl.store(y_ptr + q.to(tl.int64) * H * W + h * W + w, acc.to(y_ptr.dtype.element_ty),
                 mask=(h < H) & (w < W))

    @triton.jit
    def _direct_wgrad_kernel(x_ptr, dy_ptr, pw_ptr, pb_ptr, N, C, H, W, SPLIT, N_PER, W_TILES, TILES,
                             K: tl.constexpr, PAD: tl.constexpr, HAS_BIAS: tl.constexpr, KK: tl.constexpr,
                             BH: tl.constexpr, BW: tl.constexpr):
        """FMA version: program (channel, split); each tile of dy is reduced against the k*k shifted x tiles."""
        c = tl.program_id(0)
        s = tl.program_id(1)
        kk = tl.arange(0, KK)
        acc = tl.zeros((KK,), dtype=tl.float32)
        accb = tl.zeros((BH, BW), dtype=tl.float32)
        n_lo = s * N_PER
        n_hi = tl.minimum(n_lo + N_PER, N)
        for n in range(n_lo, n_hi):
            base = (n * C + c).to(tl.int64) * H * W
            for t in range(TILES):
                h = (t // W_TILES) * BH + tl.arange(0, BH)[:, None]
                w = (t % W_TILES) * BW + tl.arange(0, BW)[None, :]
                dy = tl.load(dy_ptr + base + h * W + w, mask=(h < H) & (w < W), other=0.0).to(tl.float32)
                if HAS_BIAS:
                    accb += dy
                for i in range(K):
                    hi = h + (i - PAD)
                    r_ok = (hi >= 0) & (hi < H)
                    for j in tl.static_range(K):
                        wi = w + (j - PAD)
                        xv = tl.load(x_ptr + base + hi * W + wi, mask=r_ok & (wi >= 0) & (wi < W), other=0.0)
                        part = tl.sum(tl.sum(dy * xv.to(tl.float32), axis=1), axis=0)
                        acc += tl.where(kk == i * K + j, part, 0.0)
        tl.store(pw_ptr + (s * C + c) * (K * K) + kk, acc, mask=kk < K * K)
        if HAS_BIAS:
            tl.store(pb_ptr + s * C + c, tl.sum(tl.sum(accb, axis=1), axis=0))

    # ---- autotuned variants (CUDA only; the interpreter runs the plain kernels with the heuristic config)
    def _prune_conv(configs, named_args, **kw):
        """Keep configs with 16 <= M = NB*BH <= 128 and NB not beyond the batch; for the weight gradient
        (configs with IPP) 3 kernel rows per program only while the 3 fp32 accumulators fit (BW*BK <= 1024 and
        not tf32x3, or 8 warps), else 1 (ptxas -v for sm_90: no spills then)."""
        bh = kw.get("BH", named_args.get("BH"))
        small = kw.get("BW", 0) * kw.get("BK", 0) <= 1024 and kw.get("PREC") != "tf32x3"  # tf32x3 needs more regs
        n = named_args["N"]
        out = [cf for cf in configs if 16 <= cf.kwargs["NB"] * bh <= 128
               and (cf.kwargs["NB"] == 1 or cf.kwargs["NB"] <= _np2(n))
               and ("IPP" not in cf.kwargs or (cf.kwargs["IPP"] == 3) == small or
                    (cf.kwargs["IPP"] == 3 and cf.num_warps == 8))]
        if out:
            return out
        cf = dict(configs[0].kwargs, NB=max(1, 16 // bh))
        return [triton.Config(cf, num_warps=4, num_stages=2)]

    # <= 12 configs each after pruning (compile ~1 s each, once per shape; results cached on disk by triton)
    _CONV_CONFIGS = [triton.Config({"NB": nb}, num_warps=w, num_stages=st)
                     for nb in (1, 2, 4, 8) for w in (4, 8) for st in (2, 3)]
    _WGRAD_CONFIGS = [triton.Config({"NB": nb, "IPP": ipp}, num_warps=w, num_stages=st)
                      for ipp in (3, 1) for nb in (1, 2, 4, 8) for w in (4, 8) for st in (2, 3)]
    _mma_conv_tuned = triton.autotune(
        _CONV_CONFIGS, key=["N", "C", "H", "W", "K", "BW", "BK", "BH", "PREC"],
        prune_configs_by={"early_config_prune": _prune_conv}, cache_results=True)(_mma_conv_kernel)
    _mma_wgrad_tuned = triton.autotune(
        _WGRAD_CONFIGS, key=["N", "C", "H", "W", "K", "BW", "BK", "BH", "PREC", "SPLIT"],
        prune_configs_by={"early_config_prune": _prune_conv}, cache_results=True)(_mma_wgrad_kernel)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def _mma_geometry(H: int, W: int, k: int) -> dict:
    """Tile sizes for the MMA kernels (all powers of two, >= 16 where they are MMA dims)."""
    pad = k // 2
    if W <= 64:  # one column tile: K dim = output width, padding columns are implicit zeros
        bw = max(16, _np2(W))
        halo, bk, off = False, bw, pad
    else:
        bw = 64 if k <= 15 else 32
        halo, bk, off = True, max(16, _np2(bw + 2 * pad)), 0
    bh = min(64, _np2(H))
    return dict(BW=bw, BK=bk, HALO=halo, OFF=off, BH=bh, H_TILES=triton.cdiv(H, bh), W_TILES=triton.cdiv(W, bw))


def _default_nb(bh: int, n: int) -> int:
    nb = max(1, 64 // bh)  # M = 64 rows (one Hopper warpgroup MMA)
    nb = min(nb, _np2(n))
    return max(nb, 16 // bh if bh < 16 else 1)  # tl.dot needs M >= 16


def _prec(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"  # ignored for bf16 / fp16 operands


def _dot_f32(dtype: torch.dtype) -> bool:
    """Upcast MMA operands to fp32: only in the interpreter, whose tl.dot cannot multiply bf16/fp16."""
    return interpret_mode() and dtype != torch.float32


def _toeplitz(weight: torch.Tensor, k: int, bk: int, bw: int, off: int, flip: bool, dtype) -> torch.Tensor:
    """(C, k, BK, BW) banded matrices: T[c, kh, j, w] = w[c, kh, j - w + off] (0 outside the band)."""
    w2 = weight.reshape(-1, k, k).float()
    if flip:
        w2 = w2.flip(1, 2)
    j = torch.arange(bk, device=weight.device)[:, None]
    col = torch.arange(bw, device=weight.device)[None, :]
    idx = j - col + off
    band = (idx >= 0) & (idx < k)
    t = w2[:, :, idx.clamp(0, k - 1)] * band  # (C, k, BK, BW)
    return t.to(dtype).contiguous()


def _conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias, flip: bool, impl: str) -> torch.Tensor:
    """y = dwconv(x, weight) (+ bias); with flip=True the kernel is rotated 180 degrees (input grad)."""
    N, C, H, W = x.shape
    k = weight.shape[-1]
    pad = k // 2
    y = torch.empty_like(x)
    has_bias = bias is not None
    b = bias if has_bias else x  # dummy pointer when unused
    if impl == "direct":
        bh, bw = min(16, _np2(H)), min(64, max(16, _np2(W)))
        wt = triton.cdiv(W, bw)
        _direct_conv_kernel[(N * C, triton.cdiv(H, bh) * wt)](
            x, weight, b, y, C, H, W, wt, K=k, PAD=pad, FLIP=flip, HAS_BIAS=has_bias, BH=bh, BW=bw,
            num_warps=4)
        return y
    g = _mma_geometry(H, W, k)
    t = _toeplitz(weight, k, g["BK"], g["BW"], g["OFF"], flip, x.dtype)
    args = (x, t, b, y, N, C)
    common = dict(H=H, W=W, K=k, PAD=pad, HALO=g["HALO"], HAS_BIAS=has_bias, BH=g["BH"], BW=g["BW"], BK=g["BK"],
                  PREC=_prec(x.dtype), DOT_F32=_dot_f32(x.dtype))
    tiles = g["H_TILES"] * g["W_TILES"]
    if _autotune_enabled():
        def grid(meta):
            return (C * triton.cdiv(N, meta["NB"]) * tiles,)

        _mma_conv_tuned[grid](*args, g["H_TILES"], g["W_TILES"], **common)
    else:
        nb = _default_nb(g["BH"], N)
        _mma_conv_kernel[(C * triton.cdiv(N, nb) * tiles,)](*args, g["H_TILES"], g["W_TILES"], NB=nb,
                                                            num_warps=4, num_stages=2, **common)
    return y


def _num_sms(x: torch.Tensor) -> int:
    if x.is_cuda:
        return torch.cuda.get_device_properties(x.device).multi_processor_count
    return 4  # interpreter: a few programs per channel, so the two-stage reduction is exercised


def _split(n: int, programs_per_split: int, x: torch.Tensor, multiple: int) -> tuple[int, int]:
    """(SPLIT, N_PER): cut the batch so that >= ~8 programs per SM exist (2-3 resident per SM, so a few
    waves and a small tail), N_PER a multiple of `multiple`."""
    env = os.environ.get("ETC_DATA_DWCONV_SPLIT")
    want = int(env) if env else math.ceil(8 * _num_sms(x) / max(1, programs_per_split))
    want = max(1, min(want, n))
    n_per = triton.cdiv(triton.cdiv(n, want), multiple) * multiple
    return triton.cdiv(n, n_per), n_per


def _wgrad(x: torch.Tensor, dy: torch.Tensor, k: int, has_bias: bool, impl: str):
    """(dW (C, k*k) fp32, db (C,) fp32 or None): per-split partial sums, then a torch sum (deterministic)."""
    N, C, H, W = x.shape
    pad = k // 2
    if impl == "direct":
        bh, bw = min(16, _np2(H)), min(64, max(16, _np2(W)))
        wt = triton.cdiv(W, bw)
        split, n_per = _split(N, C, x, 1)
        pw = torch.empty((split, C, k * k), device=x.device, dtype=torch.float32)
        pb = torch.empty((split, C), device=x.device, dtype=torch.float32)
        _direct_wgrad_kernel[(C, split)](x, dy, pw, pb, N, C, H, W, split, n_per, wt, triton.cdiv(H, bh) * wt,
                                         K=k, PAD=pad, HAS_BIAS=has_bias, KK=_np2(k * k), BH=bh, BW=bw,
                                         num_warps=4)
    else:
        g = _mma_geometry(H, W, k)
        nb = _default_nb(g["BH"], N)
        # kernel rows per program: 3 -> dY loaded once for 3 rows, but 3 fp32 (BW, BK) accumulators (spill at 64x64)
        ipp = 3 if g["BW"] * g["BK"] <= 1024 and x.dtype != torch.float32 else 1
        split, n_per = _split(N, C * triton.cdiv(k, ipp), x, 8 if _autotune_enabled() else nb)
        pw = torch.empty((split, C, k * k), device=x.device, dtype=torch.float32)
        pb = torch.empty((split, C), device=x.device, dtype=torch.float32)
        args = (x, dy, pw, pb, N, C, split, n_per, g["H_TILES"], g["W_TILES"])
        common = dict(H=H, W=W, K=k, PAD=pad, HALO=g["HALO"], OFF=g["OFF"], HAS_BIAS=has_bias, BH=g["BH"], BW=g["BW"],
                      BK=g["BK"], PREC=_prec(x.dtype), DOT_F32=_dot_f32(x.dtype))
        if _autotune_enabled():
            _mma_wgrad_tuned[lambda meta: (C * split * triton.cdiv(k, meta["IPP"]),)](*args, **common)
        else:
            _mma_wgrad_kernel[(C * split * triton.cdiv(k, ipp),)](*args, NB=nb, IPP=ipp, num_warps=4,
                                                                    num_stages=2, **common)
    return pw.sum(0), (pb.sum(0) if has_bias else None)


_MMA_FAILED: list = []  # set once if the tensor-core kernels cannot be compiled here ("auto" then uses "direct")


def _resolve(impl: str | None) -> str:
    impl = (impl or os.environ.get("ETC_DATA_DWCONV_IMPL") or "auto").lower()
    if impl not in _IMPLS:
        raise ValueError(f"dwconv impl must be one of {', '.join(_IMPLS)}, got {impl!r}")
    return impl


def _run_auto(fn, *args):
    """Run fn(..., impl) with "mma"; if the MMA kernel fails to compile/launch, warn once and use "direct"."""
    if not _MMA_FAILED:
        try:
            return fn(*args, "mma")
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # triton CompilationError / OutOfResources on an unexpected GPU
            import warnings

            warnings.warn(f"etc_data.dwconv: tensor-core kernel failed ({type(e).__name__}: {e}); "
                          "using the direct FMA kernels", RuntimeWarning, stacklevel=3)
            _MMA_FAILED.append(repr(e))
    return fn(*args, "direct")


class _DWConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, impl):
        k = weight.shape[-1]
        w = weight.contiguous()  # (C, 1, k, k)
        if impl == "auto":
            y = _run_auto(_conv_fwd, x, w, bias, False)
        else:
            y = _conv_fwd(x, w, bias, False, impl)
        ctx.save_for_backward(x, w)
        ctx.k, ctx.impl, ctx.has_bias = k, impl, bias is not None
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gy = gy.to(x.dtype).contiguous()
        impl = ctx.impl
        if impl == "auto":
            impl = "direct" if _MMA_FAILED else "mma"
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _conv_fwd(gy, w, None, True, impl)  # dx = conv(dy, weight rotated by 180 degrees)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            pw, pb = _wgrad(x, gy, ctx.k, ctx.has_bias, impl)
            gw = pw.view(-1, 1, ctx.k, ctx.k).to(ctx.w_dtype)
            if ctx.has_bias:
                gb = pb.to(ctx.b_dtype)
        return gx, gw, gb, None


def dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             impl: str | None = None) -> torch.Tensor:
    """Depthwise conv, stride 1, zero 'same' padding: equals ``F.conv2d(x, weight, bias, padding=k//2, groups=C)``."""
    impl = _resolve(impl)
    if x.dim() != 4:
        raise ValueError(f"dwconv2d expects (N, C, H, W) input, got shape {tuple(x.shape)}")
    C = x.shape[1]
    k = weight.shape[-1]
    if weight.shape != (C, 1, k, k) or k % 2 == 0:
        raise ValueError(f"dwconv2d expects an odd square depthwise weight ({C}, 1, k, k), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"bias must have shape ({C},), got {tuple(bias.shape)}")
    dev = x.device.type
    autocast = torch.is_autocast_enabled(dev) and x.is_floating_point()
    cdt = torch.get_autocast_dtype(dev) if autocast else x.dtype
    if impl == "torch" or not triton_enabled(x, cdt):
        return F.conv2d(x, weight, bias, padding=k // 2, groups=C)
    x = x.to(cdt).contiguous()  # channels_last (or any strides) -> NCHW contiguous
    if autocast:
        with torch.autocast(dev, enabled=False):
            return _DWConvFn.apply(x, weight, bias, impl)
    return _DWConvFn.apply(x, weight, bias, impl)


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(C, C, k, groups=C, padding=k//2)`` (same parameters and init) running ``dwconv2d``."""

    def __init__(self, channels: int, kernel_size: int = 9, bias: bool = True, impl: str | None = None,
                 device=None, dtype=None):
        if kernel_size % 2 != 1:
            raise ValueError(f"DepthwiseConv2d needs an odd kernel size, got {kernel_size}")
        super().__init__(channels, channels, kernel_size, stride=1, padding=kernel_size // 2, groups=channels,
                         bias=bias, device=device, dtype=dtype)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dwconv2d(x, self.weight, self.bias, self.impl)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", impl={self.impl!r}" if self.impl else "")


def _is_plain_depthwise(m: nn.Module) -> bool:
    if type(m) is not nn.Conv2d:  # exact type: DepthwiseConv2d (a subclass) is left alone
        return False
    k = m.kernel_size
    pad_ok = m.padding == "same" or m.padding == (k[0] // 2, k[1] // 2)
    return (m.groups == m.in_channels == m.out_channels and k[0] == k[1] and k[0] % 2 == 1
            and m.stride == (1, 1) and m.dilation == (1, 1) and pad_ok and m.padding_mode == "zeros")


def patch_convmixer(model: nn.Module, impl: str | None = None) -> nn.Module:
    """Replace every depthwise ``nn.Conv2d`` (stride 1, odd kernel, zero 'same' padding) with ``DepthwiseConv2d``.

    Made for timm's ConvMixer (``blocks[i][0].fn[0]``) but walks any module tree.  The new modules
    reuse the old Parameter objects (no copy, same values, same names), so ``state_dict`` keys are
    unchanged and checkpoints load either way; an optimizer built before the patch still holds the
    right tensors.  Returns the same (modified in place) model.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_plain_depthwise(child):
                new = DepthwiseConv2d(child.in_channels, child.kernel_size[0], bias=child.bias is not None,
                                      impl=impl, device="meta")
                new.weight = child.weight
                new.bias = child.bias
                new.train(child.training)
                setattr(parent, name, new)
    return model
