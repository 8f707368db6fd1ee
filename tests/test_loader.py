"""The streaming loader's splitting: disjoint, equal per rank, deterministic per epoch."""

import numpy as np
import pytest

from etc_data.keys import new_key_file
from etc_data.loader import iter_split, train_steps
from etc_data.manifest import read_manifest
from etc_data.prepare import Settings, prepare


@pytest.fixture(scope="module")
def split(tmp_path_factory, cifar_exact):
    root = tmp_path_factory.mktemp("loader")
    npz = root / "m.npz"
    np.savez(npz, x_train=cifar_exact["x_train"][:230], y_train=cifar_exact["y_train"][:230])
    key = root / "k.key"
    new_key_file(key, "a")
    prepare(Settings(source=str(npz), out=str(root / "ds"), dataset="d", key_ref=str(key), codec="png", shard_size=30))
    url = str(root / "ds" / "train")
    return url, read_manifest(url)


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 1), (2, 3), (4, 4)])
def test_ranks_get_disjoint_samples_and_equal_counts(split, world, workers):
    url, m = split  # 8 shards of 30 + 1 of 20 = 230 samples
    per_rank = {}
    for rank in range(world):
        keys = []
        for w in range(workers):
            keys += [k for _, _, k in iter_split(url, m, rank=rank, world=world, worker=w, workers=workers, epoch=1,
                                                 seed=3, with_keys=True)]
        per_rank[rank] = keys
    counts = {len(v) for v in per_rank.values()}
    assert counts == {230 // world}
    sets = [set(v) for v in per_rank.values()]
    for i in range(world):
        for j in range(i + 1, world):
            assert not sets[i] & sets[j]
    assert train_steps(230, world, workers, 16) == sum(((230 // world) // workers + (w < (230 // world) % workers)) // 16
                                                       for w in range(workers))


def test_eval_sees_every_sample_once_and_shuffle_is_seeded(split):
    url, m = split
    seen = []
    for rank in range(3):
        for w in range(2):
            seen += [k for _, _, k in iter_split(url, m, rank=rank, world=3, worker=w, workers=2, train=False,
                                                 with_keys=True)]
    assert len(seen) == len(set(seen)) == 230
    a = [k for *_, k in iter_split(url, m, epoch=0, seed=1, with_keys=True)]
    b = [k for *_, k in iter_split(url, m, epoch=0, seed=1, with_keys=True)]
    c = [k for *_, k in iter_split(url, m, epoch=1, seed=1, with_keys=True)]
    assert a == b and a != c and sorted(a) == sorted(c)
