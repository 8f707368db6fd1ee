"""Sources: CIFAR-10 python format (folder and .tar.gz), Imagenette layout (folder and .tgz),
the shared zips merged, resize policy, grayscale -> RGB, bad images named."""

import io
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest

from etc_data.downloads import download_imagenette
from etc_data.images import resize_shorter_center_crop
from etc_data.sources import CIFAR10_CLASSES, CifarSource, FolderSource, MultiSource, SourceError, open_source

from .conftest import make_image_zip


def _cifar_python_folder(root, cifar_exact, per_batch=20, n_test=30):
    """Write real CIFAR-10 pixels in the official python pickle layout (CHW rows, like the real files)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR10_CLASSES, "num_vis": 3072}))

    def dump(name, x, y):
        rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
        (d / name).write_bytes(pickle.dumps({"data": rows, "labels": [int(v) for v in y],
                                             "batch_label": name.encode()}))

    for i in range(5):
        sl = slice(i * per_batch, (i + 1) * per_batch)
        dump(f"data_batch_{i + 1}", cifar_exact["x_train"][sl], cifar_exact["y_train"][sl])
    dump("test_batch", cifar_exact["x_test"][:n_test], cifar_exact["y_test"][:n_test])
    return d


def test_cifar_python_folder_and_targz_give_exact_pixels(tmp_path, cifar_exact, monkeypatch):
    monkeypatch.setenv("ETC_DATA_CACHE", str(tmp_path / "cache"))
    folder = _cifar_python_folder(tmp_path / "raw", cifar_exact)
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(folder, arcname="cifar-10-batches-py")

    for spec in (folder, tmp_path / "raw", tgz):
        src = open_source(spec)
        assert isinstance(src, CifarSource), spec
        assert src.splits == ["train", "test"] and src.classes == CIFAR10_CLASSES
        items = src.items("train")
        assert len(items) == 100 and len(src.items("test")) == 30
        # keys follow the official order per class: train_<class>_NNNN, like the shared JPEG zips
        y = cifar_exact["y_train"][:100]
        first = 0
        by_key = {it.key: it for it in items}
        k0 = f"train_{CIFAR10_CLASSES[y[first]]}_0000"
        b = src.load([by_key[k0]])
        np.testing.assert_array_equal(b.images[0], cifar_exact["x_train"][first])
        assert b.labels[0] == y[first]
        # a whole split comes back exactly (order of sorted keys -> official indices)
        b = src.load(items)
        assert b.images.shape == (100, 32, 32, 3) and b.images.dtype == np.uint8
        np.testing.assert_array_equal(b.images, cifar_exact["x_train"][[it.ref for it in items]])
        np.testing.assert_array_equal(b.labels, y[[it.ref for it in items]])


def test_broken_cifar_folder_is_named(tmp_path, cifar_exact):
    d = _cifar_python_folder(tmp_path, cifar_exact)
    (d / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(SourceError, match="cifar-10-batches-py"):
        open_source(d)
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08 truncated")
    with pytest.raises(SourceError, match="broken.tar.gz"):
        open_source(bad)


class _Payload:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_crafted_cifar_archive_never_runs_its_pickle(tmp_path, cifar_exact, monkeypatch):
    """A cifar-10-python.tar.gz whose data_batch_2 holds real pixels and a code-running object:
    refused by name, and the command never ran (an unrestricted unpickler runs it: the control)."""
    monkeypatch.setenv("ETC_DATA_CACHE", str(tmp_path / "cache"))
    folder = _cifar_python_folder(tmp_path / "raw", cifar_exact)
    rows = cifar_exact["x_train"][20:40].transpose(0, 3, 1, 2).reshape(20, -1)

    def evil_batch(marker):
        return pickle.dumps({"data": rows, "labels": [int(v) for v in cifar_exact["y_train"][20:40]],
                             "batch_label": _Payload(marker)})

    marker, control = tmp_path / "pwned", tmp_path / "control"
    (folder / "data_batch_2").write_bytes(evil_batch(marker))
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(folder, arcname="cifar-10-batches-py")
    with pytest.raises(SourceError, match=r"data_batch_2: refusing to load posix\.system"):
        open_source(tgz)
    assert not marker.exists()
    pickle.loads(evil_batch(control))
    assert control.exists()


def _imagenette_like(root, shared_dir, gray_one=True):
    """An ``imagenette2-160/{train,val}/<wnid>/*.JPEG`` tree of real Imagenette images, not all square."""
    from PIL import Image

    top = root / "imagenette2-160"
    with zipfile.ZipFile(shared_dir / "imagenette-224-subset.zip") as z:
        names = sorted(n for n in z.namelist() if n.endswith(".JPEG") and n.startswith("val/"))
        wnids = sorted({n.split("/")[1] for n in names})[:2]
        picked = [n for w in wnids for n in [m for m in names if m.split("/")[1] == w][:3]]
        for i, n in enumerate(picked):
            im = Image.open(io.BytesIO(z.read(n))).convert("RGB")
            if i % 2:
                im = im.resize((300, 224))  # a landscape image: shorter side 224
            if gray_one and i == 0:
                im = im.convert("L")
            split = "train" if i % 3 else "val"
            out = top / split / n.split("/")[1] / f"{i:03d}.JPEG"
            out.parent.mkdir(parents=True, exist_ok=True)
            im.save(out, quality=95)
    return top, wnids


def test_imagenette_layout_folder_and_tgz_with_resize_and_gray(tmp_path, shared_dir, monkeypatch):
    monkeypatch.setenv("ETC_DATA_CACHE", str(tmp_path / "cache"))
    top, wnids = _imagenette_like(tmp_path / "raw", shared_dir)
    tgz = tmp_path / "imagenette2-160.tgz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(top, arcname="imagenette2-160")
    for spec in (top, tgz):
        src = open_source(spec, resize=160)
        assert isinstance(src, FolderSource)
        assert src.splits == ["train", "val"] and src.classes == wnids
        assert src.resize_policy() == {"shorter_side": 160, "crop": "center", "size": [160, 160], "filter": "bicubic"}
        b = src.load(src.items("val") + src.items("train"))
        assert b.images.shape == (6, 160, 160, 3)
        # the grayscale image became RGB with equal channels
        gray_key = [k for k in b.keys if k.endswith("_000~JPEG")][0]
        g = b.images[b.keys.index(gray_key)].astype(int)
        assert np.abs(g[..., 0] - g[..., 1]).max() <= 2 and np.abs(g[..., 0] - g[..., 2]).max() <= 2
        assert all(k.split("_")[0] in ("train", "val") and "/" not in k for k in b.keys)
    # without a resize policy, images of different sizes in one batch are refused by name
    src = open_source(top)
    with pytest.raises(SourceError, match="choose a resize policy"):
        src.load(src.items("train"))


def test_resize_shorter_side_then_center_crop_is_the_crop_of_the_resized_image(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)
    out = resize_shorter_center_crop(img, 60)
    full = np.asarray(Image.fromarray(img).resize((100, 60), Image.BICUBIC))
    np.testing.assert_array_equal(out, full[:, 20:80])
    tall = resize_shorter_center_crop(img.transpose(1, 0, 2).copy(), 60)
    assert tall.shape == (60, 60, 3)
    np.testing.assert_array_equal(resize_shorter_center_crop(img[:60, :60], 60), img[:60, :60])
    np.savez(tmp_path / "a.npz", x_train=img[None, :60, :60], y_train=np.zeros(1))
    with pytest.raises(SourceError, match="resize"):
        open_source(tmp_path / "a.npz", resize=0)


def test_shared_cifar_zips_merge_into_train_and_test(shared_dir):
    src = open_source([shared_dir / "cifar10-train-jpeg.zip", shared_dir / "cifar10-test-jpeg.zip"])
    assert isinstance(src, MultiSource)
    assert src.splits == ["train", "test"] and src.classes == CIFAR10_CLASSES
    assert len(src.items("train")) == 50000 and len(src.items("test")) == 10000
    assert src.name == "cifar10"
    b = src.load(src.items("test")[:8] + src.items("test")[-8:])
    assert b.images.shape == (16, 32, 32, 3)
    assert b.labels[0] == 0 and b.labels[-1] == 9
    assert b.keys[0] == "test_airplane_0000"
    # the same split from two sources with the same keys is refused
    with pytest.raises(SourceError, match=r"test-jpeg.zip:test/airplane/0000.jpg and .*test-jpeg.zip:test/airplane/"
                                          r"0000.jpg both give sample key 'test_airplane_0000'"):
        open_source([shared_dir / "cifar10-test-jpeg.zip", shared_dir / "cifar10-test-jpeg.zip"]).items("test")


def test_an_opened_source_travels_to_workers_with_its_listing(shared_dir, tmp_path, cifar_exact):
    # what a worker process receives (pickled) is the planner's listing: same items in the same order,
    # same split tokens, the same pixels read; sources whose pixels are in memory are not sent
    import pickle

    src = open_source([shared_dir / "cifar10-train-jpeg.zip", shared_dir / "cifar10-test-jpeg.zip"])
    got = pickle.loads(pickle.dumps(src.for_workers()))
    for sp in ("train", "test"):
        assert got.items(sp) == src.items(sp) and got.split_token(sp) == src.split_token(sp)
    picked = src.items("train")[::9973] + src.items("test")[-3:]
    theirs = got.load([got.items(it.split)[src.items(it.split).index(it)] for it in picked])
    mine = src.load(picked)
    assert theirs.keys == mine.keys and (theirs.images == mine.images).all() and (theirs.labels == mine.labels).all()
    # the listing travels as columns: ~100 bytes per image here, not a pickled tuple per item
    assert len(pickle.dumps(src)) < 120 * 60000
    # a split that two parts share (merged, each item naming its part) travels the same way
    extra = make_image_zip(tmp_path / "more.zip", cifar_exact["x_test"][:30], cifar_exact["y_test"][:30], CIFAR10_CLASSES,
                           split="test")
    both = open_source([extra, shared_dir / "cifar10-test-jpeg.zip"])
    got = pickle.loads(pickle.dumps(both.for_workers()))
    assert len(both.items("test")) == 10030 and got.items("test") == both.items("test")
    assert got.split_token("test") == both.split_token("test")
    picked = both.items("test")[::337]
    assert {both.item_name(it).split(":")[0] for it in picked} == {str(extra), str(shared_dir / "cifar10-test-jpeg.zip")}
    assert [got.item_name(it) for it in picked] == [both.item_name(it) for it in picked]
    assert (got.load(picked).images == both.load(picked).images).all()
    npz = tmp_path / "cifar10-mini.npz"
    np.savez(npz, x_train=cifar_exact["x_test"][:40], y_train=cifar_exact["y_test"][:40])
    assert open_source(npz).for_workers() is None
    assert open_source([npz, shared_dir / "cifar10-test-jpeg.zip"]).for_workers() is None


def test_bad_images_are_named_or_skipped_and_listed(tmp_path, cifar_exact):
    p = make_image_zip(tmp_path / "c.zip", cifar_exact["x_train"][:6], cifar_exact["y_train"][:6], CIFAR10_CLASSES)
    with zipfile.ZipFile(p, "a") as z:
        z.writestr("train/cat/9999.png", b"\x89PNG\r\n\x1a\n garbage")
    src = open_source(p)
    with pytest.raises(SourceError, match=r"c\.zip:train/cat/9999\.png"):
        src.load(src.items("train"))
    b = src.load(src.items("train"), on_bad_image="skip")
    assert len(b.keys) == 6 and b.skipped == [f"{p}:train/cat/9999.png"]
    with pytest.raises(SourceError, match="on_bad_image"):
        src.load(src.items("train"), on_bad_image="ignore")


def test_missing_or_empty_sources_are_named(tmp_path):
    with pytest.raises(SourceError, match="nope.zip"):
        open_source(tmp_path / "nope.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        open_source(tmp_path / "empty")
    with pytest.raises(SourceError, match="imagenette size"):
        download_imagenette(tmp_path, size="999")


def _zip_records(path):
    with zipfile.ZipFile(path) as z:
        return {i.filename: (i.header_offset, i.compress_size, i.compress_type, i.CRC, i.flag_bits, i.file_size)
                for i in z.infolist()}


def test_zip_members_with_long_local_headers_or_a_cut_archive_read_right(tmp_path, shared_dir):
    # a member is read with one system call that guesses its local header's length; a longer one
    # (a 1,000-byte extra field, a long name) takes a second read, and a cut archive is named
    from etc_data.archives import ZipArchive

    with zipfile.ZipFile(shared_dir / "cifar10-test-jpeg.zip") as z:
        real = [z.read(n) for n in sorted(n for n in z.namelist() if n.endswith(".jpg"))[:3]]
    names = ["a.jpg", "b" * 200 + ".jpg", "c.jpg"]
    p = tmp_path / "long.zip"
    with zipfile.ZipFile(p, "w") as z:
        for i, (n, data) in enumerate(zip(names, real)):
            info = zipfile.ZipInfo(n)
            if i == 0:
                info.extra = b"\x99\x99" + (996).to_bytes(2, "little") + bytes(996)  # an unknown 1,000-byte field
            z.writestr(info, data, compress_type=zipfile.ZIP_STORED if i < 2 else zipfile.ZIP_DEFLATED)
    arc = ZipArchive(p)
    assert [arc.read(n) for n in names] == real
    cut = tmp_path / "cut.zip"
    whole = p.read_bytes()
    offset = arc._info(names[1])[0]
    cut.write_bytes(whole[:offset + 30 + 204 + 100])  # the second member's data ends early
    arc2 = ZipArchive.__new__(ZipArchive)
    arc2.__dict__.update(arc.__getstate__())
    arc2.path = cut
    with pytest.raises(SourceError, match=r"cut.zip:b+\.jpg"):
        arc2.read(names[1])


def test_fast_zip_directory_matches_zipfile_and_falls_back(tmp_path, shared_dir, cifar_exact):
    from etc_data.archives import read_zip_directory as _zip_directory

    for name in ("cifar10-test-jpeg.zip", "imagenette-224-subset.zip"):
        assert _zip_directory(shared_dir / name) == _zip_records(shared_dir / name)
    x, y = cifar_exact["x_test"][:6], cifar_exact["y_test"][:6]
    plain = make_image_zip(tmp_path / "plain.zip", x, y, CIFAR10_CLASSES)
    # a zip behind other bytes (a self-extracting archive) and a zip64 archive: zipfile reads them
    pre = tmp_path / "prefixed.zip"
    pre.write_bytes(b"#!/bin/sh\nexit 0\n" + plain.read_bytes())
    z64 = tmp_path / "z64.zip"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(z64, "w") as dst:
        for info in src.infolist():
            with src.open(info) as r, dst.open(info.filename, "w", force_zip64=True) as w:
                w.write(r.read())
    assert _zip_directory(pre) is None
    # zip64 extras in the local headers only (small sizes, a plain central directory): the fast path applies
    assert _zip_directory(z64) == _zip_records(z64)
    for path in (plain, pre, z64):
        src = FolderSource(path)
        b = src.load(src.items("train"))
        order = [int(k.removesuffix("~png").rsplit("_", 1)[1]) for k in b.keys]  # keys end in the image's index
        assert sorted(order) == list(range(6)) and np.array_equal(b.images, x[order])  # PNG: exact pixels
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SourceError, match="bad.zip is not a readable .zip"):
        FolderSource(bad)


def test_archive_extracted_once_when_processes_open_it_together(tmp_path, cifar_exact):
    """The planner and every pool worker open a .tar.gz source at the same moment on a fresh
    machine; they must not extract over each other."""
    import os
    import subprocess
    import sys

    folder = _cifar_python_folder(tmp_path / "raw", cifar_exact, per_batch=400, n_test=400)
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(folder, arcname="cifar-10-batches-py")
    code = ("import sys, hashlib\nfrom etc_data.sources import open_source\ns = open_source(sys.argv[1])\n"
            "b = s.load(s.items('train')[:50] + s.items('test')[-50:])\n"
            "print(len(s.items('train')), len(s.items('test')), hashlib.sha256(b.images.tobytes()).hexdigest())")
    env = dict(os.environ, ETC_DATA_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tgz)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    lines = {o.strip() for o, _ in outs}
    assert len(lines) == 1 and lines.pop().startswith("2000 400 ")
    extracted = [p for p in (tmp_path / "cache" / "extracted").iterdir() if p.is_dir()]
    assert len(extracted) == 1 and not any(p.name.endswith(".part") for p in extracted)


def test_folder_keys_made_once_per_class_folder_equal_sample_key(shared_dir):
    # the listing's fast path (split and class checked once per folder) gives exactly sample_key's
    # keys, on the real names and on names that need the hashed form
    from etc_data.sources import _file_key, _folder_keys, sample_key

    names = []
    for zp in ("imagenette-224-subset.zip", "cifar10-test-jpeg.zip"):
        with zipfile.ZipFile(shared_dir / zp) as z:
            names += [n.split("/")[-3:] for n in z.namelist() if not n.endswith("/")][:3000]
    names += [["train", "cat", "a b.jpg"], ["train", "c_t", "x.jpg"], ["val", "dog", "x.y.png"],
              ["train", "dog", "x.JPEG"], ["train", "dog", "x"], ["train", "dög", "x.jpg"], ["train", "dog", "x.jpeg~"]]
    for split, cls, rest in names:
        stem, ext = os.path.splitext(rest)
        assert _file_key(split, cls, rest) == sample_key(split, cls, stem, ext=ext), (split, cls, rest)
    # a whole folder's keys at once: the all-plain-.jpg fast path and every way out of it
    folders: dict[tuple[str, str], list[str]] = {}
    for split, cls, rest in names:
        folders.setdefault((split, cls), []).append(rest)
    folders[("train", "cat")] = ["0001.jpg", "b-2_x.jpg"]
    for odd in ("a b.jpg", "x.JPG", "x.png", "x", ".jpg", "a.b.jpg", "x.jpg\ny.jpg", "x.jpg\n", "sub/x.jpg", "x.jpgz"):
        folders[("train", f"k{len(folders)}")] = ["0001.jpg", odd, "0002.jpg"]
    folders[("train", "c_t")] = ["0001.jpg"]  # a class name that is not plain
    for (split, cls), rests in folders.items():
        want = [sample_key(split, cls, os.path.splitext(r)[0], ext=os.path.splitext(r)[1]) for r in rests]
        assert _folder_keys(split, cls, rests) == want, rests


def test_jpeg_decoded_into_a_batch_slot_only_when_it_is_that_size(shared_dir):
    # a batch's images are decoded straight into their slot; a JPEG of another size is left to the
    # caller (False), one too large for the slot without writing into it
    import simplejpeg

    from etc_data.images import decode_jpeg_into

    with zipfile.ZipFile(shared_dir / "cifar10-test-jpeg.zip") as z:
        data = z.read("test/cat/0000.jpg")
    want = simplejpeg.decode_jpeg(data, colorspace="rgb")
    slot = np.zeros((32, 32, 3), np.uint8)
    assert decode_jpeg_into(data, slot, "cat/0000.jpg") and (slot == want).all()
    small = np.full((16, 16, 3), 7, np.uint8)
    assert not decode_jpeg_into(data, small, "cat/0000.jpg") and (small == 7).all()
    assert not decode_jpeg_into(data, np.zeros((40, 40, 3), np.uint8), "cat/0000.jpg")
    assert not decode_jpeg_into(b"\x89PNG\r\n\x1a\n", slot, "x.png")
    assert not decode_jpeg_into(data, np.zeros((32, 64, 3), np.uint8)[:, ::2], "cat/0000.jpg")  # not contiguous
