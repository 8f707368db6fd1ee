"""Prefect's local ephemeral API server, started by the CLI before Prefect is imported.

Prefect starts this server itself on first use when no ``PREFECT_API_URL`` is set, but only after
importing its whole server package in the calling process (~2.5 s of CPU here) and then waiting for
the subprocess to import it again. Starting the same server first (Prefect 3.8's
``SubprocessASGIServer`` command: uvicorn, Prefect's app factory, the same environment flags; on a
socket this process binds) lets its boot overlap this process's imports and the worker pool's
start; Prefect then simply finds ``PREFECT_API_URL`` set.
This module imports nothing from Prefect.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from etc_data.errors import EtcError
from etc_data.workers import set_parent_death_signal


def _die_with_parent() -> None:
    """In the server's process before exec: SIGTERM when the CLI dies, even by SIGKILL (Linux)."""
    import signal

    set_parent_death_signal(signal.SIGTERM)


class EphemeralAPI:
    """A Prefect API server on 127.0.0.1 for the life of this process (``stop`` ends it; it is also
    stopped at exit). ``hide_env`` names environment variables the server must not inherit (e.g.
    the one holding the owner's key)."""

    def __init__(self, hide_env: tuple[str, ...] = ()):
        import importlib.util

        spec = importlib.util.find_spec("prefect")
        if spec is None or not spec.submodule_search_locations:
            raise EtcError("Prefect is not installed: pip install the project (see the README)")
        self._app_dir = os.path.dirname(list(spec.submodule_search_locations)[0])
        self._env = {k: v for k, v in os.environ.items() if k not in hide_env}
        self._env.update(PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1")
        self._log = tempfile.TemporaryFile()
        self.proc: subprocess.Popen | None = None
        self._launch()
        os.environ["PREFECT_API_URL"] = self.url
        atexit.register(self.stop)

    def _launch(self) -> None:
        # the listening socket is bound here (port chosen by the OS) and handed to uvicorn, so no
        # other process can take the port between choosing and binding it
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            self.port = sock.getsockname()[1]
            self.url = f"http://127.0.0.1:{self.port}/api"
            fd = sock.fileno()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", self._app_dir, "--factory",
                 "prefect.server.api.server:create_app", "--fd", str(fd), "--log-level", "error",
                 "--lifespan", "on"],
                env=self._env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                pass_fds=(fd,), preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        finally:
            sock.close()  # the server holds its own copy

    def wait(self, timeout: float = 120.0) -> None:
        """Block until the server answers /health (the first use of a Prefect home also creates
        its database, which takes longer)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise EtcError(f"Prefect's local API server exited with code {code} while starting:\n{self._tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise EtcError(f"Prefect's local API server did not answer within {timeout:.0f} s:\n{self._tail()}")

    def _tail(self, n: int = 4000) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
