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
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from .errors import EtcError, SourceError
from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageLimits
from .schemes import make_scheme


class FolderError(EtcError):
    """An output path would leave the destination folder, or two inputs would share one output."""


@dataclass
class FolderConfig:
    src: str                       # a folder or .zip of images (class folders are not required)
    dst: str                       # the output folder
    dataset: str                   # dataset id (selects the per-dataset subkey)
    key_ref: str | None = None     # key file, env:NAME; None = $ETC_DATA_KEY
    scheme: str = "etc"
    block_size: int | None = None
    pad: str = "error"
    batch: int = 256               # images per array
    on_bad_image: str = "stop"     # "skip": leave unreadable images out (reported through on_skip)
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_BYTES


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
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
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

    if cfg.on_bad_image not in BAD_IMAGE_POLICIES:
        raise FolderError(f"on-bad-image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {cfg.on_bad_image!r}")
    limits = ImageLimits(cfg.max_image_pixels, cfg.max_image_bytes)
    key = load_key(cfg.key_ref)
    scheme = make_scheme(cfg.scheme, key=key, dataset=cfg.dataset, block_size=cfg.block_size, pad=cfg.pad)
    source = FolderSource(cfg.src, limits)
    items = [it for s in source.splits for it in source.items(s)]
    dst = Path(cfg.dst)
    outputs = output_paths(dst, {str(it.ref): source.item_name(it) for it in items})
    destination = _Destination(dst)
    total = len(items)
    if progress:
        progress(0, total)
    groups: dict[tuple, list] = defaultdict(list)
    warned: set[tuple] = set()
    done = 0

    def flush(shape):
        nonlocal done
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
