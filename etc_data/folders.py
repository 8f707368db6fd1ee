"""The folder jobs: every image of a folder or ``.zip`` encrypted (or decrypted) into a folder of
lossless PNGs, relative paths kept.

    from etc_data import FolderConfig, encrypt_folder, decrypt_folder
    n = encrypt_folder(FolderConfig(src="photos/", dst="enc/", dataset="photos", key_ref="owner.key"))
    decrypt_folder(FolderConfig(src="enc/", dst="back/", dataset="photos", key_ref="owner.key"))

Images are grouped by size so that each batch is one array (one gather + one XOR per batch). A
PNG is written under a temporary name and renamed, so a half-written file never carries the final
name. A weak configuration (key space below 128 bits) is warned about with ``WeakKeyWarning``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .schemes import make_scheme


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


def _write_png(img: np.ndarray, path: Path) -> None:
    """Write atomically: a half-written file never carries the final name."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    try:
        Image.fromarray(img).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _run(direction: str, cfg: FolderConfig, progress: Callable[[int, int], None] | None) -> int:
    import warnings

    from .images import decode_image
    from .keys import load_key
    from .schemes import WeakKeyWarning
    from .sources import FolderSource

    key = load_key(cfg.key_ref)
    scheme = make_scheme(cfg.scheme, key=key, dataset=cfg.dataset, block_size=cfg.block_size, pad=cfg.pad)
    source = FolderSource(cfg.src)
    total = sum(len(source.items(s)) for s in source.splits)
    if progress:
        progress(0, total)
    dst = Path(cfg.dst)
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
        for (rel, _), img in zip(group, y):
            _write_png(img, dst / (os.path.splitext(rel)[0] + ".png"))
        done += len(group)
        if progress:
            progress(done, total)

    for split in source.splits:
        for it in source.items(split):
            name = source.item_name(it)
            img = decode_image(source.read_bytes(it), name)
            scheme.padded_size(img.shape[0], img.shape[1], item=name)  # the error names the image
            groups[img.shape].append((str(it.ref), img))
            if len(groups[img.shape]) >= cfg.batch:
                flush(img.shape)
    for shape in list(groups):
        flush(shape)
    return done


def encrypt_folder(cfg: FolderConfig, progress: Callable[[int, int], None] | None = None) -> int:
    """Encrypt every image of ``cfg.src`` into PNGs under ``cfg.dst``; returns how many.
    ``progress(done, total)`` is called once the source is open and after every batch."""
    return _run("encrypt", cfg, progress)


def decrypt_folder(cfg: FolderConfig, progress: Callable[[int, int], None] | None = None) -> int:
    """Decrypt every image of ``cfg.src`` (PNGs written by ``encrypt_folder``) into ``cfg.dst``."""
    return _run("decrypt", cfg, progress)
