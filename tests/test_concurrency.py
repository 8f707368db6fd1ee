"""Processes and concurrency around ``prepare``: a killed CLI leaves nothing running and nothing
writing; two runs into one output cannot both write; a commit checks the manifest it replaces; a
crash between the manifest and ``_info.json`` is found by verify and repaired by a rerun."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from etc_data.prepare import PrepareConfig, PrepareError, prepare_dataset

from .conftest import make_mini_npz


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below ``pid``."""
    parents, cmds = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().split(")")[-1].split()[1])
                cmds[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for child, parent in parents.items():
            if parent == p and child not in out:
                out[child] = cmds.get(child, "")
                todo.append(child)
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_cli_prepare_leaves_no_process_and_writes_no_shard_afterwards(tmp_path, cifar_exact, key_file,
                                                                               fresh_prefect_home, sig):
    npz = make_mini_npz(tmp_path / "m.npz", cifar_exact, 4000)
    out = tmp_path / "ds"
    env = dict(os.environ, PREFECT_HOME=str(fresh_prefect_home))
    env.pop("PREFECT_API_URL", None)
    with open(tmp_path / "stderr.txt", "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "etc_data.cli", "prepare", "--source", str(npz), "--key",
                              str(key_file), "--out", str(out), "--dataset", "d", "--shard-size", "40", "--codec", "png",
                              "--workers", "2"], env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 180
        while not list(out.glob("train/*.tar")):
            assert p.poll() is None and time.time() < deadline, (tmp_path / "stderr.txt").read_text()[-3000:]
            time.sleep(0.05)
        children = _descendants(p.pid)
        workers = [c for c, cmd in children.items() if "multiprocessing" in cmd]
        assert len(workers) >= 3, children  # two pool workers and the resource tracker, mid-run
        os.kill(p.pid, sig)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(c) for c in children):
        time.sleep(0.05)
    assert not [children[c] for c in children if _alive(c)]
    written = sorted(x.name for x in out.glob("train/*.tar"))
    time.sleep(2)
    assert sorted(x.name for x in out.glob("train/*.tar")) == written
    assert 0 < len(written) < 100 and not (out / "train" / "manifest.json").exists()
