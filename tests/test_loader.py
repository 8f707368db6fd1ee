"""The streaming loader's splitting: disjoint, equal per rank, deterministic per epoch."""

import numpy as np
import pytest

from etc_data.keys import new_key_file
from etc_data.loader import iter_split, train_steps
from etc_data.manifest import read_manifest
from etc_data.prepare import PrepareConfig, prepare_dataset


@pytest.fixture(scope="module")
def split(tmp_path_factory, cifar_exact):
    root = tmp_path_factory.mktemp("loader")
    npz = root / "m.npz"
    np.savez(npz, x_train=cifar_exact["x_train"][:230], y_train=cifar_exact["y_train"][:230])
    key = root / "k.key"
    new_key_file(key, "a")
    prepare_dataset(PrepareConfig(source=str(npz), out=str(root / "ds"), dataset="d", key_ref=str(key), codec="png", shard_size=30))
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


def test_jpeg_bytes_batches_cross_as_two_tensors_and_decode_like_the_cpu_path(tmp_path, cifar_exact):
    """decode="cuda" (the trainer's path for JPEG shards on a GPU) ships each batch as one packed
    JpegBatch; decoding it (here with torchvision on the CPU) gives the CPU path's images."""
    import torch

    from etc_data.loader import JpegBatch, make_loader, to_float_nchw

    npz = tmp_path / "m.npz"
    np.savez(npz, x_train=cifar_exact["x_train"][:100], y_train=cifar_exact["y_train"][:100])
    key = tmp_path / "k.key"
    new_key_file(key, "a")
    prepare_dataset(PrepareConfig(source=str(npz), out=str(tmp_path / "ds"), dataset="d", key_ref=str(key),
                     codec="jpeg:q=90,sub=444", shard_size=40))
    url = str(tmp_path / "ds" / "train")
    got = {}
    for mode in ("cpu", "cuda"):
        dl, _, _, _ = make_loader(url, 32, train=False, workers=2, decode=mode, worker_start="spawn")
        xs, ys = [], []
        for x, y in dl:
            if mode == "cuda":
                assert isinstance(x, JpegBatch) and x.data.dtype == torch.uint8 and len(x.offsets) == len(y) + 1
                assert all(v[:2].tolist() == [0xFF, 0xD8] for v in x.images())  # each view is one JPEG file
            xs.append(to_float_nchw(x, torch.device("cpu")))
            ys.append(y)
        got[mode] = (torch.cat(xs), torch.cat(ys))
    (a, ya), (b, yb) = got["cpu"], got["cuda"]
    assert a.shape == b.shape == (100, 3, 32, 32) and torch.equal(ya, yb)
    assert float((a - b).abs().max()) <= 2 / 127.5 + 1e-6  # libjpeg-turbo in both; IDCT rounding at most 2 levels


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_shards_are_read_exactly_ahead_shards_in_advance(monkeypatch, ahead):
    """While the caller works on one shard, ``ahead`` more are read (each holds a shard's bytes in
    memory): none with ahead=0."""
    import time

    import etc_data.loader as loader

    reads = []
    monkeypatch.setattr(loader, "read_shard", lambda url, name, opts=None: reads.append(name) or name.encode())
    names = [f"s{i}.tar" for i in range(6)]
    got = []
    for tag, data in loader.prefetched_shards("mem://x", names, ahead=ahead):
        time.sleep(0.1)  # the background thread has had time to read what it was given
        assert reads == names[:len(got) + 1 + ahead], (ahead, len(got), reads)
        got.append((tag, data))
    assert got == [(n, n.encode()) for n in names]
