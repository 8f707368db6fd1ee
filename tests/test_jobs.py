"""The library owns every job: one public function per job, exported lazily from ``etc_data``;
the library never imports Prefect; prepare's worker pool gives the same bytes as one process and
dies with its parent; outputs go through the storage layer."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from etc_data.prepare import PrepareConfig, PrepareError, prepare_dataset

from .conftest import make_image_zip, make_mini_npz
from .servers import alive

JOBS = {"prepare_dataset": "PrepareConfig", "verify_dataset": "VerifyConfig", "encrypt_folder": "FolderConfig",
        "decrypt_folder": "FolderConfig", "size_report": "ReportConfig", "train_model": "TrainConfig",
        "evaluate_checkpoint": "EvalConfig", "encrypt_model": "ModelCryptConfig", "audit_schemes": "AuditConfig"}


def test_import_is_light_and_every_job_is_exported():
    code = ("import sys, json, etc_data\n"
            "light = sorted(m for m in ('numpy', 'torch', 'timm', 'prefect', 'PIL') if m in sys.modules)\n"
            f"names = {sorted(JOBS)!r} + {sorted(set(JOBS.values()))!r}\n"
            "objs = [getattr(etc_data, n) for n in names]\n"
            "print(json.dumps({'light': light, 'callable': all(callable(o) for o in objs)}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(r.stdout) == {"light": [], "callable": True}


def test_library_modules_never_import_prefect():
    import pkgutil

    import etc_data

    mods = [m.name for m in pkgutil.iter_modules(etc_data.__path__) if m.name not in ("cli", "flows", "dwconv")]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n    importlib.import_module('etc_data.' + m)\n"
            "print('prefect' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False", mods


def test_a_local_run_and_its_verification_never_import_fsspec(tmp_path, cifar_exact, key_file):
    # local storage is served by os directly: fsspec (and asyncio, which it imports) cost ~0.3 s
    npz = make_mini_npz(tmp_path / "m.npz", cifar_exact, 30, 10)
    code = ("import json, sys\n"
            "from etc_data.prepare import PrepareConfig, prepare_dataset\n"
            "from etc_data.verify import VerifyConfig, verify_dataset\n"
            f"s = prepare_dataset(PrepareConfig(source={str(npz)!r}, out={str(tmp_path / 'o')!r}, dataset='d', "
            f"key_ref={str(key_file)!r}, shard_size=8))\n"
            f"s = prepare_dataset(PrepareConfig(source={str(npz)!r}, out={str(tmp_path / 'o')!r}, dataset='d', "
            f"key_ref={str(key_file)!r}, shard_size=8))\n"
            f"ok = verify_dataset(VerifyConfig(url={str(tmp_path / 'o')!r}, deep=True)).ok\n"
            "print(json.dumps([ok, sorted(m for m in ('fsspec', 'asyncio') if m in sys.modules)]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [True, []]


def test_pool_and_in_process_runs_write_identical_shards(tmp_path, cifar_exact, key_file):
    npz = make_mini_npz(tmp_path / "m.npz", cifar_exact, 120, 40)
    seen = []
    base = dict(source=str(npz), dataset="d", key_ref=str(key_file), codec="jpeg:q=90,sub=444", shard_size=25)
    one = prepare_dataset(PrepareConfig(out=str(tmp_path / "one"), workers=1, **base), progress=seen.append)
    two = prepare_dataset(PrepareConfig(out=str(tmp_path / "two"), workers=2, **base))
    assert sorted((r.split, r.index) for r in seen) == [("test", 0), ("test", 1)] + [("train", i) for i in range(5)]
    for split in ("train", "test"):
        assert one.manifests[split].shards == two.manifests[split].shards
    assert one.verified == two.verified == {"train": 120, "test": 40}


def test_a_failing_chunk_in_the_pool_is_named_and_nothing_is_committed(tmp_path, cifar_exact, key_file):
    import io
    import zipfile

    from PIL import Image

    z = tmp_path / "imgs.zip"
    with zipfile.ZipFile(z, "w") as f:
        for i in range(40):
            b = io.BytesIO()
            Image.fromarray(cifar_exact["x_test"][i]).save(b, format="PNG")
            f.writestr(f"train/c{int(cifar_exact['y_test'][i])}/{i:04d}.png", b.getvalue())
        f.writestr("train/c1/0037x.png", b"\x89PNG broken")
    with pytest.raises(Exception, match="0037x.png"):
        prepare_dataset(PrepareConfig(source=str(z), out=str(tmp_path / "o"), dataset="d", key_ref=str(key_file),
                                      codec="png", shard_size=10, workers=2))
    assert not (tmp_path / "o" / "train" / "manifest.json").exists()


def test_bad_settings_are_refused_naming_the_field(tmp_path):
    for kw, field in [({"shard_size": 0}, "shard-size"), ({"limit": -1}, "limit"), ({"max_shard_bytes": -5},
                      "max-shard-bytes"), ({"workers": 0}, "workers"), ({"on_bad_image": "ignore"}, "on-bad-image")]:
        with pytest.raises(PrepareError, match=field):
            prepare_dataset(PrepareConfig(source="x.npz", out=str(tmp_path / "o"), **kw))


POOL_SCRIPT = """
import sys, time
from etc_data.workers import WorkerPool
pool = WorkerPool(2)
print(" ".join(map(str, pool.pids())), flush=True)
time.sleep(600)
"""


def test_pool_workers_die_with_a_killed_parent(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", POOL_SCRIPT], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in p.stdout.readline().split()]
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)


def test_a_dead_worker_fails_its_chunk_with_a_named_error(tmp_path, cifar_exact, key_file):
    from etc_data.prepare import ChunkSpec
    from etc_data.workers import WorkerError, WorkerPool

    npz = make_mini_npz(tmp_path / "m.npz", cifar_exact, 20)
    cfg = PrepareConfig(source=str(npz), out=str(tmp_path / "o"), dataset="d", key_ref=str(key_file))
    pool = WorkerPool(1)
    try:
        assert pool.run(cfg, ChunkSpec("train", 0, list(range(10)))).shards[0]["samples"] == 10
        os.kill(pool.pids()[0], signal.SIGKILL)
        time.sleep(0.5)
        with pytest.raises(WorkerError, match="died with exit code"):
            pool.run(cfg, ChunkSpec("train", 1, list(range(10, 20))))
    finally:
        pool.terminate()


def test_workers_given_the_opened_source_use_its_listing_not_their_own(tmp_path, cifar_exact, key_file):
    # an image added to the folder after the planner listed it: a worker that lists the folder itself
    # sees another split than the one planned and refuses; one given the planner's listing runs the chunk
    from PIL import Image

    from etc_data.prepare import ChunkSpec
    from etc_data.workers import WorkerPool

    folder = tmp_path / "src"
    for i in range(12):
        (folder / "train" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(cifar_exact["x_test"][i]).save(folder / "train" / f"c{i % 3}" / f"{i:03d}.png")
    cfg = PrepareConfig(source=str(folder), out=str(tmp_path / "o"), dataset="d", key_ref=str(key_file), codec="png")
    opened = cfg.open_source()
    spec = ChunkSpec("train", 0, list(range(12)), opened.split_token("train"))
    Image.fromarray(cifar_exact["x_test"][20]).save(folder / "train" / "c0" / "020.png")
    with WorkerPool(1, warm=cfg, source=opened) as pool:
        r = pool.run(cfg, spec)
    assert r.shards[0]["samples"] == 12 and r.shards[0]["keys"] == [it.key for it in opened.items("train")]
    with WorkerPool(1, warm=cfg) as pool:
        with pytest.raises(PrepareError, match="changed since this run was planned"):
            pool.run(cfg, ChunkSpec("train", 1, list(range(12)), spec.token))


def test_an_early_pool_is_stopped_unused_when_the_plan_needs_none(tmp_path, shared_dir, cifar_exact, key_file,
                                                                  monkeypatch):
    # prepare starts its workers before planning when the source is large enough (before listing it
    # when its zip files declare enough entries); a rerun with nothing left to write, or a listing
    # smaller than the count, stops them without sending them anything
    import zipfile
    from dataclasses import replace

    import etc_data.codecs as codecs
    import etc_data.workers as workers

    monkeypatch.setattr(codecs, "default_workers", lambda: 2)
    started = []

    class Recording(workers.WorkerPool):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.before_listing = k.get("source_follows", False)
            started.append(self)

        def submit(self, cfg, spec):
            self.submitted = getattr(self, "submitted", 0) + 1
            return super().submit(cfg, spec)

    monkeypatch.setattr(workers, "WorkerPool", Recording)
    cfg = PrepareConfig(source=str(shared_dir / "cifar10-test-jpeg.zip"), out=str(tmp_path / "o"), dataset="d",
                        key_ref=str(key_file), shard_size=2500, limit=4000, workers=2)
    first = prepare_dataset(cfg)
    assert first.written == {"test": 4000} and len(started) == 1 and started[0].submitted == 2
    again = prepare_dataset(cfg)
    assert again.written == {"test": 0} and len(started) == 2 and not hasattr(started[1], "submitted")
    assert all(not p.is_alive() for pool in started for p in pool._procs)
    # without a limit, the 10,000 entries the zip declares start the workers before the listing
    started.clear()
    whole = prepare_dataset(replace(cfg, out=str(tmp_path / "w"), limit=None))
    assert whole.written == {"test": 10000} and len(started) == 1 and started[0].submitted == 4
    assert started[0].before_listing
    # a zip that declares 20,000 entries of which 24 are images: the workers started on the count are
    # stopped once the listing shows a run for threads, and the run is done without them
    z = make_image_zip(tmp_path / "mostly-notes.zip", cifar_exact["x_test"][:24], [i % 2 for i in range(24)],
                       ["c0", "c1"])
    with zipfile.ZipFile(z, "a") as f:
        for i in range(20000):
            f.writestr(f"notes/{i}.txt", b"")
    started.clear()
    small = prepare_dataset(PrepareConfig(source=str(z), out=str(tmp_path / "n"), dataset="n", key_ref=str(key_file),
                                          codec="png", shard_size=10))
    assert small.written == {"train": 24} and small.verified == {"train": 24}
    assert len(started) == 1 and started[0].before_listing and not hasattr(started[0], "submitted")
    assert all(not p.is_alive() for p in started[0]._procs)


def test_train_and_report_outputs_go_through_the_storage_layer(tmp_path, cifar_exact, key_file):
    """``--out memory://...`` (any fsspec URL) is written through fsspec, not as a local folder."""
    import fsspec

    from etc_data.checkpoint import load_checkpoint
    from etc_data.report import ReportConfig, size_report
    from etc_data.train import TrainConfig, train_model

    npz = make_mini_npz(tmp_path / "m.npz", cifar_exact, 64, 32)
    prepare_dataset(PrepareConfig(source=str(npz), out=str(tmp_path / "ds"), dataset="d", key_ref=str(key_file),
                                  codec="png", shard_size=32))
    out = "memory://etc-data-test/run"
    train_model(TrainConfig(shards=str(tmp_path / "ds" / "train"), test_shards=str(tmp_path / "ds" / "test"), out=out,
                            key_ref=str(key_file), model={"arch": "convmixer", "dim": 8, "depth": 1, "kernel": 3,
                                                          "patch": 4},
                            epochs=1, batch_size=16, workers=0, device="cpu"), progress=False)
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("/etc-data-test/run", detail=False))
    assert names == ["best.pt", "curves.png", "last.pt", "metrics.jsonl"]
    assert load_checkpoint(out + "/last.pt")["epoch"] == 0
    assert not (tmp_path / "memory:").exists() and not os.path.exists("memory:")
    size_report(ReportConfig(source=str(npz), schemes=["plain"], codecs=["png"], out="memory://etc-data-test/rep"))
    assert json.loads(fs.cat("/etc-data-test/rep/sizes.json"))["images"] == 96
