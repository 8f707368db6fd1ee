"""Prepare on a Dask cluster of separate worker processes (``etc_data.cluster``): what a worker
killed in the middle of a run leaves behind."""

import hashlib
import json
import os
import signal
import threading
import time

import pytest

from etc_data.prepare import PrepareConfig, prepare_dataset
from etc_data.verify import verify_split

from .conftest import make_mini_npz

pytest.importorskip("distributed")


def _hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.tar"))}


def _manifest(root, split):
    m = json.loads((root / split / "manifest.json").read_text())
    for k in ("created", "signature"):  # the signature covers "created"
        m.pop(k)
    return m


def test_worker_killed_mid_shard_the_run_ends_with_the_uninterrupted_shards(tmp_path, cifar_exact, key_file):
    from distributed import Client, LocalCluster

    from etc_data.cluster import dask_map_chunks

    src = make_mini_npz(tmp_path / "c10.npz", cifar_exact, 4000, 0)
    base = dict(source=str(src), dataset="d", key_ref=str(key_file), codec="jpeg:q=90,sub=444", shard_size=250,
                workers=1)
    ref, out = tmp_path / "ref", tmp_path / "dask"
    prepare_dataset(PrepareConfig(out=str(ref), **base))  # uninterrupted, in this process

    killed = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)  # worker address -> pid

        def kill_one_mid_shard():
            deadline = time.time() + 120
            while time.time() < deadline and not killed:
                parts = [p.name for p in (out / "train").glob(".*.part")] if (out / "train").exists() else []
                busy = [a for a, keys in client.processing().items() if keys and a in pids]
                if parts and busy and len(list((out / "train").glob("*.tar"))) >= 2:
                    os.kill(pids[busy[0]], signal.SIGKILL)  # the worker dies while writing a shard
                    killed.update(worker=busy[0], parts=parts)
                    return
                time.sleep(0.002)

        t = threading.Thread(target=kill_one_mid_shard)
        t.start()
        try:
            # Dask runs the dead worker's chunk again elsewhere; should it give up, the user's rerun finishes
            prepare_dataset(PrepareConfig(out=str(out), **base), map_chunks=dask_map_chunks(client))
        except Exception:  # noqa: BLE001 - e.g. KilledWorker: the committed state is the old one, rerun
            prepare_dataset(PrepareConfig(out=str(out), **base), map_chunks=dask_map_chunks(client))
        t.join()
    assert killed, "no worker was caught writing a shard"
    assert _hashes(out) == _hashes(ref) and len(_hashes(ref)) == 16
    assert _manifest(out, "train") == _manifest(ref, "train")
    assert not list(out.rglob("*.part"))  # the dead worker's temporary shard is removed at the commit
    assert verify_split(str(out / "train")).ok
