"""Shards on real object storage servers started on 127.0.0.1 (SeaweedFS S3, fake-gcs-server)."""

import json
import threading
import time

import pytest

from etc_data.prepare import PrepareConfig, prepare_dataset
from etc_data.shards import iter_samples
from etc_data.verify import verify_split as verify
from etc_data.storage import StorageError, atomic_open, exists, read_bytes, write_bytes

from .conftest import make_mini_npz
from .servers import gcs_server, s3_server  # noqa: F401 - session fixtures

pytestmark = pytest.mark.slow


@pytest.fixture
def s3(s3_server):
    return s3_server


@pytest.fixture
def gcs(gcs_server):
    return gcs_server


@pytest.fixture
def mini_npz(tmp_path, cifar_exact):
    return make_mini_npz(tmp_path / "cifar10-mini.npz", cifar_exact, 70, 20)


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_prepare_verify_and_append_on_object_storage(store, request, mini_npz, key_file, tmp_path):
    srv = request.getfixturevalue(store)
    url = f"{'s3' if store == 's3' else 'gs'}://etc-bucket/{tmp_path.name}/ds"
    opts = srv.storage_options()
    base = dict(source=str(mini_npz), out=url, dataset="c10", key_ref=str(key_file), codec="jpeg:q=85,sub=444",
                shard_size=30, storage_options=opts)
    prepare_dataset(PrepareConfig(**base, limit=50))
    summ = prepare_dataset(PrepareConfig(**base))  # append the remaining 20 train images
    assert summ.written == {"train": 20, "test": 0} and summ.manifests["train"].num_samples == 70
    rep = verify(f"{url}/train", deep=True, storage_options=opts)
    assert rep.ok and rep.samples == 70, rep.lines()
    keys = [s["__key__"] for s in iter_samples(f"{url}/train", opts)]
    assert len(set(keys)) == 70
    local = tmp_path / "local"
    prepare_dataset(PrepareConfig(**dict(base, out=str(local), storage_options={})))
    # the same input and key give the same shard bytes wherever they are stored
    remote_m = json.loads(read_bytes(f"{url}/test/manifest.json", opts))
    assert remote_m["shards"] == json.loads((local / "test" / "manifest.json").read_text())["shards"]
    assert json.loads(key_file.read_text())["secret"] not in json.dumps(remote_m)


def test_exception_inside_a_streamed_s3_upload_commits_nothing(s3):
    url = "s3://etc-bucket/atomic/half.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(url, s3.storage_options()) as f:
            f.write(b"x" * (6 << 20))  # past one multipart part
            raise RuntimeError("boom")
    assert not exists(url, s3.storage_options())


def test_s3_server_restart_during_upload_retries_to_completion(s3):
    url = "s3://etc-bucket/restart/shard.tar"
    opts = s3.storage_options()
    s3.stop()
    done = {}

    def upload():
        try:
            write_bytes(url, b"y" * (1 << 20), opts)
            done["ok"] = True
        except Exception as e:  # noqa: BLE001
            done["err"] = e

    t = threading.Thread(target=upload)
    t.start()
    time.sleep(1.5)
    s3.start()  # same data folder: a restart, not a new server
    t.join(60)
    assert done.get("ok"), done
    assert read_bytes(url, opts) == b"y" * (1 << 20)


def test_s3_server_down_is_a_clear_error_and_nothing_is_committed(s3, monkeypatch):
    import etc_data.storage

    monkeypatch.setattr(etc_data.storage, "RETRY_DELAYS", (0.2, 0.5))  # give up sooner than the default
    url = "s3://etc-bucket/down/shard.tar"
    opts = s3.storage_options()
    s3.stop()
    try:
        with pytest.raises(StorageError, match="cannot write s3://etc-bucket/down/shard.tar"):
            write_bytes(url, b"z" * 1000, opts)
    finally:
        s3.start()
    assert not exists(url, opts)


def test_s3_server_stopped_mid_multipart_upload_fails_clearly_and_commits_nothing(s3):
    url = "s3://etc-bucket/midway/big.tar"
    opts = s3.storage_options()
    chunk = b"w" * (1 << 20)
    try:
        with pytest.raises(StorageError, match="cannot write s3://etc-bucket/midway/big.tar: upload aborted"):
            with atomic_open(url, opts, block_size=5 << 20) as f:
                for i in range(24):
                    f.write(chunk)  # s3fs uploads a 5 MiB part each time its buffer fills
                    if i == 7:
                        s3.stop()  # parts already uploaded, the rest cannot be
        s3.start()
        assert not exists(url, opts)
        with atomic_open(url, opts) as f:  # the same upload after the restart completes whole
            for _ in range(12):
                f.write(chunk)
        assert read_bytes(url, opts) == chunk * 12
    finally:
        if s3.proc is None:
            s3.start()


def _no_aws_env(monkeypatch, tmp_path):
    import etc_data.storage

    monkeypatch.setattr(etc_data.storage, "_FS_CACHE", {})  # filesystems made from now on see no credentials
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no metadata-server probing
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))


def test_missing_credentials_fail_at_once_in_one_line_naming_the_url(s3, monkeypatch, tmp_path, caplog):
    from etc_data.manifest import ManifestError, ManifestMissing, read_manifest

    write_bytes("s3://etc-bucket/creds/train/manifest.json", b"{}", s3.storage_options())
    _no_aws_env(monkeypatch, tmp_path)
    t = time.time()
    with pytest.raises(StorageError) as e:
        read_bytes("s3://etc-bucket/creds/train/manifest.json", s3.storage_options())
    msg = str(e.value)
    assert time.time() - t < 5 and "\n" not in msg and "s3://etc-bucket/creds/train/manifest.json" in msg
    assert "NoCredentialsError" in msg and "AWS_ACCESS_KEY_ID" in msg
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]  # nothing retried
    with pytest.raises(ManifestError) as e:  # not "is this a split folder?": the cause is the credentials
        read_manifest("s3://etc-bucket/creds/train", s3.storage_options())
    assert not isinstance(e.value, ManifestMissing) and "split folder" not in str(e.value)


def test_server_gone_is_retried_visibly_then_one_line_naming_the_url(monkeypatch, caplog):
    import logging

    import etc_data.storage
    from .servers import free_port

    monkeypatch.setattr(etc_data.storage, "RETRY_DELAYS", (0.1, 0.2))
    opts = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"}}  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with caplog.at_level(logging.WARNING, logger="etc_data.storage"):
        with pytest.raises(StorageError) as e:
            read_bytes("s3://etc-bucket/gone/x.tar", opts)
    assert "cannot read s3://etc-bucket/gone/x.tar" in str(e.value) and "after 3 attempts" in str(e.value)
    retried = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retried) == 2 and all("s3://etc-bucket/gone/x.tar" in m for m in retried)


def test_no_storage_config_fails_fast_naming_the_url(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    t = time.time()
    with pytest.raises(StorageError) as e:  # AWS's public endpoint: unreachable offline, refused online
        read_bytes("s3://etc-bucket-no-config/x/manifest.json", {})
    assert time.time() - t < 20 and "s3://etc-bucket-no-config/x/manifest.json" in str(e.value)
    assert "\n" not in str(e.value)
    if "amazonaws.com" in str(e.value):
        assert "endpoint_url" in str(e.value) and "--storage-config" in str(e.value)


def test_loader_checks_the_shard_list_before_the_first_epoch(s3, mini_npz, key_file, tmp_path):
    from etc_data.loader import LoaderError, make_loader
    from etc_data.storage import remove

    url, opts = f"s3://etc-bucket/{tmp_path.name}/ds", s3.storage_options()
    prepare_dataset(PrepareConfig(source=str(mini_npz), out=url, dataset="c10", key_ref=str(key_file), shard_size=30,
                                  storage_options=opts, splits=["train"]))
    remove(f"{url}/train/train-000001.tar", opts)
    with pytest.raises(LoaderError, match="train-000001.tar"):
        make_loader(f"{url}/train", 16, workers=0, storage_options=opts)


def test_serve_check_reaches_the_bucket_of_a_pipeline(s3, mini_npz, key_file, tmp_path):
    """serve --check on object storage: the bucket answers with the environment's credentials, or
    the problem names the file, the field and the bucket. (S3 only: the fake GCS server needs a
    `token` option, which a pipeline file refuses.)"""
    import yaml

    from etc_data.pipelines import check_pipeline, load_pipeline

    def problems(bucket):
        body = {"name": "remote", "owner": "alice", "key_ref": str(key_file), "dataset": "c10",
                "source": str(mini_npz), "block_size": 8, "codec": "png",
                "storage": {"url": f"s3://{bucket}/{tmp_path.name}/ds", "storage_options": s3.storage_options()}}
        (tmp_path / "remote.yaml").write_text(yaml.safe_dump(body))
        return check_pipeline(load_pipeline(tmp_path / "remote.yaml"))

    assert problems("etc-bucket") == []
    (found,) = problems("no-such-bucket")
    assert found.startswith(f"{tmp_path / 'remote.yaml'}: field storage.url: ") and "no-such-bucket" in found


def test_one_writer_per_dataset_on_s3_and_a_dead_writers_lock_is_taken_over(s3, mini_npz, key_file, tmp_path):
    """The lock object on S3: created with a conditional write (of two racing runs exactly one
    wins), refused to a second writer naming the holder, taken over when its holder is dead."""
    import os
    import socket
    import subprocess
    import sys

    from etc_data.locks import LOCK_NAME, LockError, dataset_lock, read_lock
    from etc_data.storage import join

    opts = s3.storage_options()
    url = f"s3://etc-bucket/{tmp_path.name}/locked"
    cfg = PrepareConfig(source=str(mini_npz), out=url, dataset="c10", key_ref=str(key_file), codec="png",
                        block_size=8, workers=1, storage_options=opts)
    outcome: list[str] = []
    start = threading.Barrier(2)

    def writer():
        start.wait()
        try:
            with dataset_lock(url, opts):
                time.sleep(1.0)
                outcome.append("held")
        except LockError as e:
            outcome.append(str(e))

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcome)[0] == "held" and f"pid {os.getpid()}" in sorted(outcome)[1], outcome
    assert read_lock(url, opts) is None  # released

    with dataset_lock(url, opts):
        assert read_lock(url, opts)["pid"] == os.getpid()
        with pytest.raises(LockError, match=rf"being written by another prepare run \(.*pid {os.getpid()}.*lease until"):
            prepare_dataset(cfg)
    assert not exists(join(url, "train", "manifest.json"), opts)

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)  # a run on this host that was killed with its lock held
    write_bytes(join(url, LOCK_NAME), json.dumps({"holder": f"someone pid {dead}", "host": socket.gethostname(),
                                                  "pid": dead, "run": "dead-run",
                                                  "expires": time.time() + 300}).encode(), opts)
    summary = prepare_dataset(cfg)
    assert summary.manifests["train"].num_samples == 70 and read_lock(url, opts) is None
