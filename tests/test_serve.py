"""Pipelines and ``etc-data serve`` against a real Prefect server on loopback: a run that the
server's scheduler creates, runs triggered through the API, SIGTERM in the middle of a run and a
restart. One server for the module; its scheduler loops every second."""

import os
import signal
import subprocess
import sys
import time

import anyio
import numpy as np
import pytest
import yaml

from etc_data.keys import new_key_file
from etc_data.manifest import read_manifest
from etc_data.pipelines import PipelineError, check_pipeline, load_pipeline, load_pipelines
from etc_data.verify import VerifyConfig, verify_dataset

from .servers import PrefectServer, alive, descendants, stop_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_pipeline(tmp_path, npz, key_file, name="mini", **extra):
    body = {"name": name, "owner": "alice", "key_ref": str(key_file), "dataset": name, "source": str(npz),
            "scheme": "etc", "block_size": 8, "codec": "png", "shard_size": 40,
            "storage": {"url": str(tmp_path / "served")}, "schedule": {"cron": "0 3 * * *"}}
    body.update(extra)
    d = tmp_path / "pipes"
    d.mkdir(exist_ok=True)
    (d / f"{name}.yaml").write_text(yaml.safe_dump(body))
    return d


def test_pipeline_validation_names_file_and_field(tmp_path, key_file, cifar_exact):
    d = _write_pipeline(tmp_path, "x.npz", key_file)
    assert load_pipelines(d)[0].name == "mini"
    for extra, pattern in [({"shard_size": 0}, r"mini\.yaml: field shard_size"),
                           ({"schedule": {"cron": "61 * * * *"}}, r"field schedule\.cron"),
                           ({"schedule": {"cron": "0 3 * * *", "timezone": "Mars/Olympus"}},
                            r"mini\.yaml: field schedule\.timezone: .*'Mars/Olympus' is not an IANA timezone"),
                           ({"codec": "jpeg:q=500"}, r"mini\.yaml.*codec parameter q"),
                           ({"storage": {"url": "s3://b", "storage_options": {"secret": "x"}}},
                            r"mini\.yaml: field 'storage\.storage_options\.secret' looks like a secret"),
                           ({"key_ref": "ab" * 32}, r"field key_ref: .*looks like a secret key itself"),
                           ({"colour": "red"}, r"field colour: Extra inputs")]:
        d = _write_pipeline(tmp_path, "x.npz", key_file, **extra)
        with pytest.raises(PipelineError, match=pattern):
            load_pipeline(d / "mini.yaml")


def test_shipped_pipelines_are_valid():
    names = {p.name for p in load_pipelines(os.path.join(ROOT, "pipelines"))}
    assert {"cifar10-etc", "imagenette-etc"} <= names



def test_check_names_what_a_scheduled_run_would_fail_on(tmp_path, key_file, cifar_exact, capsys, monkeypatch):
    """serve --check meets what a 03:00 run would: the key file and its mode, an unset variable, a
    missing source or split, unusable storage, a dataset made with another key. Never the key."""
    from etc_data.cli import main
    from etc_data.prepare import PrepareConfig, prepare_dataset

    npz = tmp_path / "mini.npz"
    np.savez(npz, x_train=cifar_exact["x_train"][:30], y_train=cifar_exact["y_train"][:30])
    d = _write_pipeline(tmp_path, npz, key_file)
    p = load_pipeline(d / "mini.yaml")
    assert check_pipeline(p) == []
    secret = yaml.safe_load(key_file.read_text())["secret"]

    def problems(**change):
        return check_pipeline(load_pipeline(_write_pipeline(tmp_path, npz, key_file, **change) / "mini.yaml"))

    os.chmod(key_file, 0o644)
    assert problems() == [f"{d / 'mini.yaml'}: field key_ref: the key given with --key is a key file readable or "
                          f"writable by group/others (mode 0644); run chmod 600 on it"]
    os.chmod(key_file, 0o600)
    monkeypatch.delenv("ETC_DATA_TEST_KEY", raising=False)
    assert "field key_ref: environment variable ETC_DATA_TEST_KEY is not set" in problems(key_ref="env:ETC_DATA_TEST_KEY")[0]
    # plain datasets are signed with the owner key too: its problems are found for them as well
    assert "field key_ref: environment variable ETC_DATA_TEST_KEY is not set" in problems(
        scheme="plain", key_ref="env:ETC_DATA_TEST_KEY")[0]
    assert "field key_ref: the key given with --key does not exist" in problems(key_ref=str(tmp_path / "gone.key"))[0]
    assert "field source: source" in problems(source=str(tmp_path / "gone.npz"))[0]
    assert "field splits: source has no split val" in problems(splits=["train", "val"])[0]
    (tmp_path / "a-file").write_text("")
    assert "field storage.url:" in problems(storage={"url": str(tmp_path / "a-file" / "ds")})[0]
    # a dataset already at the storage URL, made with another key: a run would refuse to append
    other = tmp_path / "other.key"
    new_key_file(other, "bob")
    prepare_dataset(PrepareConfig(source=str(npz), out=str(tmp_path / "served"), dataset="mini", key_ref=str(other),
                                  block_size=8, codec="png"))
    (found,) = problems()
    assert "field storage.url:" in found and "key_fingerprint" in found

    # the command: every problem of every file, exit 2, no key material
    os.chmod(key_file, 0o640)
    (d / "broken.yaml").write_text("name: broken\nschedule: {cron: '0 3 * * *', timezone: Mars/Olympus}\n")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["serve", str(d), "--check"]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml: field owner" in err and "field key_ref: the key given with --key is a key file" in err and "mode 0640" in err
    assert "serve needs a running Prefect server" in err and "3 problem(s)" in err and secret not in err


FLOW_RUN_PROCESS = """
import time
from etc_data.flows.prepare import _end_with_serve
_end_with_serve()
print("armed", flush=True)
time.sleep(120)
"""


def test_a_flow_run_process_of_serve_ends_when_serve_is_killed():
    """What a served run does at its start: serve killed by SIGKILL (a crash, the OOM killer) must not
    leave its flow-run processes working on as orphans (Prefect starts them as plain children)."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "import os, subprocess, sys\nos.environ['ETC_DATA_SERVE_PID'] = str(os.getpid())\n"
         f"p = subprocess.Popen([sys.executable, '-c', {FLOW_RUN_PROCESS!r}])\nprint(p.pid, flush=True)\np.wait()"],
        stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "armed"
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while alive(child) and time.time() < deadline:
        time.sleep(0.05)
    if alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the flow-run process outlived the killed serve")


# --- against a real Prefect server ------------------------------------------------------------

class Served:
    """``etc-data serve FOLDER`` in the background, its output in ``log_path``."""

    def __init__(self, folder, env, log_path):
        self.folder, self.env, self.log_path = folder, env, log_path
        self.proc = None

    def start(self) -> "Served":
        self.proc = subprocess.Popen([sys.executable, "-m", "etc_data.cli", "serve", str(self.folder)], env=self.env,
                                     stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` to serve alone (as Docker and Kubernetes do) and wait for it to exit."""
        os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            pytest.fail(f"serve did not stop within {timeout} s of {sig!r}:\n{self.log()[-3000:]}")


def _api(server, fn, *args):
    """Run ``await fn(client, *args)`` against the server."""
    from prefect.client.orchestration import get_client

    async def main():
        async with get_client() as c:
            return await fn(c, *args)

    with server.client_settings():
        return anyio.run(main)


def _wait(what: str, fn, timeout: float, every: float = 0.5):
    deadline = time.time() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


async def _deployment(c, name):
    from prefect.exceptions import ObjectNotFound

    try:
        return await c.read_deployment_by_name(f"etc-prepare/{name}")
    except ObjectNotFound:
        return None


async def _runs_of(c, dep_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return await c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id])))


def _npz(path, cifar_exact, n):
    np.savez(path, x_train=cifar_exact["x_train"][:n], y_train=cifar_exact["y_train"][:n])
    return path


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    srv = PrefectServer(tmp_path_factory.mktemp("prefect-server")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def every_minute(prefect_server, tmp_path_factory, cifar_exact):
    """A pipeline on an every-minute cron in Europe/Paris, served from the first test that asks for it
    to the end of the module, so that waiting for the next minute overlaps the other tests."""
    root = tmp_path_factory.mktemp("every-minute")
    key = root / "owner.key"
    new_key_file(key, "alice")
    folder = _write_pipeline(root, _npz(root / "src.npz", cifar_exact, 60), key, name="every-minute",
                             schedule={"cron": "* * * * *", "timezone": "Europe/Paris"})
    served = Served(folder, prefect_server.env(), root / "serve.log").start()
    yield served, root / "served", time.time()
    stop_process(served.proc)


@pytest.mark.slow
def test_sigterm_mid_run_cancels_it_frees_its_slot_kills_its_workers_and_a_restart_resumes(
        prefect_server, every_minute, tmp_path, cifar_exact, key_file):
    folder = _write_pipeline(tmp_path, _npz(tmp_path / "src.npz", cifar_exact, 300), key_file, name="ingest",
                             shard_size=15, workers=2)
    out = tmp_path / "served"
    served = Served(folder, prefect_server.env(), tmp_path / "serve.log").start()
    dep = _wait("the deployment", lambda: _api(prefect_server, _deployment, "ingest"), 120)
    assert dep.schedules[0].schedule.cron == "0 3 * * *" and dep.schedules[0].schedule.timezone == "UTC"
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1

    async def trigger(c):
        return (await c.create_flow_run_from_deployment(dep.id)).id

    run_id = _api(prefect_server, trigger)
    # in the middle of the run: its flow-run process has started its pool of prepare workers
    pids = _wait("the run's worker processes", lambda: [
        pid for pid in descendants(served.proc.pid)
        if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()] and descendants(served.proc.pid), 120, 0.05)
    assert served.stop(signal.SIGTERM) == 0
    _wait("the run's processes to end", lambda: not any(alive(p) for p in pids), 10)

    async def after_stop(c):
        return await c.read_flow_run(run_id), await _deployment(c, "ingest")

    run, dep = _api(prefect_server, after_stop)
    assert run.state.type.value in ("CANCELLED", "CRASHED") and "serve stopped (SIGTERM)" in run.state.message
    assert dep.global_concurrency_limit.active_slots == 0  # released now, not after the slot's lease expires
    assert dep.paused and "paused until `etc-data serve` runs again" in served.log()

    # runs that fell due while nothing served (as after a crash: their state is Late)
    async def missed(c):
        from datetime import datetime, timedelta, timezone

        from prefect.states import Late

        now = datetime.now(timezone.utc)
        return [(await c.create_flow_run_from_deployment(dep.id, state=Late(scheduled_time=now - timedelta(minutes=m)))).id
                for m in (3, 2, 1)]

    late = _api(prefect_server, missed)
    # a restart resumes the schedule and runs only the latest missed run, which the interrupted
    # run does not hold back
    served = Served(folder, prefect_server.env(), tmp_path / "serve2.log").start()
    _wait("the missed runs to be handled", lambda: "scheduled runs were missed" in served.log(), 120)
    assert "serving etc-prepare/ingest: cron '0 3 * * *' (UTC) - resumed: it was paused" in served.log()
    assert "ingest: 3 scheduled runs were missed while serve was not running; only the latest runs now" in served.log()
    assert not _api(prefect_server, _deployment, "ingest").paused

    async def final(c):
        r = await c.read_flow_run(late[-1])
        return r if r.state.is_final() else None

    run = _wait("the latest missed run", lambda: _api(prefect_server, final), 180)
    assert run.state.is_completed(), run.state
    assert {r.id for r in _api(prefect_server, _runs_of, dep.id)}.isdisjoint(late[:2])  # the older two are gone
    assert read_manifest(str(out / "train")).num_samples == 300
    # whatever the interrupted run left uncommitted was removed by this one
    assert verify_dataset(VerifyConfig(url=str(out), strict=True)).ok
    assert served.stop(signal.SIGINT) == 0


@pytest.mark.slow
def test_a_run_the_scheduler_created_completes_in_the_pipelines_timezone(prefect_server, every_minute):
    served, out, started = every_minute
    dep = _wait("the deployment", lambda: _api(prefect_server, _deployment, "every-minute"), 120)
    sched = dep.schedules[0].schedule
    assert (sched.cron, sched.timezone, dep.paused) == ("* * * * *", "Europe/Paris", False)

    def scheduled_and_completed():
        return [r for r in _api(prefect_server, _runs_of, dep.id) if r.state.is_completed()]

    runs = _wait("a scheduled run to complete", scheduled_and_completed, max(10, started + 150 - time.time()), 1)
    # created by the server's scheduler from the deployment's schedule, not through the API
    assert all(r.auto_scheduled and r.created_by.type == "SCHEDULE" and r.idempotency_key.startswith("scheduled ")
               for r in runs)
    assert read_manifest(str(out / "train")).num_samples == 60
    assert verify_dataset(VerifyConfig(url=str(out), strict=True, deep=True)).ok

    async def what_happened(c, run_id):
        from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId,
                                                    LogFilter, LogFilterFlowRunId)

        logs = await c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        tasks = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        arts = await c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["prepare-every-minute-sizes", "prepare-every-minute-summary"])))
        return [x.message for x in logs], [t.name for t in tasks], {a.key: a for a in arts}

    first = min(runs, key=lambda r: r.expected_start_time)

    def summary_logged():  # the run's logs reach the API in batches, possibly after its Completed state
        logs, tasks, arts = _api(prefect_server, what_happened, first.id)
        ok = any(m.startswith(f"prepared every-minute at {out}: train 60 (60 new, 2 shards, ")
                 and "B/image on disk" in m for m in logs)
        return (logs, tasks, arts) if ok else None

    logs, tasks, arts = _wait("the run's summary line in its logs", summary_logged, 30, 1)
    assert {"train-shard-000000", "train-shard-000001"} <= set(tasks)
    assert set(arts) == {"prepare-every-minute-sizes", "prepare-every-minute-summary"}
    assert "bytes on disk (tar: images + headers + cls/json)" in arts["prepare-every-minute-sizes"].data
    assert "serving etc-prepare/every-minute: cron '* * * * *' (Europe/Paris)" in served.log()
