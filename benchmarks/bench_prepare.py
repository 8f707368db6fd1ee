"""Prepare throughput: all 60,000 CIFAR-10 images of ../shared/data (EtC block 16, JPEG QF85,
local shards, manifest) against a bare decode + encode loop over the same images on the same cores.

Timed, each in one run of this script:
- bare (threads / processes): read every JPEG from the two zips, decode it with simplejpeg, encode
  it with simplejpeg at QF85 4:2:0, nothing else; split over one thread (or one process) per core.
  The faster of the two is the baseline.
- library: ``etc_data.prepare.prepare`` with the local worker pool (no Prefect), the pool's start
  included.
- cli: ``etc-data prepare`` end to end in a subprocess (Python start, Prefect's ephemeral API,
  the flow with one task per shard, manifest, verify), after one tiny warm-up run that pays
  Prefect's one-time database creation in the fresh PREFECT_HOME (timed and printed apart).
Goal (issue 5): cli <= 10 s on the 2-core machine and <= 1.5x bare.
Also runs the Imagenette subset (4,925 images at 224 px) the same way.

    python benchmarks/bench_prepare.py [--only cifar|imagenette] [--shard-size 10000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ETC_DATA_SHARED", ROOT.parent / "shared" / "data"))


def _bare_part(zips: list[str], part: int, parts: int) -> int:
    """Decode + encode every ``parts``-th image of the zips, starting at ``part``."""
    import simplejpeg

    n = 0
    for zp in zips:
        with zipfile.ZipFile(zp) as z:
            names = sorted(x for x in z.namelist() if x.lower().endswith((".jpg", ".jpeg")))
            for name in names[part::parts]:
                img = simplejpeg.decode_jpeg(z.read(name), colorspace="rgb")
                simplejpeg.encode_jpeg(img, quality=85, colorspace="rgb", colorsubsampling="420")
                n += 1
    return n


def bare(zips: list[Path], workers: int, kind: str) -> tuple[float, int]:
    t = time.perf_counter()
    ex = (ThreadPoolExecutor if kind == "threads" else ProcessPoolExecutor)(max_workers=workers)
    with ex:
        n = sum(ex.map(_bare_part, [[str(z) for z in zips]] * workers, range(workers), [workers] * workers))
    return time.perf_counter() - t, n


def library(zips: list[Path], key: Path, out: Path, shard_size: int, resize) -> tuple[float, int]:
    """``prepare_dataset`` as a library user calls it (its own worker pool, verification included)."""
    from etc_data.prepare import PrepareConfig, prepare_dataset

    t = time.perf_counter()
    summ = prepare_dataset(PrepareConfig(source=[str(z) for z in zips], out=str(out), dataset="bench", scheme="etc",
                                         block_size=16, codec="jpeg:q=85,sub=420", key_ref=str(key),
                                         shard_size=shard_size, resize=resize))
    return time.perf_counter() - t, sum(m.num_samples for m in summ.manifests.values())


def cli(zips: list[Path], key: Path, out: Path, shard_size: int, resize, env) -> float:
    cmd = [sys.executable, "-m", "etc_data.cli", "prepare", "--key", str(key), "--out", str(out), "--dataset", "bench",
           "--scheme", "etc", "--block-size", "16", "--codec", "jpeg:q=85,sub=420", "--shard-size", str(shard_size)]
    for z in zips:
        cmd += ["--source", str(z)]
    if resize:
        cmd += ["--resize", str(resize)]
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"etc-data prepare failed:\n{r.stdout}\n{r.stderr}")
    print("   " + "\n   ".join(line for line in r.stdout.splitlines() if line.strip()))
    return dt


def run(name, zips, key, tmp, shard_size, resize, env):
    workers = len(os.sched_getaffinity(0))
    print(f"\n== {name}: {', '.join(z.name for z in zips)} on {workers} cores ==")
    tb_t, n = bare(zips, workers, "threads")
    tb_p, _ = bare(zips, workers, "processes")
    base = min(tb_t, tb_p)
    print(f"bare decode+encode: threads {tb_t:.2f} s, processes {tb_p:.2f} s ({n} images, {n / base:.0f} img/s)")
    tl, nl = library(zips, key, tmp / f"{name}-lib", shard_size, resize)
    print(f"library prepare (no Prefect): {tl:.2f} s for {nl} images  -> {tl / base:.2f}x bare")
    if not (tmp / "prefect-warm").exists():
        # Prefect's first use of a home creates and migrates its database (seconds); users pay that
        # once, so it is timed apart: a tiny plain run on a fresh home.
        (tmp / "prefect-warm").mkdir()
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "etc_data.cli", "prepare", "--source", str(zips[0]), "--scheme",
                            "plain", "--key", str(key), "--limit", "10", "--out", str(tmp / "warm"), "--codec", "png"],
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"warm-up run failed:\n{r.stderr}")
        print(f"first Prefect use on a fresh PREFECT_HOME (10 images, plain): {time.perf_counter() - t:.2f} s")
    tc = cli(zips, key, tmp / f"{name}-cli", shard_size, resize, env)
    print(f"etc-data prepare (CLI, Prefect flow, verify): {tc:.2f} s  -> {tc / base:.2f}x bare")
    return tc, base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["cifar", "imagenette"], default=None)
    ap.add_argument("--shard-size", type=int, default=10000)
    a = ap.parse_args()
    from etc_data.keys import new_key_file

    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        key = tmp / "owner.key"
        new_key_file(key, "bench")
        env = dict(os.environ, PREFECT_HOME=str(tmp / "prefect"), PREFECT_LOGGING_LEVEL="WARNING",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false")
        if a.only in (None, "cifar"):
            tc, base = run("cifar10", [SHARED / "cifar10-train-jpeg.zip", SHARED / "cifar10-test-jpeg.zip"], key, tmp,
                           a.shard_size, None, env)
            print(f"goal: <= 10 s and <= 1.5x bare: {'met' if tc <= 10 and tc <= 1.5 * base else 'NOT met'} "
                  f"({tc:.2f} s, {tc / base:.2f}x)")
        if a.only in (None, "imagenette"):
            run("imagenette", [SHARED / "imagenette-224-subset.zip"], key, tmp, min(a.shard_size, 1000), 224, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
