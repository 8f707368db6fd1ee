"""The folder jobs: every image of a folder or ``.zip`` encrypted (or decrypted) into a folder of
lossless PNGs, relative paths kept.

    from etc_data import FolderConfig, encrypt_folder, decrypt_folder
    n = encrypt_folder(FolderConfig(src="photos/", dst="enc/", dataset="photos", key_ref="owner.key"))
    decrypt_folder(FolderConfig(src="enc/", dst="back/", dataset="photos", key_ref="owner.key"))

Images are grouped by size so that each batch is one array (one gather + one XOR per batch). A
PNG is written under a temporary name and renamed, so a half-written file never carries the final
name. A weak configuration (key space below 128 bits) is warned about with ``WeakKeyWarning``.

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
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import EtcError
from .schemes import make_scheme, scheme_from_params

SIDECAR = "etc-data-folder.json"
SIDECAR_FORMAT = "etc-data-folder/1"


class FolderError(EtcError):
    """An encrypted folder's parameters are missing or disagree with the key or settings given."""


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


def _inside(dst: Path, rel: str) -> Path:
    """``dst/rel``, refused when ``rel`` (a member name of a received .zip) would leave ``dst``."""
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith("/") or ".." in parts or ":" in parts[0]:
        raise FolderError(f"image {rel!r} would be written outside {dst}; refused")
    return dst / rel


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
    from .storage import write_bytes

    key = load_key(cfg.key_ref)
    source = FolderSource(cfg.src)
    dst = Path(cfg.dst)
    for split in source.splits:  # before anything is written
        for it in source.items(split):
            _inside(dst, str(it.ref))
    record = None
    if direction == "encrypt":
        scheme, record = _encrypt_scheme(cfg, key)
    else:
        scheme = _decrypt_scheme(cfg, key)
    total = sum(len(source.items(s)) for s in source.splits)
    if progress:
        progress(0, total)
    groups: dict[tuple, list] = defaultdict(list)
    warned: set[tuple] = set()
    done = 0

    def flush(shape):
        nonlocal done, record
        if record is not None:  # the folder's parameters go in before its first image
            dst.mkdir(parents=True, exist_ok=True)
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
