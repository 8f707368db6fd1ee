"""A real Prefect server on loopback serves one pipeline; a run triggered through the API writes shards."""

import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from etc_data.pipelines import PipelineError, load_pipeline, load_pipelines
from etc_data.manifest import read_manifest

from .servers import free_port, stop_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_pipeline(tmp_path, npz, key_file, **extra):
    body = {"name": "mini", "owner": "alice", "key_ref": str(key_file), "dataset": "mini", "source": str(npz),
            "scheme": "etc", "block_size": 8, "codec": "png", "shard_size": 40,
            "storage": {"url": str(tmp_path / "served")}, "schedule": {"cron": "0 3 * * *"}}
    body.update(extra)
    import yaml

    d = tmp_path / "pipes"
    d.mkdir(exist_ok=True)
    (d / "mini.yaml").write_text(yaml.safe_dump(body))
    return d


def test_pipeline_validation_names_file_and_field(tmp_path, key_file, cifar_exact):
    d = _write_pipeline(tmp_path, "x.npz", key_file)
    assert load_pipelines(d)[0].name == "mini"
    for extra, pattern in [({"shard_size": 0}, r"mini\.yaml: field shard_size"),
                           ({"schedule": {"cron": "61 * * * *"}}, r"field schedule\.cron"),
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


@pytest.mark.slow
def test_serve_against_a_real_prefect_server(tmp_path, cifar_exact, key_file):
    npz = tmp_path / "mini.npz"
    np.savez(npz, x_train=cifar_exact["x_train"][:60], y_train=cifar_exact["y_train"][:60],
             x_test=cifar_exact["x_test"][:20], y_test=cifar_exact["y_test"][:20])
    pipes = _write_pipeline(tmp_path, npz, key_file)
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PREFECT_LOGGING_LEVEL="WARNING",
               PREFECT_UI_ENABLED="false")
    env.pop("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", None)
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    served = None
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("the Prefect server did not start")
                time.sleep(0.5)
        served = subprocess.Popen([sys.executable, "-m", "etc_data.cli", "serve", str(pipes)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        code = f"""
import asyncio, time, sys
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
async def main():
    async with get_client() as c:
        for _ in range(120):
            deps = await c.read_deployments()
            if any(d.name == "mini" for d in deps):
                break
            await asyncio.sleep(0.5)
        dep = next(d for d in deps if d.name == "mini")
        assert dep.schedules and dep.schedules[0].schedule.cron == "0 3 * * *", dep.schedules
        assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
    run = await run_deployment("etc-prepare/mini", timeout=180)
    print(run.state.type.value)
asyncio.run(main())
"""
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip().endswith("COMPLETED"), r.stdout + r.stderr[-2000:]
        m = read_manifest(str(tmp_path / "served" / "train"))
        assert m.num_samples == 60 and m.shard_lengths == [40, 20]
    finally:
        if served is not None:
            stop_process(served)
        stop_process(server)
