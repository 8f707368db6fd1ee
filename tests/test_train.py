"""The trainer on CPU: a tiny ConvMixer on real CIFAR images prepared by the project's own prepare step."""

import json
import shutil

import numpy as np
import pytest

from etc_data.cli import main
from etc_data.keys import new_key_file
from etc_data.prepare import PrepareConfig, prepare_dataset
from etc_data.checkpoint import load_checkpoint
from etc_data.train import TrainConfig, TrainError, train_model

TINY = {"arch": "convmixer", "dim": 24, "depth": 2, "kernel": 3, "patch": 2}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, cifar_exact):
    root = tmp_path_factory.mktemp("train")
    npz = root / "cifar10-mini.npz"
    np.savez(npz, x_train=cifar_exact["x_train"][:480], y_train=cifar_exact["y_train"][:480],
             x_test=cifar_exact["x_test"][:160], y_test=cifar_exact["y_test"][:160])
    key = root / "owner.key"
    new_key_file(key, "alice")
    prepare_dataset(PrepareConfig(source=str(npz), out=str(root / "ds"), dataset="c10", key_ref=str(key), scheme="etc",
                     block_size=16, codec="jpeg:q=90,sub=444", shard_size=120))
    return root, key


def _cfg(root, key, out, **kw):
    base = dict(shards=str(root / "ds" / "train"), test_shards=str(root / "ds" / "test"), out=str(out),
                key_ref=str(key), model=dict(TINY), epochs=4, batch_size=32, lr=0.01, workers=0, device="cpu",
                mixup=0.0, cutmix=0.0, label_smoothing=0.0)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_goes_down_and_outputs_are_written(shards, tmp_path):
    """The one trainer test with DataLoader worker processes (spawned: this pytest process may
    already run Prefect's threads, next to which forked workers die); the others run in-process."""
    root, key = shards
    metrics = train_model(_cfg(root, key, tmp_path / "run", workers=2, worker_start="spawn"), progress=False)
    assert len(metrics) == 4
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] - 0.05
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [0, 1, 2, 3]
    assert {"epoch", "train_loss", "test_acc", "img_per_s"} <= set(lines[0])
    assert all(l["test_samples"] == 160 for l in lines)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["scheme"]["scheme"] == "etc" and ck["scheme"]["block_size"] == 16
    assert ck["key_fingerprint"] and ck["model_config"]["dim"] == 24 and ck["epoch"] == 3
    assert (tmp_path / "run" / "best.pt").exists()
    secret = json.loads(key.read_text())["secret"]
    assert secret not in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_resume_continues_where_it_stopped(shards, tmp_path):
    root, key = shards
    full = train_model(_cfg(root, key, tmp_path / "full", epochs=3), progress=False)
    part = train_model(_cfg(root, key, tmp_path / "cut", epochs=3, stop_after=2), progress=False)  # "preempted"
    assert len(part) == 2 and load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    resumed = train_model(_cfg(root, key, tmp_path / "cut", epochs=3, resume=True), progress=False)
    assert [m["epoch"] for m in resumed] == [0, 1, 2]
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 2
    # same seed, same data order, optimizer/scheduler/RNG restored: the resumed run matches the uninterrupted one
    for a, b in zip(resumed, full):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["lr"] == pytest.approx(b["lr"])
    assert resumed[2]["test_acc"] == pytest.approx(full[2]["test_acc"], abs=0.02)


def test_wrong_key_is_refused_before_training(shards, tmp_path):
    """An owner key given to train is trusted alone: shards signed by anyone else are refused,
    naming both fingerprints, before a model is built."""
    from etc_data.keys import load_key
    from etc_data.trust import UnknownSignerError

    root, key = shards
    other = tmp_path / "other.key"
    new_key_file(other, "mallory")
    with pytest.raises(UnknownSignerError, match=rf"signed by key fingerprint {load_key(key).fingerprint}.*not a "
                                                 rf"trusted owner.*{load_key(other).fingerprint}"):
        train_model(_cfg(root, other, tmp_path / "bad"), progress=False)
    assert not (tmp_path / "bad").exists()


def test_corrupt_shard_is_reported_by_name(shards, tmp_path):
    root, key = shards
    ds = tmp_path / "ds"
    shutil.copytree(root / "ds", ds)
    victim = sorted((ds / "train").glob("*.tar"))[1]
    data = bytearray(victim.read_bytes())
    data[600:700] = b"\xff" * 100  # inside the first image of that shard
    victim.write_bytes(bytes(data))
    cfg = _cfg(root, key, tmp_path / "c", epochs=1)
    cfg.shards = str(ds / "train")
    with pytest.raises(Exception, match=victim.name):
        train_model(cfg, progress=False)


def test_evaluate_cli_prints_accuracy_json(shards, tmp_path, capsys):
    root, key = shards
    train_model(_cfg(root, key, tmp_path / "r", epochs=1), progress=False)
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "r" / "last.pt"), "--shards", str(root / "ds" / "test"),
               "--key", str(key), "--device", "cpu", "--workers", "0"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["samples"] == 160 and 0 <= res["accuracy"] <= 1
