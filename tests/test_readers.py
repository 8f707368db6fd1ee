"""Shards made for streaming and for other readers, on real CIFAR-10 (the shared JPEG copies):
the seeded sample order mixes the classes for a plain sequential read, ``--limit`` is stratified,
Hugging Face ``datasets`` loads the dataset root through its card, ``wids`` opens the descriptor,
and the webdataset handler decodes every codec prepare writes."""

from __future__ import annotations

import collections
import hashlib
import io
import math
import warnings

import numpy as np
import pytest

from etc_data.keys import load_key
from etc_data.manifest import read_manifest, read_sample_index
from etc_data.prepare import PrepareConfig, prepare_dataset
from etc_data.readers import ReaderWarning, decode_sample, etc_data_handler, pillow_decodable
from etc_data.schemes import make_scheme

from .conftest import make_mini_npz

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CLASSES = 10


def _labels_in_order(split_dir) -> list[int]:
    """Labels of a split read as plain webdataset reads it: shards in manifest order, samples in tar
    order, no shuffling at all."""
    import webdataset as wds

    urls = [str(split_dir / n) for n in read_manifest(str(split_dir)).filenames]
    return [int(c) for (c,) in wds.WebDataset(urls, shardshuffle=False, empty_check=False).to_tuple("cls")]


def _entropy_bits(labels) -> float:
    n = len(labels)
    return -sum(c / n * math.log2(c / n) for c in collections.Counter(labels).values())


@pytest.fixture(scope="module")
def cifar_root(shared_dir, tmp_path_factory):
    """CIFAR-10 train (50,000) and test (10,000), prepared with the defaults (shards of 10,000)."""
    from etc_data.keys import new_key_file

    tmp = tmp_path_factory.mktemp("cifar-root")
    key = tmp / "owner.key"
    new_key_file(key, "alice")
    out = tmp / "root"
    prepare_dataset(PrepareConfig(source=[str(shared_dir / "cifar10-train-jpeg.zip"),
                                          str(shared_dir / "cifar10-test-jpeg.zip")],
                                  out=str(out), dataset="cifar10", key_ref=str(key), workers=2))
    return out


def test_plain_webdataset_read_in_order_mixes_every_class_in_every_batch(cifar_root):
    labels = _labels_in_order(cifar_root / "train")
    assert len(labels) == 50000
    per_batch = [len(set(labels[i:i + 128])) for i in range(0, len(labels) - 127, 128)]
    assert np.median(per_batch) >= 9
    m = read_manifest(str(cifar_root / "train"))
    assert m.sample_order["shuffle"] == "seeded" and m.sample_order["seed_from"] == ["dataset", "split"]


def test_project_loader_batches_have_near_uniform_label_entropy(cifar_root):
    from etc_data.loader import make_loader

    dl, _, _, steps = make_loader(str(cifar_root / "train"), 128, train=True, workers=2)
    bits = []
    for i, (_, y) in enumerate(dl):
        bits.append(_entropy_bits(y.tolist()))
        if i == 99:
            break
    assert len(bits) == 100 and np.mean(bits) >= 3.2, np.mean(bits)


def test_hugging_face_datasets_loads_every_split_of_the_root_with_counts_and_labels(cifar_root, tmp_path,
                                                                                     monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = datasets.load_dataset(str(cifar_root), cache_dir=str(tmp_path / "hf"))
    assert {s: d[s].num_rows for s in d} == {"train": 50000, "test": 10000}
    feat = d["train"].features["cls"]
    assert feat.names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    test = d["test"].select_columns(["cls", "json"])
    assert collections.Counter(test["cls"]) == {c: 1000 for c in range(CLASSES)}
    row = test[0]
    assert row["json"]["cls"] == row["cls"] and feat.int2str(row["cls"]) in row["json"]["source_id"]
    img = d["test"][0]["jpg"]
    assert img.size == (32, 32) and img.mode == "RGB"
    card = (cifar_root / "README.md").read_text()
    assert read_manifest(str(cifar_root / "train")).key_fingerprint in card and "Security caveat" in card


def test_wids_opens_the_split_descriptor(cifar_root, tmp_path):
    import wids

    ds = wids.ShardListDataset(str(cifar_root / "test" / "test.wids.json"), cache_dir=str(tmp_path / "wids"),
                               transformations=[decode_sample])
    assert len(ds) == 10000
    sample = ds[1234]
    assert sample[".jpg"].shape == (32, 32, 3) and sample[".jpg"].dtype == np.uint8
    assert sample[".cls"] == sample[".json"]["cls"] and 0 <= sample[".cls"] < CLASSES


def _prepare(src, out, key, **kw):
    return prepare_dataset(PrepareConfig(source=str(src), out=str(out), dataset="cifar10", key_ref=str(key),
                                         workers=1, **kw))


def test_limit_takes_a_stratified_deterministic_sample(shared_dir, tmp_path, key_file):
    src = shared_dir / "cifar10-train-jpeg.zip"
    for name in ("a", "b"):
        _prepare(src, tmp_path / name, key_file, splits=["train"], limit=600, shard_size=250)
    shard_hashes = [sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / n / "train").glob("*.tar"))
                    for n in ("a", "b")]
    assert shard_hashes[0] == shard_hashes[1] and len(shard_hashes[0]) == 3
    labels = _labels_in_order(tmp_path / "a" / "train")
    assert collections.Counter(labels) == {c: 60 for c in range(CLASSES)}
    assert len(set(labels[:128])) == CLASSES  # and already mixed inside the first shard


def test_append_shuffles_new_items_among_new_shards_only(shared_dir, tmp_path, key_file):
    src, out = shared_dir / "cifar10-train-jpeg.zip", tmp_path / "root"
    _prepare(src, out, key_file, splits=["train"], limit=300, shard_size=200)
    before = {p.name: p.read_bytes() for p in (out / "train").glob("*.tar")}
    old_keys = {k for v in read_sample_index(str(out / "train"), read_manifest(str(out / "train"))).values() for k in v}
    _prepare(src, out, key_file, splits=["train"], limit=1000, shard_size=200)
    m = read_manifest(str(out / "train"))
    assert m.num_samples == 1000 and m.filenames[:2] == sorted(before)
    assert all((out / "train" / n).read_bytes() == b for n, b in before.items())  # old shards untouched
    index = read_sample_index(str(out / "train"), m)
    new = [k for n in m.filenames[2:] for k in index[n]]
    assert len(new) == 700 and not (set(new) & old_keys)
    assert new != sorted(new)
    labels = _labels_in_order(out / "train")
    assert collections.Counter(labels) == {c: 100 for c in range(CLASSES)}  # a larger limit: still stratified
    new_labels = labels[300:]
    assert min(len(set(new_labels[i:i + 128])) for i in range(0, 640, 128)) >= 9


CODEC_EXT = {"jpegls": "jls", "jxl": "jxl", "j2k": "jp2", "raw": "ppm", "jpeg:q=90,sub=444": "jpg"}


@pytest.mark.parametrize("codec", list(CODEC_EXT))
def test_webdataset_with_the_handler_decodes_every_codec(codec, tmp_path, cifar_exact, key_file):
    import webdataset as wds

    src = make_mini_npz(tmp_path / "mini.npz", cifar_exact, 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _prepare(src, tmp_path / "out", key_file, codec=codec, block_size=8 if codec != "jpeg:q=90,sub=444" else 16)
    warned = [w for w in caught if issubclass(w.category, ReaderWarning)]
    assert bool(warned) == (not pillow_decodable(codec)) == (codec in ("jpegls", "jxl"))
    if warned:
        assert "not decodable by Pillow" in str(warned[0].message) and "etc_data_handler" in str(warned[0].message)
    ext = CODEC_EXT[codec]
    m = read_manifest(str(tmp_path / "out" / "train"))
    urls = [str(tmp_path / "out" / "train" / n) for n in m.filenames]
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode(etc_data_handler, "rgb8")
               .to_tuple(ext, "cls"))
    assert len(got) == 20 and all(isinstance(x, np.ndarray) and x.shape == (32, 32, 3) and x.dtype == np.uint8
                                  for x, _ in got)
    scheme = make_scheme("etc", key=load_key(key_file), dataset="cifar10", block_size=m.block_size)
    plain = scheme.decrypt(np.stack([x for x, _ in got]))
    exact, labels = cifar_exact["x_train"][:20].astype(int), cifar_exact["y_train"][:20]
    err = np.abs(plain.astype(int)[:, None] - exact[None]).mean(axis=(2, 3, 4))  # decoded x source
    nearest = err.argmin(axis=1)
    assert sorted(nearest) == list(range(20)) and [int(y) for _, y in got] == [int(labels[i]) for i in nearest]
    assert err.min(axis=1).max() == 0 if codec != "jpeg:q=90,sub=444" else err.min(axis=1).max() < 6


def test_handler_leaves_other_fields_to_the_next_handler():
    assert etc_data_handler("x.cls", b"3") is None and etc_data_handler("x.json", b"{}") is None
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(b, format="PNG")
    assert etc_data_handler("a/b.png", b.getvalue()).sum() == 7 * 8 * 8 * 3
