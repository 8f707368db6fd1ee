"""benchmarks/gpu_check.sh / gpu_check.py / gpu_carry.sh on the CPU: syntax, the no-GPU exit, the step runner's
timeouts and failures, the carried data round trip, and a tiny CPU run of the prepare, stream and train steps."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT, make_image_zip

BENCH = ROOT / "benchmarks"


def _driver():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gc = _driver()


def _mini_cifar(tmp_path: Path, cifar_exact, n_train=160, n_test=80) -> Path:
    """The two zips gpu_check reads, with real CIFAR images of every class (<split>/<class>/NNNN.jpg)."""
    from etc_data.sources import CIFAR10_CLASSES

    data = tmp_path / "data"
    data.mkdir()
    make_image_zip(data / "cifar10-train-jpeg.zip", cifar_exact["x_train"][:n_train], cifar_exact["y_train"][:n_train],
                   CIFAR10_CLASSES, split="train", ext="jpg")
    make_image_zip(data / "cifar10-test-jpeg.zip", cifar_exact["x_test"][:n_test], cifar_exact["y_test"][:n_test],
                   CIFAR10_CLASSES, split="test", ext="jpg")
    return data


def _env(**extra) -> dict:
    return dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", **extra)


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_carry.sh"])
def test_shell_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_without_cuda_it_says_so_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--out", str(out), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gpu_check: no GPU: no CUDA device is visible" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert {s["status"] for s in summary["steps"].values()} == {"skipped"}
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]  # no step ran, so no step log
    assert not (tmp_path / "work" / "shards").exists()


def test_a_step_past_its_timeout_is_stopped_with_its_children(tmp_path):
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    rc, secs, lines = gc.run_command(["bash", "-c", f"echo started; sleep 120 & echo $! > {pidfile}; wait"], 2,
                                     tmp_path / "x.log")
    assert rc is None and secs < 30 and time.monotonic() - t0 < 30
    assert [line for _, line in lines] == ["started"]
    pid = int(pidfile.read_text())
    time.sleep(0.5)
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "\nState:\tZ" in status.read_text()  # the grandchild is gone too
    assert "stopped after its timeout of 2 s" in (tmp_path / "x.log").read_text()
    rc, _, lines = gc.run_command([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], 30, tmp_path / "y.log")
    assert rc == 3 and lines[-1][1] == "boom"


def test_failed_gpu_tests_are_parsed_and_decide_the_trainer_conv():
    out = ["FAILED tests/test_dwconv.py::test_gpu_matches_conv2d[cifar-256-bf16-direct] - assert False",
           "1 failed, 12 passed, 27 deselected in 50.12s"]
    res = gc.Result("tests", status="FAIL", lines=[(0.0, x) for x in out])
    gc.parse_pytest(res)
    assert res.details["counts"] == {"failed": 1, "passed": 12, "deselected": 27}
    assert "test_gpu_matches_conv2d[cifar-256-bf16-direct]" in res.summary
    conv = gc.Result("convmixer")
    assert gc.triton_broken(res, conv) is None  # the trainer uses the MMA kernels, not the direct ones
    res.details["failed"].append("tests/test_dwconv.py::test_gpu_patched_convmixer_training_step_matches_stock")
    assert "test_gpu_patched_convmixer_training_step_matches_stock" in gc.triton_broken(res, conv)
    skipped = gc.Result("tests", status="ok", lines=[(0.0, "13 skipped, 27 deselected in 3.1s")])
    gc.parse_pytest(skipped)
    assert skipped.status == "skipped"


def test_epochs_fit_the_wall_budget():
    epochs, epoch_s = gc.fit_epochs(240, 8000, 50000, 10000)
    assert epoch_s == pytest.approx(50000 / 8000 + 10000 / 24000 + 1)
    assert epochs == int((240 - 25) / epoch_s) == 28
    assert gc.fit_epochs(840, 8000, 50000, 10000)[0] > 100
    assert gc.fit_epochs(10, 100, 50000, 10000)[0] == 1


def test_carried_data_round_trip_is_byte_identical(tmp_path, cifar_exact):
    data = _mini_cifar(tmp_path, cifar_exact, 30, 20)
    packed = tmp_path / "c.tar.xz"
    assert gc.pack_data([data / z for z in gc.ZIPS], packed) == {"train": 30, "test": 20}
    assert gc.unpack_data(packed, tmp_path / "back") == {"train": 30, "test": 20}
    for z in gc.ZIPS:
        with zipfile.ZipFile(data / z) as a, zipfile.ZipFile(tmp_path / "back" / z) as b:
            assert a.namelist() == b.namelist() and all(a.read(n) == b.read(n) for n in a.namelist())
    evil = tmp_path / "evil.tar.xz"
    with tarfile.open(evil, "w:xz") as t:
        ti = tarfile.TarInfo("train/../../x.jpg")
        ti.size = 3
        t.addfile(ti, io.BytesIO(b"abc"))
    with pytest.raises(ValueError, match="unexpected member"):
        gc.unpack_data(evil, tmp_path / "evil")
    assert not (tmp_path / "x.jpg").exists()


def test_a_failed_step_still_gives_the_table(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--smoke", "--device", "cpu", "--only", "train",
                        "--data", str(tmp_path / "missing"), "--out", str(out), "--work", str(tmp_path / "w")],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert steps["prepare"]["status"] == "FAIL" and "cifar10-train-jpeg.zip" in (out / "prepare.log").read_text()
    assert steps["train"]["summary"] == "no shards: the prepare step did not finish"
    assert "prepare    FAIL" in r.stdout and "\ntrain      skipped" in r.stdout


@pytest.mark.slow
def test_smoke_run_on_the_cpu_prepares_streams_and_trains(tmp_path, cifar_exact):
    data = _mini_cifar(tmp_path, cifar_exact)
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--smoke", "--device", "cpu", "--only", "stream,train",
                        "--data", str(data), "--out", str(out), "--work", str(tmp_path / "w")],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((out / "summary.json").read_text())
    steps = s["steps"]
    assert [steps[n]["status"] for n in gc.STEPS] == ["ok", "skipped", "skipped", "ok", "ok"], s["table"]
    assert steps["prepare"]["details"]["prepared"]["prepared"] == {"train": 160, "test": 80}
    assert steps["stream"]["details"]["streaming_img_s"] > 0 and steps["stream"]["details"]["in_memory_img_s"] > 0
    epochs = steps["train"]["details"]["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1] and all(0 <= e["test_acc"] <= 1 for e in epochs)
    assert epochs[0]["wall_s"] < epochs[1]["wall_s"] and epochs[1]["test_samples"] == 80
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "metrics.jsonl", "prepare.log", "stream.log",
                                                     "summary.json", "train.log"]
    assert "train: test accuracy against wall time" in r.stdout and "SMOKE" in r.stdout
