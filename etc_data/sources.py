"""Image sources: where plain images come from, as numpy batches with stable sample keys.

A source has splits (``train``/``test`` or ``train``/``val``), a label map (class names in label
order) and, per split, a sorted list of items. Each item has a stable sample key derived from
where it comes from (path or index), never from its pixels, so re-running over a source that
gained images finds the ones already done.

Supported here:
- ``.npz`` with ``x_<split>`` (N, H, W, 3 or N, H, W) uint8 and ``y_<split>`` arrays (e.g. the
  exact-pixel CIFAR-10 subset);
- an image folder or ``.zip`` laid out ``<split>/<class>/<file>`` (or ``<class>/<file>`` for a
  single split named ``train``).
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import EtcError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLIT_NAMES = ("train", "test", "val", "valid", "validation")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BAD_IMAGE_POLICIES = ("stop", "skip")


class SourceError(EtcError):
    """A source or one of its images cannot be read (message names the file)."""


@dataclass(frozen=True)
class Item:
    key: str      # stable sample key, e.g. "train/airplane/0001"
    label: int
    ref: object   # where the pixels are: a path, a name inside a zip, or an array index


@dataclass
class Batch:
    keys: list[str]
    images: np.ndarray   # (N, H, W, 3) uint8
    labels: np.ndarray   # (N,) int64
    skipped: list[str] = field(default_factory=list)  # names of unreadable images skipped


def sample_key(*parts: str) -> str:
    """A WebDataset-safe key: '/'-joined parts with dots and odd characters replaced."""
    return "/".join(re.sub(r"[^A-Za-z0-9_\-]", "_", p) for p in parts if p != "")


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode image bytes to (H, W, 3) uint8; grayscale/palette/alpha become RGB explicitly."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SourceError(f"cannot decode image {name}: {e}") from None


class Source:
    """Base class. Subclasses set name/description/classes and implement ``_items`` and ``_read``."""

    name: str = "source"
    description: str = ""
    classes: list[str]

    def __init__(self):
        self._cache: dict[str, list[Item]] = {}

    @property
    def splits(self) -> list[str]:
        raise NotImplementedError

    def items(self, split: str) -> list[Item]:
        if split not in self.splits:
            raise SourceError(f"source {self.name} has no split {split!r}; it has: {', '.join(self.splits)}")
        if split not in self._cache:
            self._cache[split] = sorted(self._items(split), key=lambda it: it.key)
        return self._cache[split]

    def _items(self, split: str) -> list[Item]:
        raise NotImplementedError

    def _read(self, item: Item) -> np.ndarray:
        raise NotImplementedError

    def item_name(self, item: Item) -> str:
        return f"{self.name}:{item.key}"

    def load(self, items: list[Item], on_bad_image: str = "stop") -> Batch:
        """Read items into one batch. All images must have the same size (resize upstream)."""
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise SourceError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
        imgs, keys, labels, skipped = [], [], [], []
        for it in items:
            try:
                img = self._read(it)
            except SourceError:
                if on_bad_image == "skip":
                    skipped.append(self.item_name(it))
                    continue
                raise
            if imgs and img.shape != imgs[0].shape:
                raise SourceError(f"image {self.item_name(it)} is {img.shape[1]}x{img.shape[0]}, others in its "
                                  f"batch are {imgs[0].shape[1]}x{imgs[0].shape[0]}; choose a resize policy")
            imgs.append(img)
            keys.append(it.key)
            labels.append(it.label)
        arr = np.stack(imgs) if imgs else np.zeros((0, 0, 0, 3), np.uint8)
        return Batch(keys, arr, np.asarray(labels, dtype=np.int64), skipped)

    def batches(self, split: str, batch_size: int = 1024, limit: int | None = None,
                on_bad_image: str = "stop") -> Iterator[Batch]:
        items = self.items(split)[: limit if limit is not None else None]
        for i in range(0, len(items), batch_size):
            yield self.load(items[i:i + batch_size], on_bad_image)


class NpzSource(Source):
    def __init__(self, path: str | os.PathLike, classes: list[str] | None = None):
        super().__init__()
        self.path = Path(path)
        try:
            self._npz = np.load(self.path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise SourceError(f"cannot read {self.path}: {e}") from None
        self._splits = sorted(k[2:] for k in self._npz.files if k.startswith("x_") and f"y_{k[2:]}" in self._npz.files)
        if not self._splits:
            raise SourceError(f"{self.path}: no x_<split>/y_<split> array pairs found (has: {', '.join(self._npz.files)})")
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.name = self.path.stem
        nlab = int(max(int(self._y(s).max()) for s in self._splits)) + 1
        if classes is None:
            classes = CIFAR10_CLASSES if ("cifar10" in self.name.lower() and nlab <= 10) else [str(i) for i in range(nlab)]
        self.classes = list(classes)
        self.description = f"npz file {self.path.name} ({', '.join(f'{s}: {len(self._y(s))}' for s in self._splits)})"

    def _x(self, split):
        if split not in self._arrays:
            x, y = self._npz[f"x_{split}"], self._npz[f"y_{split}"].astype(np.int64).reshape(-1)
            if x.dtype != np.uint8 or x.ndim not in (3, 4) or len(x) != len(y):
                raise SourceError(f"{self.path}: x_{split} must be uint8 (N,H,W[,3]) matching y_{split}")
            self._arrays[split] = (x, y)
        return self._arrays[split][0]

    def _y(self, split):
        return self._npz[f"y_{split}"].reshape(-1) if split not in self._arrays else self._arrays[split][1]

    @property
    def splits(self):
        return self._splits

    def _items(self, split):
        self._x(split)
        y = self._arrays[split][1]
        return [Item(sample_key(split, f"{i:06d}"), int(y[i]), i) for i in range(len(y))]

    def _read(self, item):
        split = item.key.split("/", 1)[0]
        img = self._x(split)[item.ref]
        return np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img

    def load(self, items, on_bad_image="stop"):
        if not items:
            return super().load(items, on_bad_image)
        split = items[0].key.split("/", 1)[0]
        x = self._x(split)
        idx = np.asarray([it.ref for it in items])
        imgs = x[idx]
        if imgs.ndim == 3:
            imgs = np.repeat(imgs[..., None], 3, -1)
        return Batch([it.key for it in items], np.ascontiguousarray(imgs),
                     np.asarray([it.label for it in items], np.int64))


class FolderSource(Source):
    """``<split>/<class>/<file>`` or ``<class>/<file>`` in a directory or a .zip file."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        if self.path.is_file():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile:
                raise SourceError(f"{self.path} is not a readable .zip file") from None
            names = [n for n in self._zip.namelist() if not n.endswith("/")]
        elif self.path.is_dir():
            names = [str(p.relative_to(self.path)).replace(os.sep, "/") for p in self.path.rglob("*") if p.is_file()]
        else:
            raise SourceError(f"source {self.path} does not exist")
        names = sorted(n for n in names if n.lower().endswith(IMAGE_EXTS) and "__MACOSX" not in n)
        if not names:
            raise SourceError(f"source {self.path}: no images found (extensions: {', '.join(IMAGE_EXTS)})")
        parts = [n.split("/") for n in names]
        # drop a common leading folder such as "imagenette2-160/" or a zip's single top dir
        while len({p[0] for p in parts}) == 1 and min(len(p) for p in parts) > 2:
            parts = [p[1:] for p in parts]
        self._names = dict(zip(("/".join(p) for p in parts), names))
        has_splits = all(len(p) >= 3 for p in parts) and {p[0] for p in parts} <= set(SPLIT_NAMES)
        by_split: dict[str, list[tuple[str, str]]] = {}
        for p in parts:
            if has_splits:
                split, cls, rest = p[0], p[1], "/".join(p[2:])
            elif len(p) >= 2:
                split, cls, rest = "train", p[0], "/".join(p[1:])
            else:
                raise SourceError(f"source {self.path}: image {'/'.join(p)} is not inside a class folder")
            by_split.setdefault(split, []).append((cls, rest))
        self.classes = sorted({c for v in by_split.values() for c, _ in v})
        cidx = {c: i for i, c in enumerate(self.classes)}
        self._by_split = {
            s: [Item(sample_key(s, c, os.path.splitext(r)[0]), cidx[c], self._names["/".join(
                ([s] if has_splits else []) + [c, r])]) for c, r in v]
            for s, v in by_split.items()}
        self.name = self.path.stem
        kind = "zip" if self._zip else "folder"
        self.description = f"image {kind} {self.path.name} ({', '.join(f'{s}: {len(v)}' for s, v in sorted(self._by_split.items()))})"

    @property
    def splits(self):
        return sorted(self._by_split, key=lambda s: (SPLIT_NAMES.index(s) if s in SPLIT_NAMES else 99, s))

    def _items(self, split):
        return self._by_split[split]

    def item_name(self, item):
        return f"{self.path}/{item.ref}" if not self._zip else f"{self.path}:{item.ref}"

    def read_bytes(self, item: Item) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(item.ref)
            return (self.path / item.ref).read_bytes()
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise SourceError(f"cannot read {self.item_name(item)}: {e}") from None

    def _read(self, item):
        return decode_image(self.read_bytes(item), self.item_name(item))


def open_source(spec: str | os.PathLike, **kwargs) -> Source:
    """Open a source from a path: ``.npz``, image folder or ``.zip`` with class folders."""
    p = Path(spec)
    if not p.exists():
        raise SourceError(f"source {spec} does not exist")
    if p.suffix.lower() == ".npz":
        return NpzSource(p, **kwargs)
    return FolderSource(p, **kwargs)
