"""Depthwise conv (etc_data.dwconv): CPU fallback, Triton kernels in the interpreter, ConvMixer patching, GPU.

The interpreter checks run in ONE subprocess (``TRITON_INTERPRET`` must be set before the kernels are
decorated, and must not leak into other tests); inside it ``F.conv2d`` is made to raise, so a case can
only pass through the Triton kernels.  Each case reports max errors vs a float64 ``F.conv2d``
reference (computed before the patch) and the tests below assert on them one by one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from etc_data.dwconv import DepthwiseConv2d, dwconv2d, interpret_mode, patch_convmixer, triton_enabled

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _ref(x, w, b, gy):
    """float64 reference: (y, dx, dw, db) of F.conv2d."""
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if b is not None else None
    y = F.conv2d(xd, wd, bd, padding=w.shape[-1] // 2, groups=x.shape[1])
    y.backward(gy.double())
    return y.detach(), xd.grad, wd.grad, (bd.grad if bd is not None else None)


def _relerr(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------- (a) CPU fallback
def test_cpu_fallback_is_exactly_conv2d():
    if interpret_mode():
        pytest.skip("TRITON_INTERPRET is set in this process: CPU tensors go to the Triton interpreter")
    assert not triton_enabled(torch.zeros(1, 1, 3, 3))
    torch.manual_seed(0)
    for shape, k, bias in [((2, 6, 11, 9), 9, True), ((1, 4, 8, 8), 3, False), ((3, 5, 7, 13), 5, True)]:
        x = torch.randn(shape, requires_grad=True)
        w = torch.randn(shape[1], 1, k, k, requires_grad=True)
        b = torch.randn(shape[1], requires_grad=True) if bias else None
        y = dwconv2d(x, w, b)
        gy = torch.randn_like(y)
        y.backward(gy)
        grads = (x.grad, w.grad, b.grad if bias else None)
        x.grad = w.grad = None
        if bias:
            b.grad = None
        y2 = F.conv2d(x, w, b, padding=k // 2, groups=shape[1])
        y2.backward(gy)
        assert torch.equal(y, y2)
        assert torch.equal(grads[0], x.grad) and torch.equal(grads[1], w.grad)
        if bias:
            assert torch.equal(grads[2], b.grad)


def test_module_matches_nn_conv2d_on_cpu():
    torch.manual_seed(1)
    ref = nn.Conv2d(8, 8, 9, groups=8, padding="same")
    m = DepthwiseConv2d(8, 9)
    assert list(m.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    assert m.weight.shape == (8, 1, 9, 9) and m.bias.shape == (8,)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 10, 12)
    assert torch.equal(m(x), ref(x))
    xcl = x.to(memory_format=torch.channels_last)
    assert torch.equal(m(xcl), ref(xcl))  # fallback passes the layout through to F.conv2d
    assert DepthwiseConv2d(4, 3, bias=False).bias is None


def test_bad_arguments_raise():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError):
        DepthwiseConv2d(4, 4)  # even kernel
    with pytest.raises(ValueError):
        dwconv2d(x, torch.randn(4, 1, 3, 3), impl="cudnn")
    with pytest.raises(ValueError):
        dwconv2d(x, torch.randn(3, 1, 3, 3))  # wrong channel count
    with pytest.raises(ValueError):
        dwconv2d(x, torch.randn(4, 1, 3, 3), torch.randn(3))


# ---------------------------------------------------------------------------------------------- (c) patching
def _tiny_convmixer(k=5, patch=2, dim=16, depth=2):
    from timm.models.convmixer import ConvMixer

    torch.manual_seed(2)
    return ConvMixer(dim=dim, depth=depth, kernel_size=k, patch_size=patch, num_classes=10)


def test_patch_convmixer_keeps_keys_and_output_on_cpu():
    stock = _tiny_convmixer().eval()
    sd = {k: v.clone() for k, v in stock.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    y_stock = stock(x)
    patched = patch_convmixer(_tiny_convmixer().eval())
    patched.load_state_dict(sd)  # strict: an unpatched checkpoint loads into the patched model
    assert list(patched.state_dict()) == list(sd)
    dws = [b[0].fn[0] for b in patched.blocks]
    assert all(type(m) is DepthwiseConv2d for m in dws) and len(dws) == 2
    assert type(patched.stem[0]) is nn.Conv2d and type(patched.blocks[0][1]) is nn.Conv2d  # stem / 1x1 untouched
    assert torch.equal(patched(x), y_stock)
    # and a patched checkpoint loads into a stock model
    fresh = _tiny_convmixer().eval()
    fresh.load_state_dict(patched.state_dict())
    assert torch.equal(fresh(x), y_stock)
    # parameters are reused (same objects): an optimizer built before patching stays valid; patching twice is a no-op
    m = _tiny_convmixer()
    before = [id(p) for p in m.parameters()]
    patch_convmixer(patch_convmixer(m))
    assert [id(p) for p in m.parameters()] == before


def test_patch_convmixer_gradients_match_on_cpu():
    stock = _tiny_convmixer(k=3)
    patched = patch_convmixer(_tiny_convmixer(k=3))
    x = torch.randn(4, 3, 16, 16)
    for m in (stock, patched):
        F.cross_entropy(m(x), torch.arange(4)).backward()
    for (n1, p1), (n2, p2) in zip(stock.named_parameters(), patched.named_parameters()):
        assert n1 == n2 and torch.equal(p1.grad, p2.grad), n1


# ---------------------------------------------------------------------------------------------- (b) interpreter
_CASES = [
    # id, (N, C, H, W), k, dtype, impl, bias, extra
    ("mma-8x8-k3", (2, 3, 8, 8), 3, "float32", "mma", True, {}),
    ("mma-13x11-k5", (2, 5, 13, 11), 5, "float32", "mma", True, {}),
    ("mma-9x12-k9", (1, 4, 9, 12), 9, "float32", "mma", True, {}),
    ("mma-10x9-k9-nobias", (3, 2, 10, 9), 9, "float32", "mma", False, {}),
    ("mma-htiles-wtiles-k3", (1, 2, 66, 67), 3, "float32", "mma", True, {}),  # H > 64 and W > 64: halo column tiles
    ("mma-wtiles-k9", (1, 2, 9, 70), 9, "float32", "mma", True, {}),
    ("mma-split1", (4, 2, 8, 8), 3, "float32", "mma", True, {"split": 1}),
    ("mma-split3", (4, 2, 8, 8), 3, "float32", "mma", True, {"split": 3}),
    ("mma-channels-last", (2, 4, 9, 9), 3, "float32", "mma", True, {"channels_last": True}),
    ("mma-bf16-k3", (2, 3, 8, 8), 3, "bfloat16", "mma", True, {}),
    ("mma-bf16-k5", (2, 2, 12, 12), 5, "bfloat16", "mma", True, {}),
    ("direct-8x8-k3", (2, 3, 8, 8), 3, "float32", "direct", True, {}),
    ("direct-13x11-k5", (2, 5, 13, 11), 5, "float32", "direct", True, {}),
    ("direct-9x12-k9-nobias", (1, 3, 9, 12), 9, "float32", "direct", False, {}),
    ("direct-bf16-k3", (2, 3, 8, 8), 3, "bfloat16", "direct", True, {}),
]

_SCRIPT = textwrap.dedent(r"""
    import json, os, sys
    os.environ["ETC_DATA_TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F
    from etc_data import dwconv
    from etc_data.dwconv import DepthwiseConv2d, dwconv2d, patch_convmixer

    conv2d = F.conv2d
    def boom(*a, **k):
        raise AssertionError("F.conv2d fallback used in interpreter mode")

    def ref(x, w, b, gy):
        xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        bd = b.detach().double().requires_grad_() if b is not None else None
        y = conv2d(xd, wd, bd, padding=w.shape[-1] // 2, groups=x.shape[1])
        y.backward(gy.double())
        return [y.detach(), xd.grad, wd.grad, bd.grad if bd is not None else None]

    def rel(a, r):
        return None if r is None else ((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()

    out = {}
    for cid, shape, k, dt, impl, bias, extra in json.loads(sys.argv[1]):
        torch.manual_seed(0)
        dt = getattr(torch, dt)
        C = shape[1]
        x = torch.randn(shape).to(dt)
        w = torch.randn(C, 1, k, k)  # parameters stay fp32 (as under autocast)
        b = torch.randn(C) if bias else None
        gy = torch.randn(shape).to(dt)
        r = ref(x, w, b, gy)
        if extra.get("channels_last"):
            x = x.to(memory_format=torch.channels_last)
        if "split" in extra:
            os.environ["ETC_DATA_DWCONV_SPLIT"] = str(extra["split"])
        res = []
        for _ in range(2 if "split" in extra else 1):  # split cases run twice: bitwise reproducible
            xx = x.clone().requires_grad_()
            ww = w.clone().requires_grad_()
            bb = b.clone().requires_grad_() if bias else None
            F.conv2d = boom
            try:
                y = dwconv2d(xx, ww, bb, impl=impl)
                y.backward(gy)
            finally:
                F.conv2d = conv2d
            res.append([y.detach(), xx.grad, ww.grad, bb.grad if bias else None])
        os.environ.pop("ETC_DATA_DWCONV_SPLIT", None)
        got = res[0]
        out[cid] = {
            "err": [rel(a, rr) for a, rr in zip(got, r)],
            "dtypes": [str(got[0].dtype), str(got[1].dtype), str(got[2].dtype)],
            "deterministic": all(a is None or torch.equal(a, c) for a, c in zip(res[0], res[-1])),
            "runs": len(res),
        }

    # autocast (CPU, bf16): the module casts the input, output bf16, parameter grads fp32
    torch.manual_seed(0)
    m = DepthwiseConv2d(4, 5)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.conv2d = boom
        try:
            y = m(x)
        finally:
            F.conv2d = conv2d
    gy = torch.randn_like(y)
    y.backward(gy)
    r = ref(x.detach().bfloat16().float(), m.weight, m.bias, gy.float())
    out["autocast"] = {"dtypes": [str(y.dtype), str(x.grad.dtype), str(m.weight.grad.dtype)],
                       "err": [rel(y, r[0]), rel(x.grad, r[1]), rel(m.weight.grad, r[2]), rel(m.bias.grad, r[3])]}

    # tiny timm ConvMixer: patched (Triton in the interpreter) vs stock
    from timm.models.convmixer import ConvMixer
    torch.manual_seed(0)
    stock = ConvMixer(dim=8, depth=1, kernel_size=5, patch_size=4, num_classes=10)
    patched = ConvMixer(dim=8, depth=1, kernel_size=5, patch_size=4, num_classes=10)
    patched.load_state_dict(stock.state_dict())
    patch_convmixer(patched)
    x = torch.randn(2, 3, 16, 16)  # 4x4 tokens: every kernel tap still crosses the borders
    errs = {}
    for name, mod in (("stock", stock), ("patched", patched)):
        loss = F.cross_entropy(mod(x), torch.tensor([1, 2]))
        loss.backward()
        errs[name] = (loss.item(), {n: p.grad.clone() for n, p in mod.named_parameters()})
    dw_key = "blocks.0.0.fn.0.weight"
    out["convmixer"] = {
        "loss": [errs["stock"][0], errs["patched"][0]],
        "keys_equal": list(stock.state_dict()) == list(patched.state_dict()),
        "grad_err": max(rel(errs["patched"][1][n], errs["stock"][1][n].double()) for n in errs["stock"][1]),
        "dw_grad_err": rel(errs["patched"][1][dw_key], errs["stock"][1][dw_key].double()),
        "patched_type": type(patched.blocks[0][0].fn[0]).__name__,
    }
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def interp():
    pytest.importorskip("triton")
    env = dict(os.environ, ETC_DATA_TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    env.pop("ETC_DATA_DWCONV_IMPL", None)
    p = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(_CASES)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and line, f"interpreter run failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return json.loads(line[-1][len("RESULT "):])


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_interpreter_matches_conv2d(interp, case):
    cid, _, _, dtype, _, bias, _ = case
    r = interp[cid]
    tol = 1e-5 if dtype == "float32" else 1.6e-2  # bf16 output / dx are rounded to bf16 (2**-8 relative)
    ey, edx, edw, edb = r["err"]
    assert ey < tol and edx < tol, r
    assert edw < 1e-5 and (edb is None) == (not bias) and (edb is None or edb < 1e-5), r  # fp32-accumulated sums
    assert r["dtypes"] == [f"torch.{dtype}", f"torch.{dtype}", "torch.float32"], r
    assert r["deterministic"] and r["runs"] == (2 if "split" in case[6] else 1), r


def test_interpreter_autocast(interp):
    r = interp["autocast"]
    assert r["dtypes"] == ["torch.bfloat16", "torch.float32", "torch.float32"]
    assert r["err"][0] < 1.6e-2 and r["err"][1] < 1.6e-2 and r["err"][2] < 1e-2 and r["err"][3] < 1e-2, r


def test_interpreter_patched_convmixer(interp):
    r = interp["convmixer"]
    assert r["keys_equal"] and r["patched_type"] == "DepthwiseConv2d"
    assert abs(r["loss"][0] - r["loss"][1]) < 1e-5, r
    assert r["grad_err"] < 1e-4 and r["dw_grad_err"] < 1e-4, r


# ---------------------------------------------------------------------------------------------- (d) GPU
_GPU_SHAPES = [((512, 256, 32, 32), 9), ((64, 384, 56, 56), 9), ((8, 96, 100, 130), 7)]


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["mma", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,k", _GPU_SHAPES, ids=["cifar-256", "in-384-p4", "odd-w-tiles"])
def test_gpu_matches_conv2d(shape, k, dtype, impl):
    torch.manual_seed(0)
    dev = "cuda"
    C = shape[1]
    x = torch.randn(shape, device=dev).to(dtype).requires_grad_()
    w = (torch.randn(C, 1, k, k, device=dev) / k).requires_grad_()
    b = torch.randn(C, device=dev).requires_grad_()
    gy = torch.randn(shape, device=dev).to(dtype)
    y = dwconv2d(x, w, b, impl=impl)
    y.backward(gy)
    assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == torch.float32
    r = _ref(x, w, b, gy)
    # fp32: tf32x3 MMAs / FMAs, fp32 accumulation.  bf16: output/dx rounded to bf16, the MMA path also rounds
    # the weights to bf16 (as autocast does for cuDNN); dW/db are fp32 sums of exact bf16 products.
    tol_y = 1e-5 if dtype == torch.float32 else 1.6e-2
    assert _relerr(y, r[0]) < tol_y and _relerr(x.grad, r[1]) < tol_y
    assert _relerr(w.grad, r[2]) < 1e-4 and _relerr(b.grad, r[3]) < 1e-4
    # deterministic (two-stage reduction, no atomics)
    gw = w.grad.clone()
    w.grad = None
    dwconv2d(x, w, b, impl=impl).backward(gy)
    assert torch.equal(gw, w.grad)


@cuda
@pytest.mark.gpu
def test_gpu_patched_convmixer_training_step_matches_stock():
    from timm.models.convmixer import ConvMixer

    torch.manual_seed(0)
    stock = ConvMixer(dim=256, depth=2, kernel_size=9, patch_size=1, num_classes=10).cuda()
    patched = ConvMixer(dim=256, depth=2, kernel_size=9, patch_size=1, num_classes=10).cuda()
    patched.load_state_dict(stock.state_dict())
    patch_convmixer(patched)
    assert list(stock.state_dict()) == list(patched.state_dict())
    x = torch.randn(64, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    losses = []
    for m in (stock, patched):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 2e-2 * max(1.0, abs(losses[0]))
    g1 = stock.blocks[0][0].fn[0].weight.grad
    g2 = patched.blocks[0][0].fn[0].weight.grad
    assert g2.dtype == torch.float32 and _relerr(g2, g1.double()) < 5e-2


# ---------------------------------------------------------------------------------------------- sm_90 compile (no GPU)
def _compile_sm90(fn, sig: dict, consts: dict, num_warps=4, num_stages=2, div16=()):
    """Compile a @triton.jit kernel for an H100 (sm_90a) without a GPU; returns (ptx, ptxas -v output)."""
    import shutil

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = {a: ("constexpr" if a in consts else sig[a]) for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a in sig and (sig[a].startswith("*") or a in div16)}
    src = ASTSource(fn, full, {(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = k.asm["ptx"]
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and shutil.which("ptxas") is None:
        return ptx, ""
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"dwconv_{os.getpid()}_{fn.__name__}.ptx"
    tmp.write_text(ptx)
    try:
        r = subprocess.run([str(ptxas) if ptxas.exists() else "ptxas", "-arch=sm_90a", "-v", str(tmp),
                            "-o", os.devnull], capture_output=True, text=True, timeout=300)
    finally:
        tmp.unlink(missing_ok=True)
    return ptx, r.stderr


@pytest.mark.slow
def test_kernels_compile_for_h100_without_spills():
    """The CIFAR ConvMixer configs (bf16, 32x32, k9) lower to pipelined tensor-core code with no register spills."""
    if interpret_mode():
        pytest.skip("TRITON_INTERPRET is set: kernels are interpreted functions")
    pytest.importorskip("triton")
    from etc_data import dwconv as d

    g = d._mma_geometry(32, 32, 9)
    assert (g["BW"], g["BK"], g["BH"], g["HALO"]) == (32, 32, 32, False)
    ptx, info = _compile_sm90(
        d._mma_conv_kernel,
        dict(x_ptr="*bf16", t_ptr="*bf16", b_ptr="*fp32", y_ptr="*bf16", N="i32", C="i32", H_TILES="i32",
             W_TILES="i32"),
        dict(H=32, W=32, K=9, PAD=4, HALO=False, HAS_BIAS=True, NB=2, BH=32, BW=32, BK=32, PREC="tf32",
             DOT_F32=False), div16=("N", "C"))
    assert "wgmma.mma_async" in ptx  # Hopper tensor cores
    assert "cp.async" in ptx  # loads of step kh+1 pipelined under the MMA of kh
    assert "st.global.v4" in ptx  # vectorized stores
    if info:
        assert "0 bytes spill stores" in info, info
    ptx, info = _compile_sm90(
        d._mma_wgrad_kernel,
        dict(x_ptr="*bf16", dy_ptr="*bf16", pw_ptr="*fp32", pb_ptr="*fp32", N="i32", C="i32", SPLIT="i32",
             N_PER="i32", H_TILES="i32", W_TILES="i32"),
        dict(H=32, W=32, K=9, PAD=4, HALO=False, OFF=4, HAS_BIAS=True, NB=2, BH=32, BW=32, BK=32, IPP=3,
             PREC="tf32", DOT_F32=False), div16=("N", "C"))
    assert "mma" in ptx and "cp.async" in ptx
    if info:
        assert "0 bytes spill stores" in info, info
