"""Two ranks with gloo on CPU (torchrun): disjoint samples, equal batch counts, and a DDP training epoch."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from etc_data.keys import new_key_file
from etc_data.prepare import PrepareConfig, prepare_dataset

SCRIPT = r"""
import json, os, sys
import torch.distributed as dist
from etc_data.loader import make_loader
from etc_data.train import TrainConfig, train_model

url, key, out = sys.argv[1:4]
metrics = train_model(TrainConfig(shards=url + "/train", test_shards=url + "/test", out=out, key_ref=key,
                model={"arch": "convmixer", "dim": 16, "depth": 1, "kernel": 3, "patch": 4}, epochs=1,
                batch_size=16, workers=2, device="cpu", mixup=0, cutmix=0), progress=False)
rank, world = dist.get_rank(), dist.get_world_size()
dl, ds, m, steps = make_loader(url + "/train", 16, rank=rank, world=world, workers=2, seed=0)
from etc_data.loader import iter_split
keys = []
for w in range(2):
    keys += [k for *_, k in iter_split(url + "/train", m, rank=rank, world=world, worker=w, workers=2, with_keys=True)]
batches = sum(1 for _ in dl)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"keys": keys, "batches": batches, "steps": steps, "metrics": metrics}, f)
"""


def _torchrun(tmp_path, script_text: str, *args: str):
    """Run a script on two gloo ranks; returns its output folder (the script's last argument)."""
    script = tmp_path / "ddp.py"
    script.write_text(script_text)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), *args, str(out)], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_ranks_gloo(tmp_path, cifar_exact):
    npz = tmp_path / "m.npz"
    np.savez(npz, x_train=cifar_exact["x_train"][:250], y_train=cifar_exact["y_train"][:250],
             x_test=cifar_exact["x_test"][:50], y_test=cifar_exact["y_test"][:50])
    key = tmp_path / "k.key"
    new_key_file(key, "a")
    prepare_dataset(PrepareConfig(source=str(npz), out=str(tmp_path / "ds"), dataset="d", key_ref=str(key),
                     codec="jpeg:q=90,sub=444", shard_size=40))
    out = _torchrun(tmp_path, SCRIPT, str(tmp_path / "ds"), str(key))
    a, b = (json.loads((out / f"rank{i}.json").read_text()) for i in range(2))
    assert len(a["keys"]) == len(b["keys"]) == 125
    assert not set(a["keys"]) & set(b["keys"])
    assert a["batches"] == b["batches"] == a["steps"] > 0
    assert a["metrics"][0]["test_samples"] == 50  # evaluation counts every test sample once over both ranks
    assert (out / "last.pt").exists()


JOINT = r"""
import json, os, sys
import torch.distributed as dist
from etc_data.train import TrainConfig, train_model

a, b, out = sys.argv[1:4]
metrics = train_model(TrainConfig(shards=[a + "/train", b + "/train"], test_shards=[a + "/test", b + "/test"], out=out,
                model={"arch": "convmixer", "dim": 16, "depth": 1, "kernel": 3, "patch": 4}, epochs=1,
                batch_size=16, workers=1, device="cpu", mixup=0, cutmix=0), progress=False)
with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump({"metrics": metrics}, f)
"""


@pytest.mark.slow
def test_two_owners_on_two_ranks(tmp_path, cifar_exact):
    """Two owners (different keys, 100 and 60 images) on two gloo ranks: same steps on both ranks
    (every stem takes part in every step), every test sample of each owner counted once."""
    for name, sl in (("a", slice(0, 100)), ("b", slice(100, 160))):
        np.savez(tmp_path / f"{name}.npz", x_train=cifar_exact["x_train"][sl], y_train=cifar_exact["y_train"][sl],
                 x_test=cifar_exact["x_test"][sl][:30], y_test=cifar_exact["y_test"][sl][:30])
        new_key_file(tmp_path / f"{name}.key", name)
        prepare_dataset(PrepareConfig(source=str(tmp_path / f"{name}.npz"), out=str(tmp_path / name), dataset="d",
                                      key_ref=str(tmp_path / f"{name}.key"), codec="png", shard_size=20))
    out = _torchrun(tmp_path, JOINT, str(tmp_path / "a"), str(tmp_path / "b"))
    a, b = (json.loads((out / f"rank{i}.json").read_text())["metrics"][0] for i in range(2))
    assert a["steps"] == b["steps"] == 5  # 160 // 2 ranks // 16, shares 10 + 6
    assert [o["test_samples"] for o in a["owners"]] == [30, 30]
    assert [o["test_acc"] for o in a["owners"]] == [o["test_acc"] for o in b["owners"]]  # all-reduced
    assert (out / "owner-0" / "last.pt").exists() and (out / "owner-1" / "last.pt").exists()
