"""Processes and concurrency around ``prepare``: a killed CLI leaves nothing running and nothing
writing; two runs into one output cannot both write; a commit checks the manifest it replaces; a
crash between the manifest and ``_info.json`` is found by verify and repaired by a rerun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from etc_data.prepare import PrepareConfig, PrepareError, prepare_dataset

from .conftest import make_mini_npz
from .servers import alive


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
    while time.time() < deadline and any(alive(c) for c in children):
        time.sleep(0.05)
    assert not [children[c] for c in children if alive(c)]
    written = sorted(x.name for x in out.glob("train/*.tar"))
    time.sleep(2)
    assert sorted(x.name for x in out.glob("train/*.tar")) == written
    assert 0 < len(written) < 100 and not (out / "train" / "manifest.json").exists()


# ----------------------------------------------------------------------------- one writer per dataset

HOLD_LOCK = ("import sys, time\nfrom etc_data.locks import dataset_lock\n"
             "with dataset_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n")


def _config(tmp_path, npz, out, key_file, **kw) -> PrepareConfig:
    return PrepareConfig(source=str(npz), out=str(out), dataset="d", key_ref=str(key_file), codec="png", block_size=8,
                         shard_size=20, workers=1, **kw)


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_never_blocks(tmp_path, cifar_exact,
                                                                                       key_file):
    from etc_data.locks import LOCK_NAME, LockError, dataset_lock

    cfg = _config(tmp_path, make_mini_npz(tmp_path / "m.npz", cifar_exact, 40), tmp_path / "ds", key_file)
    with dataset_lock(cfg.out):
        with pytest.raises(LockError, match=rf"being written by another prepare run \(.*pid {os.getpid()}, since"):
            prepare_dataset(cfg)
    assert not (tmp_path / "ds" / "train").exists()  # refused before anything was written
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, cfg.out], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=f"pid {holder.pid}"):
            prepare_dataset(cfg)
    finally:
        holder.kill()  # SIGKILL: no cleanup ran, the lock file is still there
        holder.wait()
    assert (tmp_path / "ds" / LOCK_NAME).exists()
    assert prepare_dataset(cfg).manifests["train"].num_samples == 40  # the kernel released the dead run's flock
    assert not (tmp_path / "ds" / LOCK_NAME).exists()


def test_a_commit_refuses_a_manifest_that_changed_since_planning(tmp_path, cifar_exact, key_file, monkeypatch):
    """A writer that bypassed the lock (another tool, a copy) committed while this run wrote its
    shards: this run's commit notices and commits nothing."""
    import shutil

    import etc_data.prepare as prep

    out, other = tmp_path / "ds", tmp_path / "other"
    small, big = make_mini_npz(tmp_path / "s.npz", cifar_exact, 40), make_mini_npz(tmp_path / "b.npz", cifar_exact, 80)
    prepare_dataset(_config(tmp_path, small, out, key_file))
    prepare_dataset(_config(tmp_path, big, other, key_file))
    run_chunks = prep._run_chunks

    def chunks_then_another_commit(*a, **k):
        results = run_chunks(*a, **k)
        shutil.copy(other / "train" / "manifest.json", out / "train" / "manifest.json")
        return results

    monkeypatch.setattr(prep, "_run_chunks", chunks_then_another_commit)
    with pytest.raises(PrepareError, match=r"train/manifest.json changed since this run planned"):
        prepare_dataset(_config(tmp_path, make_mini_npz(tmp_path / "m.npz", cifar_exact, 60), out, key_file))
    assert (out / "train" / "manifest.json").read_bytes() == (other / "train" / "manifest.json").read_bytes()


def test_a_crash_between_manifest_and_info_is_found_by_verify_and_repaired_by_a_rerun(tmp_path, cifar_exact,
                                                                                      key_file, monkeypatch, capsys):
    import etc_data.manifest as manifest
    from etc_data.cli import main
    from etc_data.verify import VerifyConfig, verify_dataset

    out = tmp_path / "ds"
    prepare_dataset(_config(tmp_path, make_mini_npz(tmp_path / "s.npz", cifar_exact, 40), out, key_file))
    bigger = _config(tmp_path, make_mini_npz(tmp_path / "b.npz", cifar_exact, 60), out, key_file)

    def crash(*a, **k):  # the machine dies after the manifest commit, mid-way through _info.json
        (out / "._info.json.5f2a9c.part").write_bytes(b'{"name": "d", "spl')
        raise OSError(28, "No space left on device", str(out / "_info.json"))

    monkeypatch.setattr(manifest, "update_info", crash)
    with pytest.raises(OSError):
        prepare_dataset(bigger)
    monkeypatch.undo()
    assert manifest.read_manifest(str(out / "train")).num_samples == 60
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 40  # the two disagree
    res = verify_dataset(VerifyConfig(url=str(out)))
    assert not res.ok and any("_info.json: num_samples" in c and "run etc-data prepare again" in c
                              for c in res.reports[0].corrupt), res.lines()
    assert main(["verify", str(out)]) == 2
    capsys.readouterr()
    summary = prepare_dataset(bigger)  # nothing new to write: the rerun only repairs
    assert summary.written == {"train": 0}
    assert json.loads((out / "_info.json").read_text())["splits"]["train"]["num_samples"] == 60
    assert verify_dataset(VerifyConfig(url=str(out))).ok and not list(out.glob("*.part"))
