"""Encrypt / decrypt throughput of every scheme, next to a plain numpy copy of the same batch.

Batches: 60,000 CIFAR-sized (32x32) images and 1,000 Imagenette-sized (224x224) images, built by
tiling the exact CIFAR subset / real Imagenette images from ../shared/data when present (random
pixels otherwise: throughput does not depend on content). Single process, single core (numpy's
gather and XOR do not multi-thread). Each figure is the best of --repeat runs in this process;
the first (cold) run is printed too, since it pays the page faults of a fresh output array, as
does the first plain copy. Target (issue 2): 60k CIFAR images encrypted with EtC in <= 0.5 s.

    python benchmarks/bench_schemes.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from etc_data.schemes import make_scheme

SHARED = Path(os.environ.get("ETC_DATA_SHARED", Path(__file__).resolve().parents[2] / "shared" / "data"))


def batches():
    rng = np.random.default_rng(0)
    npz = SHARED / "cifar10-lossless-subset.npz"
    if npz.exists():
        with np.load(npz) as d:
            base = np.concatenate([d["x_train"], d["x_test"]])
        cifar = np.ascontiguousarray(np.resize(base, (60000, 32, 32, 3)))
    else:
        cifar = rng.integers(0, 256, (60000, 32, 32, 3), dtype=np.uint8)
    zp = SHARED / "imagenette-224-subset.zip"
    if zp.exists():
        from etc_data.images import decode_image

        with zipfile.ZipFile(zp) as z:
            names = sorted(n for n in z.namelist() if n.endswith(".JPEG"))[:100]
            base = np.stack([decode_image(z.read(n), n) for n in names])
        inet = np.ascontiguousarray(np.resize(base, (1000, 224, 224, 3)))
    else:
        inet = rng.integers(0, 256, (1000, 224, 224, 3), dtype=np.uint8)
    return {"60k x 32x32": cifar, "1k x 224x224": inet}


def timed(fn, repeat):
    times = []
    for _ in range(repeat + 1):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        del out
    return times[0], min(times[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    key = os.urandom(32)
    print(f"{'batch':14s} {'scheme':22s} {'op':8s} {'cold s':>8s} {'best s':>8s} {'MB/s':>8s} {'x copy':>7s}")
    for label, x in batches().items():
        mb = x.nbytes / 1e6
        cold, copy_best = timed(lambda: x.copy(), args.repeat)
        print(f"{label:14s} {'numpy copy':22s} {'copy':8s} {cold:8.3f} {copy_best:8.3f} {mb / copy_best:8.0f} {1:7.2f}")
        for spec, bs in [("etc", 16), ("etc", 8), ("blockwise", 16), ("pe", None), ("ele", 4)]:
            s = make_scheme(spec, subkey=key, block_size=bs)
            s.plan(*x.shape[1:3])  # key expansion once per image size, not per batch
            y = s.encrypt(x[:1])
            for op, fn in (("encrypt", lambda: s.encrypt(x)), ("decrypt", lambda: s.decrypt(y_full))):
                if op == "decrypt":
                    y_full = s.encrypt(x)
                cold, best = timed(fn, args.repeat)
                print(f"{label:14s} {spec + ' B' + str(bs or ''):22s} {op:8s} {cold:8.3f} {best:8.3f} "
                      f"{mb / best:8.0f} {best / copy_best:7.2f}")
            del y
    print("target: etc B16 encrypt of 60k x 32x32 <= 0.5 s on one core")
    # what prepare does: batches of ~1 MB of pixels (8 images at 224 px) that stay in the cache; the
    # large batches above are bounded by memory bandwidth instead
    from etc_data.schemes import native_available

    vec = native_available() and not os.environ.get("ETC_DATA_SCALAR_KERNEL")
    kind = ("compiled, byte shuffles where the CPU has SSE4.1" if vec else "compiled, one pixel at a time") \
        if native_available() else "numpy"
    inet = batches()["1k x 224x224"][:64]
    for spec in ("etc", "etc:common=1,sub=8"):
        s = make_scheme(spec, subkey=key, block_size=16)
        s.plan(224, 224)
        best = min(timed(lambda: s.encrypt(inet[i:i + 8]), args.repeat)[1] for i in range(0, 64, 8) for _ in range(5))
        print(f"batches of 8 x 224x224, {spec} B16: {best / 8 * 1e6:.1f} us per image ({kind}; "
              f"ETC_DATA_SCALAR_KERNEL=1 for the one-pixel loop)")


if __name__ == "__main__":
    main()
