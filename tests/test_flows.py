"""The Prefect side: the prepare flow on the ephemeral API, its artifacts, key hygiene, and Dask."""

import json

import pytest

from etc_data.cli import main
from etc_data.manifest import read_manifest

from .conftest import make_mini_npz


@pytest.fixture
def mini_npz(tmp_path, cifar_exact):
    return make_mini_npz(tmp_path / "cifar10-mini.npz", cifar_exact, 90, 30)


@pytest.mark.usefixtures("prefect_in_process")
def test_cli_prepare_runs_the_flow_and_keeps_the_key_out_of_prefect(tmp_path, mini_npz, key_file, capsys):
    out = tmp_path / "ds"
    rc = main(["prepare", "--source", str(mini_npz), "--key", str(key_file), "--out", str(out), "--dataset", "c10",
               "--codec", "jpeg:q=85,sub=444", "--shard-size", "40", "--workers", "2"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "train: 90 samples in 3 shards" in cap.out and "verified" in cap.out
    assert "30.9 bits" in cap.err  # the loud key-space warning of the paper's CIFAR setting
    assert read_manifest(str(out / "test")).num_samples == 30
    secret = json.loads(key_file.read_text())["secret"]
    assert secret not in cap.out + cap.err

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    import anyio

    async def inspect():
        async with get_client() as c:
            runs = await c.read_flow_runs()
            arts = await c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["prepare-c10-sizes", "prepare-c10-summary"])))
            return runs, arts

    runs, arts = anyio.run(inspect)
    ours = [r for r in runs if r.parameters.get("out") == str(out)]
    assert ours and ours[0].state.is_completed()
    assert secret not in json.dumps(ours[0].parameters, default=str)
    assert ours[0].parameters["key_ref"] == str(key_file)
    kinds = {a.key: a for a in arts}
    assert {"prepare-c10-sizes", "prepare-c10-summary"} <= set(kinds)
    assert "c10" in kinds["prepare-c10-summary"].data and secret not in kinds["prepare-c10-summary"].data


@pytest.mark.usefixtures("prefect_in_process")
def test_cli_prepare_error_is_named_and_nonzero(tmp_path, mini_npz, capsys):
    rc = main(["prepare", "--source", str(mini_npz), "--key", str(tmp_path / "nope.key"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "error: the key given with --key does not exist" in err and "nope.key" not in err
    assert not (tmp_path / "o" / "train" / "manifest.json").exists()


@pytest.mark.usefixtures("prefect_in_process")
def test_prepare_flow_on_a_local_dask_cluster(tmp_path, mini_npz, key_file):
    from distributed import LocalCluster

    from etc_data.flows import prepare as fp

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        flow_fn = fp.make_prepare_flow(dask_address=cluster.scheduler_address)
        res = flow_fn(source=[str(mini_npz)], out=str(tmp_path / "dask"), dataset="c10", key_ref=str(key_file),
                      codec="png", shard_size=25)
    assert res["splits"] == {"train": 90, "test": 30}
    assert read_manifest(str(tmp_path / "dask" / "train")).shard_lengths == [25, 25, 25, 15]


@pytest.mark.usefixtures("prefect_in_process")
def test_train_flow_wraps_the_trainer(tmp_path, mini_npz, key_file):
    from etc_data.prepare import PrepareConfig, prepare_dataset
    from etc_data.flows.train import train_flow

    prepare_dataset(PrepareConfig(source=str(mini_npz), out=str(tmp_path / "ds"), dataset="c10", key_ref=str(key_file),
                     codec="jpeg:q=90,sub=444", shard_size=50))
    res = train_flow(shards=str(tmp_path / "ds" / "train"), test_shards=str(tmp_path / "ds" / "test"),
                     out=str(tmp_path / "run"), key_ref=str(key_file), epochs=1, batch_size=16, device="cpu",
                     workers=1,  # one spawned DataLoader worker: the flow's start method is exercised
                     model={"arch": "convmixer", "dim": 8, "depth": 1, "kernel": 3, "patch": 4})
    assert res["epochs"] == 1 and 0 <= res["test_acc"] <= 1 and (tmp_path / "run" / "last.pt").exists()


@pytest.mark.usefixtures("prefect_in_process")
def test_report_flow_merges_per_split_tasks_into_the_library_report(tmp_path, mini_npz, key_file):
    from etc_data.keys import load_key
    from etc_data.report import measure_sizes as size_report
    from etc_data.sources import open_source
    from etc_data.flows.report import report_flow

    res = report_flow(source=[str(mini_npz)], out=str(tmp_path / "rep"), schemes=["plain", "etc"],
                      codecs=["png", "jpeg:q=85,sub=444"], block_size=8, key_ref=str(key_file), dataset="c10")
    direct = size_report(open_source(str(mini_npz)), ["plain", "etc"], ["png", "jpeg:q=85,sub=444"], 8,
                         load_key(key_file), "c10").to_json()
    assert res["images"] == 120 and res["results"] == direct["results"]
    saved = json.loads((tmp_path / "rep" / "sizes.json").read_text())
    assert saved["results"] == direct["results"] and (tmp_path / "rep" / "sizes.png").stat().st_size > 0
    assert json.loads(key_file.read_text())["secret"] not in json.dumps(saved)


def test_cli_prepare_in_a_fresh_process_boots_its_own_api_server(tmp_path, mini_npz, key_file, fresh_prefect_home):
    """The main command as users run it: a new process, the key in an environment variable, the
    ephemeral API server started early by the CLI (flows/ephemeral.py) and gone afterwards."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ETC_TEST_OWNER_KEY=key_file.read_text(), PREFECT_HOME=str(fresh_prefect_home))
    env.pop("PREFECT_API_URL", None)
    r = subprocess.run([sys.executable, "-m", "etc_data.cli", "prepare", "--source", str(mini_npz), "--key",
                        "env:ETC_TEST_OWNER_KEY", "--out", str(tmp_path / "ds"), "--dataset", "c10", "--shard-size", "50"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train: 90 samples in 2 shards" in r.stdout and "test: 30 samples in 1 shards" in r.stdout
    verified = next(line for line in r.stdout.splitlines() if line.startswith("verified:"))
    assert "train 90" in verified and "test 30" in verified
    secret = json.loads(key_file.read_text())["secret"]
    assert secret not in r.stdout + r.stderr
    assert read_manifest(str(tmp_path / "ds" / "train")).num_samples == 90
    from pathlib import Path

    for proc in Path("/proc").iterdir():  # a server of this run would still see our PREFECT_HOME
        if not proc.name.isdigit():
            continue
        try:
            cmdline, environ = (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"prefect.server" in cmdline:
            assert str(fresh_prefect_home).encode() not in environ, "the CLI left its API server running"


def test_ephemeral_api_server_never_sees_the_key_variable(fresh_prefect_home, monkeypatch):
    import os
    import urllib.request

    from etc_data.cli.ephemeral import EphemeralAPI

    monkeypatch.setenv("PREFECT_HOME", str(fresh_prefect_home))
    monkeypatch.setenv("ETC_TEST_HIDDEN", "owner-key-material")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    api = EphemeralAPI(hide_env=("ETC_TEST_HIDDEN",))
    try:
        assert os.environ["PREFECT_API_URL"] == api.url
        api.wait()
        with urllib.request.urlopen(api.url + "/health", timeout=5) as resp:
            assert resp.status == 200
        environ = open(f"/proc/{api.proc.pid}/environ", "rb").read().split(b"\0")
        assert not any(e.startswith(b"ETC_TEST_HIDDEN=") for e in environ)
        assert b"PREFECT__SERVER_EPHEMERAL=1" in environ
        proc = api.proc
    finally:
        api.stop()
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert proc.poll() is not None and api.proc is None


def test_ephemeral_api_server_dies_with_a_killed_cli(tmp_path):
    """A CLI killed with SIGKILL (OOM, a scheduler timeout) takes its API server with it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "ph"))
    env.pop("PREFECT_API_URL", None)
    parent = subprocess.Popen([sys.executable, "-c", "from etc_data.cli.ephemeral import EphemeralAPI\n"
                               "import time\na = EphemeralAPI()\nprint(a.proc.pid, flush=True)\ntime.sleep(600)"],
                              env=env, stdout=subprocess.PIPE, text=True)
    server = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(server, 0)
        except ProcessLookupError:
            return
        try:  # a zombie still answers kill(0); its parent (init) reaps it
            if open(f"/proc/{server}/stat").read().split(")")[1].split()[0] == "Z":
                return
        except OSError:
            return
        time.sleep(0.2)
    os.kill(server, signal.SIGKILL)
    raise AssertionError("the API server outlived its killed parent")
