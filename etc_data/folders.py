"""The folder jobs: every image of a folder or ``.zip`` encrypted (or decrypted) into a folder of
lossless PNGs, relative paths kept.

    from etc_data import FolderConfig, encrypt_folder, decrypt_folder
    n = encrypt_folder(FolderConfig(src="photos/", dst="enc/", dataset="photos", key_ref="owner.key"))
    decrypt_folder(FolderConfig(src="enc/", dst="back/", dataset="photos", key_ref="owner.key"))

Images are grouped by size so that each batch is one array (one gather + one XOR per batch). A
PNG is written under a new temporary name (``storage.atomic_local_file``: random, created with
``O_EXCL``, never through a symlink) and renamed, so a half-written file never carries the final
name. Nothing is written outside ``dst``: before any image is read, every output path is checked
(a zip member named ``../x.jpg`` or ``/tmp/x.jpg`` is refused, naming it), and so is every output
folder's real path (a symlink inside ``dst`` pointing elsewhere is refused). Two sources that would
give one output file (``x.jpg`` and ``x.png``) are an error naming both. Unreadable images, bombs
included, stop the job naming the file, or are skipped and reported (``on_bad_image="skip"``). A
weak configuration (key space below 128 bits) is warned about with ``WeakKeyWarning``.

An encrypted folder carries its parameters: ``encrypt_folder`` first writes ``etc-data-folder.json``
beside the PNGs (scheme, options, block size, pad, dataset id, key fingerprint and the owner's
public key; nothing secret). ``decrypt_folder`` takes its settings from that file, refuses settings
given that disagree with it, and refuses a key other than the one the folder was encrypted with,
instead of writing garbage. Encrypting into a folder that already holds another key's or another
setting's images is refused too.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from .errors import EtcError, SourceError
from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageLimits
from .schemes import make_scheme, scheme_from_params

SIDECAR = "etc-data-folder.json"
SIDECAR_FORMAT = "etc-data-folder/1"


class FolderError(EtcError):
    """An output path would leave the destination folder, two inputs would share one output, or an
    encrypted folder's parameters are missing or disagree with the key or settings given."""


@dataclass
class FolderConfig:
    src: str                       # a folder or .zip of images (class folders are not required)
    dst: str                       # the output folder
    dataset: str = ""              # dataset id (selects the per-dataset subkey); decrypt: from the sidecar
    key_ref: str | None = None     # key file, env:NAME; None = $ETC_DATA_KEY
    scheme: str | None = None      # encrypt: default etc; decrypt: from the sidecar (checked when given)
    block_size: int | None = None  # scheme default; decrypt: from the sidecar (checked when given)
    pad: str | None = None         # encrypt: default error; decrypt: from the sidecar (checked when given)
    batch: int = 256               # images per array
    on_bad_image: str = "stop"     # "skip": leave unreadable images out (reported through on_skip)
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_BYTES


def _sidecar(scheme, dataset: str, key) -> dict:
    return {"format": SIDECAR_FORMAT, "dataset": dataset, **scheme.params(),
            "key_fingerprint": key.fingerprint if scheme.keyed else None, "public_key": key.public_key}


def read_sidecar(src: str) -> dict:
    """The parameters an encrypted folder (or a .zip of one) carries; a clear error without them."""
    path = Path(src)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                found = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == SIDECAR]
                if len(found) != 1:
                    raise FolderError(f"{src}: holds {len(found)} {SIDECAR} files, not one; refused")
                doc = json.loads(z.read(found[0]))
        else:
            doc = json.loads((path / SIDECAR).read_text())
    except FileNotFoundError:
        raise FolderError(f"{src}: no {SIDECAR}: not a folder written by etc-data encrypt (that file records the "
                          f"scheme, block size, dataset and key fingerprint); refused") from None
    except (OSError, ValueError) as e:
        raise FolderError(f"{src}: {SIDECAR} is unreadable ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != SIDECAR_FORMAT:
        raise FolderError(f"{src}: {SIDECAR} is not an etc-data folder record ({SIDECAR_FORMAT})")
    return doc


def _decrypt_scheme(cfg: FolderConfig, key):
    """The scheme recorded beside the encrypted images, after refusing another key or other settings."""
    doc = read_sidecar(cfg.src)
    if doc.get("public_key") != key.public_key:
        raise FolderError(f"{cfg.src} was encrypted under key fingerprint {doc.get('key_fingerprint')} (owner "
                          f"{doc.get('public_key')}), not with this key ({key.fingerprint}); refused instead of "
                          f"writing garbage")
    given = {"dataset": cfg.dataset or None, "block_size": cfg.block_size, "pad": cfg.pad}
    if cfg.scheme is not None:
        s = make_scheme(cfg.scheme, subkey=b"\0" * 32, block_size=cfg.block_size or doc.get("block_size"))
        given.update(scheme=s.name, options=s.options)
    diff = [f"{k}: folder has {doc.get(k)!r}, given {v!r}" for k, v in given.items()
            if v is not None and v != doc.get(k)]
    if diff:
        raise FolderError(f"{cfg.src}: settings disagree with its {SIDECAR} ({'; '.join(diff)}); refused")
    return scheme_from_params(doc, key=key, dataset=doc.get("dataset"))


def _encrypt_scheme(cfg: FolderConfig, key):
    """(scheme to encrypt with, its record to write into ``dst`` before the first image, or None
    when ``dst`` already holds the same record); another record there is refused."""
    scheme = make_scheme(cfg.scheme or "etc", key=key, dataset=cfg.dataset, block_size=cfg.block_size,
                         pad=cfg.pad or "error")
    doc = _sidecar(scheme, cfg.dataset, key)
    if not (Path(cfg.dst) / SIDECAR).exists():
        return scheme, doc
    old = read_sidecar(cfg.dst)
    if old != doc:
        diff = ", ".join(k for k in doc if doc[k] != old.get(k))
        raise FolderError(f"{cfg.dst} already holds images encrypted with other settings ({diff}); "
                          f"encrypt into another folder")
    return scheme, None


def _write_png(img: np.ndarray, path: Path) -> None:
    """Write atomically: a half-written file never carries the final name."""
    from PIL import Image

    from .storage import atomic_local_file

    with atomic_local_file(path) as f:
        Image.fromarray(img).save(f, format="PNG")


def output_paths(dst: Path, refs: dict[str, str]) -> dict[str, Path]:
    """The output PNG of every input (``{relative ref: display name}``), checked before anything
    is written: inside ``dst`` and one input per output."""
    out: dict[str, Path] = {}
    owner: dict[Path, str] = {}
    for ref, name in refs.items():
        rel = PurePosixPath(ref)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or ":" in rel.parts[0]:
            raise FolderError(f"{name}: its path would be written outside {dst}; refusing it (rename it inside the "
                              f"archive or folder)")
        path = dst.joinpath(*rel.parts).with_name(os.path.splitext(rel.name)[0] + ".png")
        other = owner.setdefault(path, name)
        if other != name:
            raise FolderError(f"{other} and {name} would both be written to {path}; rename one of them")
        out[ref] = path
    return out


class _Destination:
    """Output folders, created on first use, each checked to resolve inside ``dst`` (a symlink
    planted in the destination is not followed out of it)."""

    def __init__(self, dst: Path):
        dst.mkdir(parents=True, exist_ok=True)
        self.dst = dst
        self.real = os.path.realpath(dst)
        self._ok: set[Path] = set()

    def folder(self, path: Path) -> None:
        parent = path.parent
        if parent in self._ok:
            return
        self._check(parent)  # before creating anything through a link...
        parent.mkdir(parents=True, exist_ok=True)
        self._check(parent)  # ...and after, in case one appeared meanwhile
        self._ok.add(parent)

    def _check(self, folder: Path) -> None:
        real = os.path.realpath(folder)
        if os.path.commonpath([real, self.real]) != self.real:
            raise FolderError(f"{folder} resolves to {real}, outside {self.dst} (a symlink in the destination); "
                              f"refusing to write there")


def _run(direction: str, cfg: FolderConfig, progress: Callable[[int, int], None] | None,
         on_skip: Callable[[str, str], None] | None) -> int:
    import warnings

    from .images import decode_image
    from .keys import load_key
    from .schemes import WeakKeyWarning
    from .sources import BAD_IMAGE_POLICIES, FolderSource
    from .storage import write_bytes

    if cfg.on_bad_image not in BAD_IMAGE_POLICIES:
        raise FolderError(f"on-bad-image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {cfg.on_bad_image!r}")
    limits = ImageLimits(cfg.max_image_pixels, cfg.max_image_bytes)
    key = load_key(cfg.key_ref)
    source = FolderSource(cfg.src, limits)
    items = [it for s in source.splits for it in source.items(s)]
    dst = Path(cfg.dst)
    outputs = output_paths(dst, {str(it.ref): source.item_name(it) for it in items})  # before anything is written
    record = None
    if direction == "encrypt":
        scheme, record = _encrypt_scheme(cfg, key)
    else:
        scheme = _decrypt_scheme(cfg, key)
    destination = _Destination(dst)
    total = len(items)
    if progress:
        progress(0, total)
    groups: dict[tuple, list] = defaultdict(list)
    warned: set[tuple] = set()
    done = 0

    def flush(shape):
        nonlocal done, record
        if record is not None:  # the folder's parameters go in before its first image
            write_bytes(str(dst / SIDECAR), (json.dumps(record, indent=1) + "\n").encode())
            record = None
        group = groups.pop(shape)
        x = np.stack([g[1] for g in group])
        if direction == "encrypt" and shape not in warned:
            warned.add(shape)
            with warnings.catch_warnings():
                warnings.simplefilter("always", WeakKeyWarning)
                scheme.warn_if_weak(shape[0], shape[1])
        y = scheme.encrypt(x) if direction == "encrypt" else scheme.decrypt(x)
        for (path, _), img in zip(group, y):
            destination.folder(path)
            _write_png(img, path)
        done += len(group)
        if progress:
            progress(done, total)

    for it in items:
        name = source.item_name(it)
        try:
            img = decode_image(source.read_bytes(it), name, limits)
        except SourceError as e:
            if cfg.on_bad_image != "skip":
                raise
            if on_skip:
                on_skip(name, str(e))
            continue
        scheme.padded_size(img.shape[0], img.shape[1], item=name)  # the error names the image
        groups[img.shape].append((outputs[str(it.ref)], img))
        if len(groups[img.shape]) >= cfg.batch:
            flush(img.shape)
    for shape in list(groups):
        flush(shape)
    return done


def encrypt_folder(cfg: FolderConfig, progress: Callable[[int, int], None] | None = None,
                   on_skip: Callable[[str, str], None] | None = None) -> int:
    """Encrypt every image of ``cfg.src`` into PNGs under ``cfg.dst``; returns how many.
    ``progress(done, total)`` is called once the source is open and after every batch;
    ``on_skip(name, reason)`` for every image skipped with ``on_bad_image="skip"``."""
    return _run("encrypt", cfg, progress, on_skip)


def decrypt_folder(cfg: FolderConfig, progress: Callable[[int, int], None] | None = None,
                   on_skip: Callable[[str, str], None] | None = None) -> int:
    """Decrypt every image of ``cfg.src`` (PNGs written by ``encrypt_folder``) into ``cfg.dst``."""
    return _run("decrypt", cfg, progress, on_skip)
