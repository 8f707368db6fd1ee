"""CPU side of the streaming loader: how many images per second one CPU core feeds to a GPU.

The GPU trainer needs its input pipeline to keep up (ConvMixer-256/8 at 32 px is meant to train at
>= 8,000 img/s on one H100, issue 9). This measures, on this machine's CPU only, one training epoch
of ``etc_data.loader.make_loader`` (read shard, sha256 check, untar, JPEG decode, shuffle buffer,
collate to a uint8 NHWC tensor) over EtC CIFAR-10 shards prepared from ../shared/data, with 1 and
with all DataLoader workers, next to a bare loop that only decodes the same JPEG bytes (already in
memory) with simplejpeg in the same number of processes. It also times the tar reading alone
(read_shard + iter_tar) and the CUDA path's CPU work (``decode="cuda"``: JPEG bytes only, decoding
is left to the GPU).

    python benchmarks/bench_loader.py [--limit 60000] [--batch-size 512]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ETC_DATA_SHARED", ROOT.parent / "shared" / "data"))


def _decode_part(blobs: list[bytes]) -> int:
    import simplejpeg

    for b in blobs:
        simplejpeg.decode_jpeg(b, colorspace="rgb")
    return len(blobs)


def bare_decode(blobs: list[bytes], workers: int) -> float:
    parts = [blobs[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_decode_part, [p[:10] for p in parts]))  # workers started before timing
        t = time.perf_counter()
        n = sum(ex.map(_decode_part, parts))
        dt = time.perf_counter() - t
    assert n == len(blobs)
    return dt


def epoch(url: str, batch: int, workers: int, decode: str) -> tuple[float, int]:
    from etc_data.loader import make_loader

    dl, ds, _, steps = make_loader(url, batch, workers=workers, decode=decode, seed=0)
    it = iter(dl)
    next(it)  # workers started and their first shard read: not part of the steady state
    t = time.perf_counter()
    n = 0
    for _, y in it:
        n += len(y)
    dt = time.perf_counter() - t
    del it, dl
    return dt, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="images per split to prepare (default: all)")
    ap.add_argument("--batch-size", type=int, default=512)
    a = ap.parse_args()
    from etc_data.keys import new_key_file
    from etc_data.manifest import read_manifest
    from etc_data.prepare import PrepareConfig, prepare_dataset
    from etc_data.shards import iter_tar, read_shard

    cores = len(os.sched_getaffinity(0))
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        key = tmp / "owner.key"
        new_key_file(key, "bench")
        out = tmp / "ds"
        t = time.perf_counter()
        prepare_dataset(PrepareConfig(source=[str(SHARED / "cifar10-train-jpeg.zip")], out=str(out), dataset="bench",
                         scheme="etc", block_size=16, codec="jpeg:q=85,sub=444", key_ref=str(key), shard_size=5000,
                         limit=a.limit, splits=["train"]))
        url = str(out / "train")
        m = read_manifest(url)
        print(f"{m.num_samples} EtC CIFAR-10 training images in {len(m.shards)} shards "
              f"(JPEG q85 4:4:4), prepared in {time.perf_counter() - t:.1f} s; {cores} cores")
        t = time.perf_counter()
        blobs = [s["jpg"] for e in m.shards for s in iter_tar(read_shard(url, e["name"]), e["name"])]
        tar_s = time.perf_counter() - t
        print(f"read_shard + iter_tar, one process:            {len(blobs) / tar_s:10,.0f} img/s")
        for w in sorted({1, cores}):
            tb = bare_decode(blobs, w)
            print(f"bare simplejpeg decode, {w} process(es):         {len(blobs) / tb:10,.0f} img/s")
            dt, n = epoch(url, a.batch_size, w, "cpu")
            print(f"make_loader epoch, {w} worker(s), CPU decode:   {n / dt:10,.0f} img/s "
                  f"({n / dt / w:,.0f} per worker; {tb / len(blobs) * n / dt:.2f}x the bare decode rate)")
            dt, n = epoch(url, a.batch_size, w, "cuda")
            print(f"make_loader epoch, {w} worker(s), JPEG bytes:   {n / dt:10,.0f} img/s "
                  f"(the CPU part of decode=cuda)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
