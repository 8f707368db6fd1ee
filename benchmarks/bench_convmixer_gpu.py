"""ConvMixer training throughput on one GPU: timm stock (cuDNN depthwise conv) vs etc_data.dwconv (Triton).

Two models, as in issue 9:
  * ConvMixer-256/8, patch 1, kernel 9, 32 px, 10 classes, batch 512 (CIFAR-10 recipe; stock ~1,650 img/s on an H100)
  * ConvMixer-384/8, patch 4, kernel 9, 224 px (56x56 tokens), 10 classes, batch 128
For each: img/s of the full training step (forward + backward + AdamW step, synthetic data already in GPU
memory, bf16 autocast as in etc_data.train unless --dtype fp32) for the stock model and the patched one
(``patch_convmixer``; --impl picks the Triton variant), and the ratio patched / stock.  Then per-op times of the
depthwise conv alone at each model's shape (forward, forward+backward) for torch (cuDNN) and the Triton
kernels, with CUDA events after warm-up (the first Triton call per shape also autotunes), the max relative
error vs torch, and the FLOP rate counted as 2*k*k MACs per output (fwd; x3 for fwd+bwd).

    python benchmarks/bench_convmixer_gpu.py [--steps 20] [--dtype bf16|fp32] [--batch 512] [--batch-224 128]
                                             [--impl auto|mma|direct] [--models cifar,in224] [--ops-only]
                                             [--json PATH]

--json writes the same figures as one JSON object (benchmarks/gpu_check.py reads it).
Prints a message and exits 0 when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

import torch
import torch.nn.functional as F

MODELS = {
    "cifar": dict(dim=256, depth=8, kernel=9, patch=1, img=32, classes=10),
    "in224": dict(dim=384, depth=8, kernel=9, patch=4, img=224, classes=10),
}


def cuda_time_ms(fn, iters: int, warmup: int = 3) -> float:
    """Mean milliseconds per call of fn() measured with CUDA events after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def build(spec: dict, patched: bool, impl: str | None):
    from timm.models.convmixer import ConvMixer

    from etc_data.dwconv import patch_convmixer

    torch.manual_seed(0)
    m = ConvMixer(dim=spec["dim"], depth=spec["depth"], kernel_size=spec["kernel"], patch_size=spec["patch"],
                  num_classes=spec["classes"]).cuda()
    if patched:
        patch_convmixer(m, impl=impl)
    return m


def train_throughput(spec: dict, batch: int, steps: int, warmup: int, dtype: str, patched: bool,
                     impl: str | None) -> tuple[float, float]:
    """(img/s, final loss) of fwd+bwd+AdamW steps on a fixed synthetic batch in GPU memory."""
    model = build(spec, patched, impl).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(batch, 3, spec["img"], spec["img"], device="cuda", generator=g)
    y = torch.randint(0, spec["classes"], (batch,), device="cuda", generator=g)
    amp = dtype == "bf16"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):  # cuDNN algorithm search / Triton compile + autotune happen here
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end)
    lv = loss.item()
    del model, opt, x, y
    gc.collect()
    torch.cuda.empty_cache()
    return batch * steps / (ms / 1e3), lv


def per_op(spec: dict, batch: int, dtype: str, impls: list[str], iters: int):
    from etc_data.dwconv import dwconv2d

    C, k = spec["dim"], spec["kernel"]
    H = W = spec["img"] // spec["patch"]
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    x = torch.randn(batch, C, H, W, device="cuda", dtype=dt, requires_grad=True)
    w = (torch.randn(C, 1, k, k, device="cuda") / k).requires_grad_()  # fp32 parameters, as under autocast
    b = torch.zeros(C, device="cuda", requires_grad=True)
    gy = torch.randn(batch, C, H, W, device="cuda", dtype=dt)
    macs = batch * C * H * W * k * k
    print(f"\n  depthwise {k}x{k} conv at {batch}x{C}x{H}x{W} {dtype}: "
          f"{2 * macs / 1e9:.1f} GFLOP fwd, {3 * 2 * macs / 1e9:.1f} GFLOP fwd+bwd")
    print(f"  {'impl':<8} {'fwd ms':>9} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8} "
          f"{'err y':>9} {'err dx':>9} {'err dw':>9}")

    def run(impl, backward):
        def fn():
            if impl == "torch":
                # cuDNN: weight in the activation dtype, as under autocast
                out = F.conv2d(x, w.to(dt), b.to(dt), padding=k // 2, groups=C)
            else:
                out = dwconv2d(x, w, b, impl=impl)
            if backward:
                out.backward(gy)
            return out
        return fn

    ref = None
    rows, report = {}, {}
    for impl in ["torch"] + impls:
        x.grad = w.grad = b.grad = None
        try:
            y = run(impl, True)()
            torch.cuda.synchronize()
        except Exception as e:  # report and go on with the other implementations
            print(f"  {impl:<8} FAILED: {type(e).__name__}: {str(e)[:300]}")
            report[impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        got = (y.detach().float(), x.grad.float(), w.grad.float())
        if ref is None:
            ref = got
        errs = [((a - r).abs().max() / r.abs().max()).item() for a, r in zip(got, ref)]
        with torch.no_grad():
            t_f = cuda_time_ms(run(impl, False), iters)
        t_fb = cuda_time_ms(run(impl, True), iters)
        rows[impl] = (t_f, t_fb)
        report[impl] = {"fwd_ms": t_f, "fwd_bwd_ms": t_fb, "err_y": errs[0], "err_dx": errs[1], "err_dw": errs[2]}
        print(f"  {impl:<8} {t_f:9.3f} {2 * macs / t_f / 1e9:8.1f} {t_fb:11.3f} {6 * macs / t_fb / 1e9:8.1f} "
              f"{errs[0]:9.2e} {errs[1]:9.2e} {errs[2]:9.2e}")
    if "torch" in rows:
        for impl in impls:
            if impl in rows:
                print(f"  speed-up {impl} vs torch: fwd x{rows['torch'][0] / rows[impl][0]:.1f}, "
                      f"fwd+bwd x{rows['torch'][1] / rows[impl][1]:.1f}")
    del x, w, b, gy
    gc.collect()
    torch.cuda.empty_cache()
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=512, help="batch of the 32 px ConvMixer-256/8 (default 512)")
    ap.add_argument("--batch-224", type=int, default=128, help="batch of the 224 px ConvMixer-384/8 (default 128)")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per model (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, autotune; default 5)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                    help="bf16: autocast as in etc_data.train (default); fp32: no autocast")
    ap.add_argument("--impl", default="auto", help="Triton variant(s) for the patched model, comma-separated: "
                                                   "auto, mma, direct (default auto)")
    ap.add_argument("--models", default="cifar,in224", help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--op-iters", type=int, default=20, help="timed calls per op (default 20)")
    ap.add_argument("--ops-only", action="store_true", help="skip the training-step throughput")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_convmixer_gpu: no CUDA device available; nothing to measure (exit 0).")
        return 0
    from etc_data.dwconv import HAVE_TRITON

    if not HAVE_TRITON:
        print("bench_convmixer_gpu: triton is not importable; the patched model would just run F.conv2d (exit 0).")
        return 0
    import triton

    impls = [s.strip() for s in args.impl.split(",") if s.strip()]
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}, dtype {args.dtype}, cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
          f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
    names = [s.strip() for s in args.models.split(",") if s.strip()]
    for name in names:
        if name not in MODELS:
            ap.error(f"unknown model {name!r}; valid: {', '.join(MODELS)}")

    results = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype,
               "models": {}}
    for name in names:
        spec = MODELS[name]
        batch = args.batch if name == "cifar" else args.batch_224
        tok = spec["img"] // spec["patch"]
        res = results["models"][name] = {"spec": spec, "batch": batch, "patched": {}}
        print(f"\n== ConvMixer-{spec['dim']}/{spec['depth']} patch {spec['patch']} kernel {spec['kernel']} "
              f"{spec['img']} px ({tok}x{tok} tokens), batch {batch}", flush=True)
        if not args.ops_only:
            base, loss0 = train_throughput(spec, batch, args.steps, args.warmup, args.dtype, False, None)
            res["stock_img_s"] = base
            print(f"  stock (timm, cuDNN)      {base:10.0f} img/s   (loss after warm-up+steps {loss0:.4f})", flush=True)
            for impl in impls:
                try:
                    ips, loss1 = train_throughput(spec, batch, args.steps, args.warmup, args.dtype, True, impl)
                except Exception as e:
                    print(f"  patched impl={impl:<7} FAILED: {type(e).__name__}: {str(e)[:300]}")
                    res["patched"][impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    continue
                res["patched"][impl] = {"img_s": ips, "ratio": ips / base, "loss": loss1}
                print(f"  patched impl={impl:<11}{ips:10.0f} img/s   (loss {loss1:.4f})   "
                      f"ratio new/old x{ips / base:.2f}", flush=True)
        res["ops"] = per_op(spec, batch, args.dtype, ["mma", "direct"], args.op_iters)
        if args.json:  # after every model, so a later failure or timeout keeps what was measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
