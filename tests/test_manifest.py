"""Manifest: fields, refusals, the content-addressed key index, and timm's merged _info.json."""

import json

import pytest

from etc_data.manifest import FORMAT, Manifest, ManifestError, read_sample_index, read_manifest, write_manifest
from etc_data.shards import write_chunk

from .conftest import fixed_owner

OWNER = fixed_owner()


def _samples(imgs, labels, split="train"):
    import simplejpeg

    return [{"__key__": f"{split}/c{int(l)}/{i:05d}", "jpg": simplejpeg.encode_jpeg(im, quality=85, colorsubsampling="444"),
             "cls": int(l), "json": {"cls": int(l), "source_id": f"{split}/{i}", "split": split}}
            for i, (im, l) in enumerate(zip(imgs, labels))]


def _manifest(shards, split="train", **kw):
    d = dict(split=split, dataset="cifar-t", scheme="etc", block_size=4, codec="jpeg:q=85,sub=444",
             key_fingerprint=OWNER.fingerprint, classes=[f"c{i}" for i in range(10)], image_size=[32, 32],
             shards=[s.entry() for s in shards], source="cifar10-lossless-subset.npz")
    d.update(kw)
    return Manifest(**d)


def _write(root, split, imgs, labels, start=0, max_samples=8, old=None, old_keys=None, created="", reverse=False):
    samples = _samples(imgs, labels, split)
    shards = write_chunk(str(root / split), split, start, samples[::-1] if reverse else samples, max_samples=max_samples)
    entries = (list(old.shards) if old else []) + [s.entry() for s in shards]
    keys = dict(old_keys or {})
    keys.update({s.name: s.keys for s in shards})
    m = _manifest([], split=split, created=created)
    m.shards = entries
    write_manifest(str(root / split), m, sample_index=keys, key=OWNER)
    return m, keys


def test_manifest_fields_and_json_types(cifar_exact, tmp_path):
    _write(tmp_path, "train", cifar_exact["x_train"][:20], cifar_exact["y_train"][:20])
    d = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert d["format"] == FORMAT and d["split"] == "train" and d["num_samples"] == 20
    assert d["shard_lengths"] == [8, 8, 4] and d["filenames"] == [s["name"] for s in d["shards"]]
    assert all(set(s) == {"name", "sha256", "bytes", "samples"} and len(s["sha256"]) == 64 for s in d["shards"])
    assert [s["bytes"] for s in d["shards"]] == [(tmp_path / "train" / n).stat().st_size for n in d["filenames"]]
    assert d["scheme"] == "etc" and d["block_size"] == 4 and d["codec"] == "jpeg:q=85,sub=444"
    assert d["key_fingerprint"] == OWNER.fingerprint and d["public_key"] == OWNER.public_key
    assert d["image_size"] == [32, 32] and len(d["classes"]) == 10
    assert d["created"].endswith("Z") and d["tool_version"]
    r = read_manifest(str(tmp_path / "train" / "manifest.json"))  # the manifest URL itself also works
    assert r.scheme_params() == {"scheme": "etc", "block_size": 4, "pad": "error", "options": {}}


def test_same_input_gives_same_manifest_except_created(cifar_exact, tmp_path):
    x, y = cifar_exact["x_test"][:17], cifar_exact["y_test"][:17]
    _write(tmp_path / "a", "train", x, y, created="2026-01-01T00:00:00Z")
    _write(tmp_path / "b", "train", x, y, created="2027-05-05T00:00:00Z", reverse=True)  # order does not matter
    a = json.loads((tmp_path / "a" / "train" / "manifest.json").read_text())
    b = json.loads((tmp_path / "b" / "train" / "manifest.json").read_text())
    assert a.pop("created") != b.pop("created")
    assert a.pop("signature") != b.pop("signature")  # it covers "created" too
    assert a == b
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == \
        sorted(p.name for p in (tmp_path / "b" / "train").iterdir())


def test_append_and_a_kill_between_index_and_manifest(cifar_exact, tmp_path):
    x, y = cifar_exact["x_train"], cifar_exact["y_train"]
    m1, k1 = _write(tmp_path, "train", x[:10], y[:10])
    # a killed append wrote its shards and its key index, but not the manifest: the committed
    # manifest still reads its own index, and the new index is not counted
    shards = write_chunk(str(tmp_path / "train"), "train", 5, _samples(x[10:14], y[10:14]), max_samples=8)
    keys = dict(k1, **{s.name: [f"other/{k}" for k in s.keys] for s in shards})
    import hashlib

    raw = json.dumps(keys, separators=(",", ":"), sort_keys=True).encode()
    (tmp_path / "train" / f"samples-{hashlib.sha256(raw).hexdigest()[:16]}.json").write_bytes(raw)
    r = read_manifest(str(tmp_path / "train"))
    assert read_sample_index(str(tmp_path / "train"), r) == k1 and r.num_samples == 10
    # the real append: old + new shards, one index listing all sample keys, stale indexes removed
    m2, k2 = _write(tmp_path, "train", x[10:25], y[10:25], start=5, old=r, old_keys=k1)
    r2 = read_manifest(str(tmp_path / "train"))
    assert r2.num_samples == 25 and r2.filenames[:2] == m1.filenames and len(r2.filenames) == 4
    got = read_sample_index(str(tmp_path / "train"), r2)
    assert sum(len(v) for v in got.values()) == 25 and got == k2
    assert [p.name for p in (tmp_path / "train").glob("samples-*.json")] == [r2.sample_index_file]


def test_tampered_or_missing_key_index_is_refused(cifar_exact, tmp_path):
    _write(tmp_path, "train", cifar_exact["x_train"][:9], cifar_exact["y_train"][:9])
    r = read_manifest(str(tmp_path / "train"))
    idx = tmp_path / "train" / r.sample_index_file
    idx.write_text(idx.read_text().replace("00001", "99999"))
    with pytest.raises(ManifestError, match=rf"{r.sample_index_file}.*sha256 does not match"):
        read_sample_index(str(tmp_path / "train"), r)
    idx.unlink()
    with pytest.raises(ManifestError, match=rf"{r.sample_index_file}.*unreadable"):
        read_sample_index(str(tmp_path / "train"), r)
    m = _manifest([])
    m.shards = list(r.shards)
    with pytest.raises(ManifestError, match="sample index must list exactly"):
        write_manifest(str(tmp_path / "train"), m, sample_index={r.shards[0]["name"]: ["train/c0/00000"]},
                       key=OWNER)


@pytest.mark.parametrize("doc,msg", [
    ("[1, 2]", "must be a JSON object"),
    ('{"format": "etc-data-manifest/99"}', "unknown manifest format"),
    ("", "not valid JSON"),
])
def test_unparsable_manifests_name_the_file(tmp_path, doc, msg):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "manifest.json").write_text(doc)
    with pytest.raises(ManifestError, match=msg) as e:
        read_manifest(str(tmp_path / "train"))
    assert str(tmp_path / "train" / "manifest.json") in str(e.value)


def test_inconsistent_manifests_are_refused(cifar_exact, tmp_path):
    _write(tmp_path, "train", cifar_exact["x_train"][:9], cifar_exact["y_train"][:9])
    p = tmp_path / "train" / "manifest.json"
    good = json.loads(p.read_text())
    bad = dict(good, num_samples=good["num_samples"] + 1)
    p.write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match="num_samples 10 != sum of shard samples 9"):
        read_manifest(str(tmp_path / "train"))
    bad = dict(good, shards=[{"name": "train-000000.tar", "sha256": "x"}])
    bad.pop("num_samples")
    p.write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match=r"shards\[0\] must have name, sha256, bytes, samples"):
        read_manifest(str(tmp_path / "train"))
    bad = {k: v for k, v in good.items() if k != "codec"}
    p.write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match="lacks field.*codec"):
        read_manifest(str(tmp_path / "train"))


def test_info_json_merges_splits_and_timm_reads_each(cifar_exact, tmp_path):
    from timm.data import create_dataset

    _write(tmp_path, "train", cifar_exact["x_train"][:12], cifar_exact["y_train"][:12], max_samples=5)
    _write(tmp_path, "test", cifar_exact["x_test"][:7], cifar_exact["y_test"][:7], max_samples=5)
    info = json.loads((tmp_path / "_info.json").read_text())
    assert set(info["splits"]) == {"train", "test"} and info["name"] == "cifar-t"
    assert info["splits"]["train"] == {"name": "train", "num_samples": 12, "shard_lengths": [5, 5, 2],
                                       "filenames": ["train/train-000000.tar", "train/train-000000-1.tar",
                                                     "train/train-000000-2.tar"]}
    assert info["splits"]["test"]["num_samples"] == 7
    for split, n, labels in (("train", 12, cifar_exact["y_train"][:12]), ("test", 7, cifar_exact["y_test"][:7])):
        ds = create_dataset("wds/etc", root=str(tmp_path), split=split, is_training=False, batch_size=1,
                            input_key="jpg", target_key="cls")
        items = list(ds)
        assert len(items) == n
        assert sorted(int(t) for _, t in items) == sorted(int(v) for v in labels)
        assert all(img.size == (32, 32) and img.mode == "RGB" for img, _ in items)
