import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from etc_data.codecs import get_codec
from etc_data.keys import load_key
from etc_data.manifest import read_manifest
from etc_data.prepare import PrepareConfig, PrepareError, prepare_dataset
from etc_data.schemes import make_scheme
from etc_data.shards import iter_samples, iter_tar, read_shard
from etc_data.verify import verify_split as verify
from etc_data.sources import SourceError

from .conftest import make_image_zip, make_mini_npz


def _npz(tmp_path, cifar_exact, n_train=120, n_test=40):
    return make_mini_npz(tmp_path / "cifar10-mini.npz", cifar_exact, n_train, n_test)


def _hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.tar"))}


def test_prepare_lossless_round_trip_and_manifest(tmp_path, cifar_exact, key_file):
    src = _npz(tmp_path, cifar_exact)
    out = tmp_path / "out"
    s = PrepareConfig(source=str(src), out=str(out), dataset="cifar10", scheme="etc", block_size=8, codec="png",
                 key_ref=str(key_file), shard_size=50)
    summ = prepare_dataset(s)
    m = read_manifest(str(out / "train"))
    assert m.num_samples == 120 and m.shard_lengths == [50, 50, 20] and m.image_size == [32, 32]
    assert m.key_fingerprint == load_key(key_file).fingerprint and m.codec == "png:level=6"
    assert m.classes[0] == "airplane" and summ.manifests["test"].num_samples == 40
    raw = (out / "train" / "manifest.json").read_text() + (out / "_info.json").read_text()
    assert json.loads(key_file.read_text())["secret"] not in raw
    assert verify(str(out / "train"), deep=True).ok
    scheme = make_scheme("etc", key=load_key(key_file), dataset="cifar10", block_size=8)
    samples = list(iter_samples(str(out / "test")))
    dec = scheme.decrypt(np.stack([get_codec("png").decode(x["png"]) for x in samples]))
    order = [int(x["__key__"].split("_")[1]) for x in samples]
    assert np.array_equal(dec, cifar_exact["x_test"][:40][order])  # exact: lossless codec
    assert [x["cls"] for x in samples] == list(cifar_exact["y_test"][:40][order])
    assert samples[0]["json"] == {"cls": samples[0]["cls"], "source_id": samples[0]["__key__"], "split": "test"}


def test_same_input_and_key_give_same_shards(tmp_path, cifar_exact, key_file):
    src = _npz(tmp_path, cifar_exact, 80, 10)
    for name in ("a", "b"):
        prepare_dataset(PrepareConfig(source=str(src), out=str(tmp_path / name), dataset="d", key_ref=str(key_file),
                         codec="jpeg:q=85,sub=420", shard_size=30))
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b") and len(_hashes(tmp_path / "a")) == 4


def test_incremental_ingest_appends_without_reencrypting(tmp_path, cifar_exact, key_file):
    src = _npz(tmp_path, cifar_exact, 200, 10)
    out = tmp_path / "out"
    base = dict(source=str(src), out=str(out), dataset="d", key_ref=str(key_file), codec="jpeg:q=85,sub=444",
                shard_size=60, splits=["train"])
    prepare_dataset(PrepareConfig(**base, limit=100))
    before = _hashes(out)
    summ = prepare_dataset(PrepareConfig(**base, limit=170))
    after = _hashes(out)
    assert summ.written["train"] == 70
    assert all(after[k] == v for k, v in before.items())  # old shards untouched
    m = read_manifest(str(out / "train"))
    assert m.num_samples == 170 and len(m.shards) == len(before) + 2
    keys = [x["__key__"] for x in iter_samples(str(out / "train"))]
    assert len(keys) == len(set(keys)) == 170
    assert prepare_dataset(PrepareConfig(**base, limit=170)).written["train"] == 0  # nothing new: nothing written


def test_append_with_other_key_or_codec_is_refused(tmp_path, cifar_exact, key_file):
    from etc_data.keys import new_key_file

    src = _npz(tmp_path, cifar_exact, 30, 5)
    out = tmp_path / "out"
    prepare_dataset(PrepareConfig(source=str(src), out=str(out), dataset="d", key_ref=str(key_file), codec="png", limit=10))
    other = tmp_path / "other.key"
    new_key_file(other, "mallory")
    from etc_data.trust import UnknownSignerError

    # another owner cannot append to (and so re-sign) this owner's split
    with pytest.raises(UnknownSignerError, match=rf"signed by key fingerprint {load_key(key_file).fingerprint}.*"
                                                 rf"not a trusted owner.*{load_key(other).fingerprint}"):
        prepare_dataset(PrepareConfig(source=str(src), out=str(out), dataset="d", key_ref=str(other), codec="png"))
    with pytest.raises(PrepareError, match=r"codec: dataset has 'png:level=6'"):
        prepare_dataset(PrepareConfig(source=str(src), out=str(out), dataset="d", key_ref=str(key_file), codec="jpegls"))


def test_plain_scheme_is_signed_too_and_bad_codec_combo_refused(tmp_path, cifar_exact, key_file, monkeypatch):
    src = _npz(tmp_path, cifar_exact, 20, 5)
    monkeypatch.delenv("ETC_DATA_KEY", raising=False)
    with pytest.raises(PrepareError, match="signs every manifest with the owner's key: give --key"):
        prepare_dataset(PrepareConfig(source=str(src), out=str(tmp_path / "p"), dataset="d", scheme="plain",
                                      codec="png"))
    assert not (tmp_path / "p").exists()
    summ = prepare_dataset(PrepareConfig(source=str(src), out=str(tmp_path / "p"), dataset="d", scheme="plain",
                                         codec="png", key_ref=str(key_file)))
    assert summ.manifests["train"].key_fingerprint is None and summ.key_bits is None
    assert read_manifest(str(tmp_path / "p" / "train")).public_key == load_key(key_file).public_key
    from etc_data.schemes import SchemeError

    with pytest.raises(SchemeError, match="not JPEG-compliant"):
        prepare_dataset(PrepareConfig(source=str(src), out=str(tmp_path / "q"), dataset="d", key_ref=str(key_file),
                         block_size=8, codec="jpeg:q=85,sub=420"))
    assert not (tmp_path / "q").exists()


def test_bad_image_stops_with_name_or_is_skipped_and_listed(tmp_path, cifar_exact, key_file):
    z = make_image_zip(tmp_path / "imgs.zip", cifar_exact["x_test"][:12], cifar_exact["y_test"][:12],
                       [str(i) for i in range(10)])
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(z) as zin, zipfile.ZipFile(bad, "w") as zout:
        for n in zin.namelist():
            zout.writestr(n, zin.read(n))
        zout.writestr("train/3/9999.png", b"\x89PNG\r\n\x1a\nbroken")
    s = dict(source=str(bad), dataset="d", key_ref=str(key_file), codec="png", block_size=8)
    with pytest.raises(SourceError, match="9999.png"):
        prepare_dataset(PrepareConfig(out=str(tmp_path / "o1"), **s))
    assert not (tmp_path / "o1" / "train" / "manifest.json").exists()
    summ = prepare_dataset(PrepareConfig(out=str(tmp_path / "o2"), on_bad_image="skip", **s))
    assert summ.manifests["train"].num_samples == 12
    assert len(summ.skipped["train"]) == 1 and "9999.png" in summ.skipped["train"][0]
    assert any("skipped 1" in line for line in summ.lines())


KILL_SCRIPT = """
import sys
from etc_data.prepare import PrepareConfig, prepare_dataset
prepare_dataset(PrepareConfig(source=sys.argv[1], out=sys.argv[2], dataset="d", key_ref=sys.argv[3], codec="jpeg:q=90,sub=444",
                 shard_size=40))
"""


def test_sigkill_then_rerun_gives_the_uninterrupted_result(tmp_path, cifar_exact, key_file):
    src = _npz(tmp_path, cifar_exact, 4000, 1000)
    ref, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(src), str(ref), str(key_file)], check=True)
    p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(src), str(out), str(key_file)])
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.rglob("*.tar"))) < 5:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "train" / "manifest.json").exists()  # really interrupted before the commit point
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(src), str(out), str(key_file)], check=True)
    for split in ("train", "test"):
        a = json.loads((ref / split / "manifest.json").read_text())
        b = json.loads((out / split / "manifest.json").read_text())
        a.pop("created"), b.pop("created"), a.pop("signature"), b.pop("signature")  # the signature covers "created"
        assert a == b
    assert _hashes(ref) == _hashes(out)
    assert not list(out.rglob("*.part"))
    assert verify(str(out / "train")).ok


def test_kept_open_sources_are_reopened_when_the_source_grew(tmp_path, cifar_exact, key_file):
    """A long-lived process (Prefect task threads, a served deployment) keeps its source open
    across runs; a folder that gained images between two runs must not be read through the stale
    listing (positions would point at the wrong images)."""
    from etc_data.codecs import get_codec as gc
    from etc_data.prepare import ChunkRunner

    runner = ChunkRunner()  # one long-lived runner for both runs, as in a served deployment

    x, y = cifar_exact["x_train"][:30], cifar_exact["y_train"][:30]
    folder = tmp_path / "imgs" / "train"

    def add(lo, hi):
        from PIL import Image

        for i in range(lo, hi):
            d = folder / f"c{int(y[i])}"
            d.mkdir(parents=True, exist_ok=True)
            # names that sort new images *between* old ones, so stale positions would shift
            Image.fromarray(x[i]).save(d / f"{(i * 7) % 30:04d}_{i}.png")

    def run():
        s = PrepareConfig(source=str(tmp_path / "imgs"), out=str(tmp_path / "out"), dataset="d", key_ref=str(key_file),
                     codec="png", shard_size=8)
        return prepare_dataset(s, map_chunks=lambda c, specs: [runner.run(c, spec) for spec in specs])

    add(0, 20)
    run()
    add(20, 30)
    summ = run()
    assert summ.written["train"] == 10 and summ.manifests["train"].num_samples == 30
    scheme = make_scheme("etc", key=load_key(key_file), dataset="d", block_size=16)
    samples = list(iter_samples(str(tmp_path / "out" / "train")))
    dec = scheme.decrypt(np.stack([gc("png").decode(s["png"]) for s in samples]))
    idx = [int(s["__key__"].removesuffix("~png").rsplit("_", 1)[1]) for s in samples]
    assert sorted(idx) == list(range(30)) and np.array_equal(dec, x[idx])


def test_kept_schemes_follow_a_rotated_key(tmp_path, cifar_exact):
    """A long-lived process keeps its key schedule across runs; when the key behind the same
    reference changes (a rotated key file or Prefect Secret), the next run must encrypt with the
    new key that its manifest names, not the cached old one."""
    from etc_data.keys import new_key_file
    from etc_data.prepare import ChunkRunner

    runner = ChunkRunner()  # one long-lived runner for both runs, as in a served deployment

    src = _npz(tmp_path, cifar_exact, 40, 0)
    ref = tmp_path / "owner.key"

    def run(out):
        s = PrepareConfig(source=str(src), out=str(tmp_path / out), dataset="d", key_ref=str(ref), codec="png",
                     shard_size=20)
        return prepare_dataset(s, map_chunks=lambda c, specs: [runner.run(c, spec) for spec in specs])

    new_key_file(ref, "alice")
    run("a")
    ref.unlink()
    new_key_file(ref, "alice")  # rotated: same path, new secret
    run("b")
    key = load_key(ref)
    m = read_manifest(str(tmp_path / "b" / "train"))
    assert m.key_fingerprint == key.fingerprint
    scheme = make_scheme("etc", key=key, dataset="d", block_size=16)
    samples = list(iter_samples(str(tmp_path / "b" / "train")))
    dec = scheme.decrypt(np.stack([get_codec("png").decode(x["png"]) for x in samples]))
    order = [int(x["__key__"].split("_")[1]) for x in samples]
    assert np.array_equal(dec, cifar_exact["x_train"][:40][order])


def test_leftover_shards_warn_fail_only_when_strict_and_are_cleaned(tmp_path, cifar_exact, key_file, capsys):
    """A run killed before its commit leaves complete shards the manifest does not list: the dataset
    is intact (a warning naming them, exit 0) but a reader that globs *.tar would count them."""
    import shutil

    from etc_data.cli import main
    from etc_data.verify import VerifyConfig, verify_dataset

    cfg = dict(dataset="d", key_ref=str(key_file), codec="png", block_size=8, shard_size=40)
    small = make_mini_npz(tmp_path / "small.npz", cifar_exact, 100)
    big = make_mini_npz(tmp_path / "big.npz", cifar_exact, 140)
    out, ref = tmp_path / "out", tmp_path / "ref"
    prepare_dataset(PrepareConfig(source=str(small), out=str(out), **cfg))
    prepare_dataset(PrepareConfig(source=str(big), out=str(ref), **cfg))
    committed = _hashes(out)

    def leave_leftovers():  # what an append killed after writing its shard, mid-way through another, leaves
        shutil.copy(ref / "train" / "train-000003.tar", out / "train" / "train-000003.tar")
        (out / "train" / ".train-000004.tar.1a2b3c4d.part").write_bytes(b"half a shard")

    leave_leftovers()
    assert len(list((out / "train").glob("*.tar"))) == 4 and read_manifest(str(out / "train")).num_samples == 100
    res = verify_dataset(VerifyConfig(url=str(out)))
    assert res.ok and res.reports[0].extra == ["train-000003.tar"]
    assert main(["verify", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "EXTRA train-000003.tar (not in the manifest" in printed and "OK, with 1 shard(s)" in printed
    assert main(["verify", str(out), "--strict"]) == 2 and "FAILED" in capsys.readouterr().out

    assert main(["verify", str(out), "--clean"]) == 0
    assert "REMOVED train-000003.tar" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "train").iterdir() if p.name.endswith((".tar", ".part"))) == \
        ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert _hashes(out) == committed and main(["verify", str(out), "--strict", "--deep"]) == 0

    leave_leftovers()  # a rerun with nothing new to write removes them too
    summ = prepare_dataset(PrepareConfig(source=str(small), out=str(out), **cfg))
    assert summ.written == {"train": 0} and _hashes(out) == committed
    assert not list((out / "train").glob("*.part"))


def test_shards_of_a_class_sorted_source_mix_classes(tmp_path, cifar_exact, key_file):
    """A <split>/<class>/<file> zip lists its items class by class; written in that order each shard held one
    to three classes, which a reader's shuffle buffer cannot mix (a training batch then sees two or three)."""
    x, y = cifar_exact["x_train"][:200], cifar_exact["y_train"][:200]
    src = make_image_zip(tmp_path / "c10.zip", x, y, [f"c{i}" for i in range(10)])
    prepare_dataset(PrepareConfig(source=str(src), out=str(tmp_path / "out"), dataset="c10", key_ref=str(key_file),
                                  codec="jpeg:q=85,sub=420", shard_size=50))
    split = str(tmp_path / "out" / "train")
    per_shard = [[int(s["cls"]) for s in iter_tar(read_shard(split, e["name"]), e["name"])]
                 for e in read_manifest(split).shards]
    assert [len(c) for c in per_shard] == [50, 50, 50, 50]
    assert all(len(set(c)) >= 7 for c in per_shard), [sorted(set(c)) for c in per_shard]
    assert sorted(c for cs in per_shard for c in cs) == sorted(int(v) for v in y)


def test_a_shard_storage_mangles_after_writing_is_caught_by_its_chunk_and_never_listed(tmp_path, cifar_exact,
                                                                                     key_file, monkeypatch):
    import contextlib
    from pathlib import Path

    import etc_data.storage as storage

    src = _npz(tmp_path, cifar_exact, 80, 10)
    out = tmp_path / "out"
    cfg = PrepareConfig(source=str(src), out=str(out), dataset="d", key_ref=str(key_file), codec="jpeg:q=85,sub=420",
                        shard_size=30, splits=["train"])
    real = storage.staged_open

    @contextlib.contextmanager
    def mangling(url, storage_options=None):
        with real(url, storage_options) as f:
            yield f
        if url.endswith("train-000001.tar"):  # storage flips one bit of what it was given, in a late sample
            p = Path(url)
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 1  # (the read-back parses only the first sample: the hash must catch it)
            p.write_bytes(bytes(data))

    monkeypatch.setattr(storage, "staged_open", mangling)
    with pytest.raises(PrepareError, match=r"train-000001\.tar was written but reading it back failed: .*sha256"):
        prepare_dataset(cfg)
    assert not (out / "train" / "manifest.json").exists()  # nothing committed, so nothing lists it
    monkeypatch.setattr(storage, "staged_open", real)
    summ = prepare_dataset(cfg)  # the rerun rewrites it; the mangled file is not counted anywhere
    assert summ.verified == {"train": 80}
    assert verify(str(out / "train"), deep=True).ok


def test_large_runs_go_to_worker_processes_small_ones_stay_on_threads(tmp_path, shared_dir, monkeypatch):
    # the CLI starts the pool before planning only for a source that pool_size will give one
    from dataclasses import replace

    import etc_data.codecs as codecs
    from etc_data.prepare import ChunkSpec, pool_before_planning, pool_size

    monkeypatch.setattr(codecs, "default_workers", lambda: 2)  # the rule for a small machine, wherever this runs
    cifar = [str(shared_dir / "cifar10-train-jpeg.zip"), str(shared_dir / "cifar10-test-jpeg.zip")]
    cfg = PrepareConfig(source=cifar, out=str(tmp_path / "o"), key_ref="unused")
    assert pool_before_planning(cfg)                                   # 60,000 images, 6 chunks
    assert not pool_before_planning(replace(cfg, limit=5000))          # 10,000 images
    assert not pool_before_planning(replace(cfg, source=cifar[1:]))    # one chunk
    assert not pool_before_planning(replace(cfg, workers=1))
    big = [ChunkSpec("train", i, list(range(10000))) for i in range(3)]
    assert pool_size(cfg, big) == 2 and pool_size(cfg, big[:1]) == 0 and pool_size(cfg, [ChunkSpec("t", 0, [1])] * 3) == 0
    assert pool_size(replace(cfg, workers=1), big) == 0
