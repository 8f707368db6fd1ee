import json
import subprocess

import numpy as np
import pytest

from etc_data.manifest import Manifest, ManifestError, read_manifest, read_sample_index, write_manifest
from etc_data.shards import ShardError, ShardWriter, build_tar, iter_samples, write_chunk
from etc_data.verify import verify_split as verify
from etc_data.storage import StorageError, check_no_secrets, load_storage_config

from .conftest import fixed_owner

OWNER = fixed_owner()


def _samples(imgs, labels, prefix="train/c"):
    import simplejpeg

    return [{"__key__": f"{prefix}{int(l)}/{i:05d}", "jpg": simplejpeg.encode_jpeg(im, quality=85, colorsubsampling="444"),
             "cls": int(l), "json": {"cls": int(l), "source_id": f"x/{i}", "split": "train"}} for i, (im, l) in enumerate(zip(imgs, labels))]


def _manifest(shards, split="train"):
    return Manifest(split=split, dataset="t", scheme="etc", block_size=16, codec="jpeg:q=85,sub=444",
                    key_fingerprint=OWNER.fingerprint, classes=[f"c{i}" for i in range(10)], image_size=[32, 32],
                    shards=[s.entry() for s in shards], source="test")


def test_tar_bytes_are_deterministic_and_standard(cifar_exact, tmp_path):
    s = _samples(cifar_exact["x_test"][:20], cifar_exact["y_test"][:20])
    a, keys = build_tar(s)
    b, _ = build_tar(list(reversed(s)))
    assert a == b and keys == sorted(keys)
    p = tmp_path / "s.tar"
    p.write_bytes(a)
    listing = subprocess.run(["tar", "tvf", str(p)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(listing) == 60 and all("1970-01-01" in line and "0/0" in line for line in listing)
    with pytest.raises(ShardError, match="duplicate"):
        build_tar(s + s[:1])


def test_webdataset_reads_our_shards(cifar_exact, tmp_path):
    import webdataset as wds

    s = _samples(cifar_exact["x_test"][:30], cifar_exact["y_test"][:30])
    shards = write_chunk(str(tmp_path / "train"), "train", 0, s, max_samples=12)
    assert [x.samples for x in shards] == [12, 12, 6]
    urls = [str(tmp_path / "train" / x.name) for x in shards]
    got = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", "jpg", "cls"))
    assert len(got) == 30
    assert got[0][1].shape == (32, 32, 3) and got[0][2] == int(cifar_exact["y_test"][:30][np.argsort([x["__key__"] for x in s])[0]])


def test_manifest_round_trip_info_and_verify(cifar_exact, tmp_path):
    root = tmp_path / "ds"
    s = _samples(cifar_exact["x_test"][:25], cifar_exact["y_test"][:25])
    shards = write_chunk(str(root / "train"), "train", 0, s, max_samples=10)
    m = _manifest(shards)
    write_manifest(str(root / "train"), m, sample_index={x.name: x.keys for x in shards}, key=OWNER)
    r = read_manifest(str(root / "train"))
    assert r.num_samples == 25 and r.shard_lengths == [10, 10, 5] and r.filenames == [x.name for x in shards]
    d = json.loads((root / "train" / "manifest.json").read_text())
    for f in ("format", "num_samples", "shard_lengths", "filenames", "shards", "split", "scheme", "block_size",
              "codec", "key_fingerprint", "classes", "image_size"):
        assert f in d
    assert sum(len(v) for v in read_sample_index(str(root / "train"), r).values()) == 25
    info = json.loads((root / "_info.json").read_text())
    assert info["splits"]["train"]["filenames"][0] == "train/train-000000.tar"
    rep = verify(str(root / "train"), deep=True)
    assert rep.ok and rep.samples == 25, rep.lines()
    # corrupt one shard, add an extra one, delete another: each is reported by name
    (root / "train" / "train-000000-1.tar").write_bytes(b"garbage")
    (root / "train" / "train-000099.tar").write_bytes(b"x")
    (root / "train" / "train-000000-2.tar").unlink()
    rep = verify(str(root / "train"))
    assert not rep.ok
    assert rep.missing == ["train-000000-2.tar"] and rep.extra == ["train-000099.tar"]
    assert rep.corrupt and rep.corrupt[0].startswith("train-000000-1.tar")


def test_timm_wds_reader_consumes_the_dataset(cifar_exact, tmp_path):
    from timm.data import create_dataset

    root = tmp_path / "ds"
    s = _samples(cifar_exact["x_test"][:16], cifar_exact["y_test"][:16])
    shards = write_chunk(str(root / "train"), "train", 0, s, max_samples=8)
    write_manifest(str(root / "train"), _manifest(shards), key=OWNER)
    ds = create_dataset("wds/etc", root=str(root), split="train", is_training=False, batch_size=1,
                        input_key="jpg", target_key="cls")
    items = list(ds)
    assert len(items) == 16
    img, target = items[0]
    assert img.size == (32, 32) and 0 <= int(target) < 10


def test_bad_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ManifestError, match="no readable manifest"):
        read_manifest(str(tmp_path / "train"))
    (tmp_path / "train" / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(str(tmp_path / "train"))
    (tmp_path / "train" / "manifest.json").write_text('{"format": "etc-data-manifest/2", "split": "train"}')
    with pytest.raises(ManifestError, match="written by an earlier version.*run etc-data prepare again"):
        read_manifest(str(tmp_path / "train"))
    (tmp_path / "train" / "manifest.json").write_text('{"format": "etc-data-manifest/3", "split": "train"}')
    with pytest.raises(ManifestError, match="unsigned"):
        read_manifest(str(tmp_path / "train"))


def test_memory_fs_writer_and_iter(cifar_exact):
    url = "memory://etc-tests/ds/train"
    s = _samples(cifar_exact["x_test"][:9], cifar_exact["y_test"][:9])
    with ShardWriter(url, "train", max_samples=4) as w:
        for x in s:
            w.write(x)
    assert [x.samples for x in w.shards] == [4, 4, 1]
    write_manifest(url, _manifest(w.shards), key=OWNER)
    got = list(iter_samples(url))
    assert sorted(g["__key__"] for g in got) == sorted(x["__key__"] for x in s)
    assert got[0]["json"]["split"] == "train" and isinstance(got[0]["cls"], int)
    assert verify(url, deep=True).ok


def test_storage_config_refuses_secrets(tmp_path):
    good = tmp_path / "s.yaml"
    good.write_text("url: s3://bucket/data\nstorage_options:\n  endpoint_url: http://127.0.0.1:8333\n  anon: false\n")
    assert load_storage_config(good)["url"] == "s3://bucket/data"
    for field in ("key", "secret", "token", "aws_secret_access_key", "password"):
        bad = tmp_path / f"{field}.yaml"
        bad.write_text(f"url: s3://b\nstorage_options:\n  {field}: abc\n")
        with pytest.raises(StorageError, match=rf"{bad.name}.*storage_options\.{field}"):
            load_storage_config(bad)
    check_no_secrets({"storage_options": {"client_kwargs": {"region_name": "x"}}}, "ok")


def test_verify_cli_exit_status_and_deep_decoding(cifar_exact, tmp_path, capsys):
    from etc_data.cli import main

    root = tmp_path / "ds"
    s = _samples(cifar_exact["x_test"][:12], cifar_exact["y_test"][:12])
    write_manifest(str(root / "train"), _manifest(write_chunk(str(root / "train"), "train", 0, s, max_samples=6)),
                   key=OWNER)
    t = _samples(cifar_exact["x_train"][:5], cifar_exact["y_train"][:5], prefix="test/c")
    t[3]["jpg"] = t[3]["jpg"][:40]  # a truncated JPEG that is not the first sample of its shard
    bad_key = sorted(x["__key__"] for x in t).index(t[3]["__key__"])
    assert bad_key != 0
    write_manifest(str(root / "test"), _manifest(write_chunk(str(root / "test"), "test", 0, t), split="test"),
                   key=OWNER)
    assert main(["verify", str(root / "train")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "OK"
    # the shallow check decodes the first sample of each shard only; --deep finds the broken one
    assert main(["verify", str(root)]) == 0
    assert main(["verify", str(root), "--deep"]) == 2
    out = capsys.readouterr()
    assert f"CORRUPT test-000000.tar: sample {t[3]['__key__']} does not decode" in out.out
    assert "verification failed" in out.err
    (root / "train" / "train-000000-1.tar").unlink()
    assert main(["verify", str(root / "train")]) == 2
    assert "MISSING train-000000-1.tar" in capsys.readouterr().out


def _tarfile_tar(files, fmt, dirs=()):
    """A tar written by Python's tarfile (as other tools would write shards) in the given format."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            t.addfile(ti)
        for name, data in files:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1_700_000_000
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_tar_reader_matches_tarfile_on_foreign_tars(fmt):
    import tarfile

    from etc_data.shards import _tar_members, iter_tar

    long_dir = "d" * 120  # needs the ustar prefix field, a GNU long name or a PAX record
    files = [(f"{long_dir}/k{i:03d}.{ext}", bytes([i]) * (i * 37 + len(ext))) for i in range(5) for ext in ("cls", "jpg")]
    files.append(("short/x.png", b"png-bytes"))
    data = _tarfile_tar(files, {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}[fmt],
                        dirs=["short"])
    got = list(iter_tar(data, "foreign.tar"))
    assert [s["__key__"] for s in got] == [f"{long_dir}/k{i:03d}" for i in range(5)] + ["short/x"]
    assert got[3]["jpg"] == bytes([3]) * (3 * 37 + 3) and got[-1]["png"] == b"png-bytes"
    fast = _tar_members(data, "foreign.tar")
    if fmt == "ustar":  # parsed directly, with the prefix field
        assert fast is not None and [m[0] for m in fast] == [f for f, _ in files]
    else:  # GNU long names and PAX records go through tarfile
        assert fast is None


def test_tar_reader_rejects_corrupt_headers_and_truncation(cifar_exact):
    from etc_data.shards import _tar_members, iter_tar

    data, _ = build_tar(_samples(cifar_exact["x_test"][:3], cifar_exact["y_test"][:3]))
    assert len(list(iter_tar(data, "ok.tar"))) == 3
    bad = bytearray(data)
    bad[_tar_members(data, "ok.tar")[4][1] - 512 + 10] ^= 0x20  # a byte of the fifth member's name
    with pytest.raises(ShardError, match="bad.tar is not a readable tar"):
        list(iter_tar(bytes(bad), "bad.tar"))
    with pytest.raises(ShardError, match="cut.tar"):
        list(iter_tar(data[:2048], "cut.tar"))
    with pytest.raises(ShardError, match="cut2.tar .*multiple of 512"):
        list(iter_tar(data[:2000], "cut2.tar"))


def test_every_codec_extension_is_an_image_for_verify_and_the_loader(tmp_path, cifar_exact):
    """One list of sample image extensions (the codecs'): a raw (PPM) dataset verifies and loads."""
    from etc_data.codecs import EXT_TO_CODEC
    from etc_data.keys import new_key_file
    from etc_data.loader import iter_split
    from etc_data.prepare import PrepareConfig, prepare_dataset
    from etc_data.shards import SAMPLE_EXTS

    assert set(SAMPLE_EXTS) == set(EXT_TO_CODEC)
    np.savez(tmp_path / "m.npz", x_train=cifar_exact["x_train"][:20], y_train=cifar_exact["y_train"][:20])
    new_key_file(tmp_path / "k.key", "a")
    prepare_dataset(PrepareConfig(source=str(tmp_path / "m.npz"), out=str(tmp_path / "ds"), dataset="d",
                     key_ref=str(tmp_path / "k.key"), codec="raw", shard_size=8))
    url = str(tmp_path / "ds" / "train")
    rep = verify(url, deep=True)
    assert rep.ok and rep.samples == 20, rep.lines()
    assert len(list(iter_split(url, read_manifest(url), train=False))) == 20


@pytest.mark.parametrize("fmt", ["ours", "pax"])
def test_streamed_tar_reading_in_small_windows_matches_whole_reads_and_hashes(cifar_exact, fmt):
    """Verify reads shards in bounded windows: any window size (not a multiple of 512, smaller than
    one member) gives the samples and the sha256 of reading the whole shard."""
    import hashlib
    import io
    import tarfile

    from etc_data.shards import iter_tar, stream_samples

    if fmt == "ours":
        data, _ = build_tar(_samples(cifar_exact["x_test"][:7], cifar_exact["y_test"][:7]))
    else:
        data = _tarfile_tar([(f"{'p' * 120}/k{i}.jpg", bytes([i]) * 900) for i in range(4)], tarfile.PAX_FORMAT)
    whole = [{"__key__": s["__key__"], **{k: bytes(v) for k, v in s.items() if k != "__key__"}}
             for s in iter_tar(data, "w.tar")]
    for window in (700, 4096, 1 << 20):
        from etc_data import shards

        h = hashlib.sha256()
        got = list(shards._group_samples(shards.stream_members(io.BytesIO(data), "w.tar", window, h), "w.tar"))
        assert [{"__key__": k, **f} for k, f in got] == whole
        assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert len(list(stream_samples(io.BytesIO(data), "w.tar"))) == len(whole)
    if fmt == "ours":  # a shard cut short is an error naming it, whatever the window
        with pytest.raises(ShardError, match="cut.tar"):
            list(shards.stream_members(io.BytesIO(data[:len(data) // 2 // 512 * 512 + 100]), "cut.tar", 600))


def test_headers_built_per_batch_equal_the_per_member_ones(shared_dir):
    # real sample names and sizes, plus names that need the prefix field or PAX (None: built per member)
    import zipfile

    from etc_data.shards import _ustar_header, _ustar_headers

    with zipfile.ZipFile(shared_dir / "imagenette-224-subset.zip") as z:
        infos = [i for i in z.infolist() if not i.is_dir()][:500]
    names = [f"train_{i.filename.replace('/', '_')}.{ext}" for i in infos for ext in ("cls", "jpg", "json")]
    sizes = [i.file_size * k for i in infos for k in (0, 1, 7)]
    names += ["a" * 100 + ".jpg", "d/" * 60 + "x.jpg", "é" * 40 + ".cls", "x.jpg"]
    sizes += [5, 6, 7, 8 ** 11]
    want = [_ustar_header(n, s) for n, s in zip(names, sizes)]
    got = _ustar_headers(names, sizes)
    assert got[-4:] == [None, None, want[-2], None] and want[-4] is None and want[-1] is None
    assert all(g == w for g, w in zip(got, want) if g is not None) and sum(g is not None for g in got) == len(got) - 3


def test_batches_added_at_once_give_the_bytes_and_parts_of_one_by_one(cifar_exact, tmp_path):
    # prepare adds a batch at a time (tar headers built for the batch at once), across the sample and
    # byte limits too: the parts and their bytes are those of adding every sample on its own, and a
    # key seen before is refused by name either way
    from etc_data.shards import ShardStream, sample_files

    samples = [(s["__key__"].replace("/", "_"), sample_files(dict(s, __key__=s["__key__"].replace("/", "_"))))
               for s in _samples(cifar_exact["x_train"][:300], cifar_exact["y_train"][:300])]
    samples.append(("x_" + "n" * 120, [("x_" + "n" * 120 + ".cls", b"1")]))  # a name for PAX: that batch per sample
    payload = sum(len(d) for _, fs in samples for _, d in fs)

    def parts(folder, batch, **limits):
        with ShardStream(str(tmp_path / folder), "", split="train", index=0, order="given", **limits) as s:
            if batch:
                for i in range(0, len(samples), batch):
                    s.add_many(samples[i:i + batch])
            else:
                for k, fs in samples:
                    s.add(k, fs)
        return [(p.name, p.sha256, p.keys) for p in s.shards]

    for limits in ({}, {"max_samples": 64}, {"max_bytes": payload // 5}):
        one = parts(f"one{len(limits)}{sorted(limits)}", 0, **limits)
        assert len(one) == (1 if not limits else 5 if "max_samples" in limits else 6)
        for batch in (7, 32, 301):
            assert parts(f"b{batch}{sorted(limits)}", batch, **limits) == one, (batch, limits)
    with pytest.raises(ShardError, match=f"duplicate sample key '{samples[5][0]}'"):
        with ShardStream(str(tmp_path / "dup"), "", split="train", index=0, order="given") as s:
            s.add_many(samples[:10])
            s.add_many(samples[5:8])
