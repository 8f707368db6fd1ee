"""The streamed prepare path (images decoded straight into batches of about 1 MB, encrypted per batch on
threads, tar hashed and written as it grows) against the plain reference path (each image decoded
on its own, the whole chunk encrypted at once, the tar built in memory), on real images."""

import hashlib
import zipfile

import numpy as np
import pytest

from etc_data.codecs import get_codec
from etc_data.images import decode_image
from etc_data.keys import load_key
from etc_data.manifest import read_manifest
from etc_data.prepare import STREAM_BATCH, PrepareConfig, prepare_dataset, stream_batch
from etc_data.schemes import make_scheme
from etc_data.shards import _build_tar_files, _sorted_files, iter_tar
from etc_data.sources import open_source


N_IMAGES = STREAM_BATCH + 5 * stream_batch(224 * 224 * 3) + 3


@pytest.fixture(scope="module")
def real_zip(tmp_path_factory, shared_dir):
    """N_IMAGES real Imagenette JPEGs (224 px, some grayscale) in two classes of one split: several
    batches and a partial one."""
    path = tmp_path_factory.mktemp("src") / "inet.zip"
    with zipfile.ZipFile(shared_dir / "imagenette-224-subset.zip") as z, zipfile.ZipFile(path, "w") as out:
        names = sorted(n for n in z.namelist() if n.endswith(".JPEG") and "/val/" in f"/{n}")
        picked = names[:40] + names[-(N_IMAGES - 40):]
        for n in picked:
            out.writestr("train/" + "/".join(n.split("/")[-2:]), z.read(n))
    return path


@pytest.mark.parametrize("spec", ["etc", "blockwise", "blockwise:scramble=1", "pe", "ele", "plain"])
def test_streamed_shards_equal_the_reference_path_for_every_scheme(tmp_path, real_zip, key_file, spec):
    out = tmp_path / "out"
    prepare_dataset(PrepareConfig(source=str(real_zip), out=str(out), dataset="d", scheme=spec, codec="png",
                                  key_ref=str(key_file), workers=1))
    m = read_manifest(str(out / "train"))
    assert len(m.shards) == 1 and m.num_samples == N_IMAGES

    data = (out / "train" / m.shards[0]["name"]).read_bytes()
    order = [s["__key__"] for s in iter_tar(data, "t.tar")]  # the plan's (seeded, shuffled) order
    src = open_source(str(real_zip))
    by_key = {it.key: it for it in src.items("train")}
    items = [by_key[k] for k in order]
    with zipfile.ZipFile(real_zip) as z:
        plain = np.stack([decode_image(z.read(it.ref), it.ref) for it in items])
    assert any(np.array_equal(im[..., 0], im[..., 1]) for im in plain)  # grayscale JPEGs are in the set
    scheme = make_scheme(spec, key=load_key(key_file) if spec != "plain" else None, dataset="d")
    enc = scheme.encrypt(plain)
    png = get_codec("png")
    ref, _ = _build_tar_files(_sorted_files([{"__key__": it.key, "png": png.encode(e), "cls": it.label,
                                              "json": {"cls": it.label, "source_id": it.key, "split": "train"}}
                                             for it, e in zip(items, enc)], order="given"))
    assert sorted(order) == sorted(by_key) and data == ref  # bit-identical: decoding, encryption, coding, tar
    assert m.shards[0]["sha256"] == hashlib.sha256(ref).hexdigest() and m.shards[0]["bytes"] == len(ref)
    if spec != "plain":
        assert np.array_equal(scheme.decrypt(enc), plain)


def test_byte_limit_splits_a_streamed_chunk_into_parts_with_the_same_samples(tmp_path, real_zip, key_file):
    from etc_data.shards import iter_samples

    base = dict(source=str(real_zip), dataset="d", codec="jpeg:q=85,sub=420", key_ref=str(key_file), workers=1)
    prepare_dataset(PrepareConfig(out=str(tmp_path / "one"), **base))
    prepare_dataset(PrepareConfig(out=str(tmp_path / "parts"), max_shard_bytes=200_000, **base))
    m = read_manifest(str(tmp_path / "parts" / "train"))
    assert [e["name"] for e in m.shards][:3] == ["train-000000.tar", "train-000000-1.tar", "train-000000-2.tar"]
    one, parts = (list(iter_samples(str(tmp_path / d / "train"))) for d in ("one", "parts"))
    assert [s["__key__"] for s in parts] == [s["__key__"] for s in one]
    assert all(a["jpg"] == b["jpg"] for a, b in zip(one, parts))
    for e in m.shards:  # each part holds at most 200 kB of sample payload (a sample is never split)
        data = (tmp_path / "parts" / "train" / e["name"]).read_bytes()
        assert e["samples"] == 1 or len(data) < 200_000 + 3 * 1024 * e["samples"] + 10240


def test_a_failing_chunk_stops_the_chunk_beside_it_with_nothing_committed(tmp_path, real_zip, key_file):
    import dataclasses

    from etc_data.prepare import ChunkThreads, PrepareError, build_scheme, plan_split
    from etc_data.trust import TrustPolicy

    cfg = PrepareConfig(source=str(real_zip), out=str(tmp_path / "out"), dataset="d", codec="jpeg:q=85,sub=420",
                        key_ref=str(key_file), shard_size=N_IMAGES - 8)
    source = cfg.open_source()
    scheme, key = build_scheme(cfg)
    plan = plan_split(cfg, source, "train", key.fingerprint, "jpeg", TrustPolicy.from_refs())
    big, small = plan.chunks  # the big chunk streams for several batches; the small one fails at once
    assert len(big.items) > 4 * STREAM_BATCH
    small = dataclasses.replace(small, token="changed")  # as if the source changed after planning
    chunks = ChunkThreads(2)
    chunks.runner.adopt(cfg, source, scheme, key.fingerprint)
    with pytest.raises(PrepareError, match="changed since this run was planned"):
        list(chunks.map(cfg, [big, small]))
    chunks.close()
    split = tmp_path / "out" / "train"
    assert not split.exists() or not [p.name for p in split.iterdir()]  # no shard, no temporary
