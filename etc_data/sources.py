"""Image sources: where plain images come from, as numpy batches with stable sample keys.

A source has splits (``train``/``test`` or ``train``/``val``), a label map (class names in label
order) and, per split, a sorted list of items. Each item knows its split and has a stable sample
key derived from where it comes from (path or index), never from its pixels, so re-running over
a source that gained images finds the ones already done.

Sample keys (``sample_key``, the one place they are made) are readable, stable, unique per source
file and unique as basenames: ``<split>_<class>_<stem>`` (``train_airplane_0000`` for
``train/airplane/0000.jpg``; ``<split>_<index>`` for arrays), with no ``/`` and no ``.``, so that
tools that key samples by basename cannot merge two classes. Only letters, digits, ``-`` and ``_``
are kept; when that loses anything (other characters, a ``_`` inside a split or class name, a
nested path) the key ends in ``~`` and 8 hex digits of a SHA-256 of the source path, and a file
other than ``.jpg`` carries its extension (``~png``), so ``猫.jpg``/``犬.jpg``, ``a.b.jpg``/``a_b.jpg``
and ``x.jpg``/``x.png`` get distinct keys. Two source files with one key are an error naming both.

Folders: symlinks, to files or folders, are followed when they resolve inside the source folder
(a class folder linked to another one is read under both names); one that points outside it, and
a symlink loop, are errors naming the link.

Supported here (``open_source`` picks one from the path):
- ``.npz`` with ``x_<split>`` (N, H, W, 3 or N, H, W) uint8 and ``y_<split>`` arrays (e.g. the
  exact-pixel CIFAR-10 subset);
- an image folder, ``.zip`` or ``.tar``/``.tgz`` laid out ``<split>/<class>/<file>`` (or
  ``<class>/<file>`` for a single split named ``train``), e.g. Imagenette;
- CIFAR-10's official python folder or ``.tar.gz`` (batches read with a restricted unpickler);
- several of those merged into one source.

Decoding and resizing live in ``images``, zip and tar reading in ``archives``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import zipfile
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from .archives import ZipArchive, extract_archive
from .errors import SourceError
from .images import DEFAULT_LIMITS, IMAGE_EXTS, ImageLimits, decode_image, decode_jpeg_into, resize_shorter_center_crop

__all__ = ["Batch", "CifarSource", "FolderSource", "Item", "MultiSource", "NpzSource", "Source", "SourceError",
           "open_source", "sample_key", "CIFAR10_CLASSES"]

SPLIT_NAMES = ("train", "test", "val", "valid", "validation")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BAD_IMAGE_POLICIES = ("stop", "skip")


class Item(NamedTuple):
    """One image of a split (a named tuple: made 1.28 M times for ImageNet, ~6x faster than a frozen dataclass)."""

    split: str    # the split the item belongs to, e.g. "train"
    key: str      # stable sample key, e.g. "train_airplane_0001"
    label: int
    ref: object   # where the pixels are: a path, a name inside a zip, or an array index


@dataclass
class Batch:
    keys: list[str]
    images: np.ndarray   # (N, H, W, 3) uint8
    labels: np.ndarray   # (N,) int64
    skipped: list[str] = field(default_factory=list)  # names of unreadable images skipped


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9-]+\Z").match    # a split or class name kept as it is ("_" joins parts)
_PLAIN_STEM = re.compile(r"[A-Za-z0-9_-]+\Z").match   # a file stem kept as it is
_PLAIN_EXT = re.compile(r"\.[A-Za-z0-9]{1,5}\Z").match
BARE_EXT = ".jpg"  # the one extension a key leaves out (CIFAR-10's python batches match the JPEG copies)
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z").match  # a split becomes a folder and shard names


def _key_part(p: str) -> str:
    return _UNSAFE.sub("_", p) or "_"


def sample_key(*parts: str, ext: str = "") -> str:
    """The key of the sample at ``parts`` (split, [class,] stem or index) from a file with extension
    ``ext`` ("" for arrays): readable, no ``/`` or ``.``, and unique per (parts, ext) (see the module
    docstring): ``sample_key("train", "cat", "0001", ext=".jpg") == "train_cat_0001"``."""
    *head, stem = parts
    readable = "_".join(_key_part(p) for p in parts)
    key = _plain_key(readable, stem, ext) if all(_PLAIN_NAME(p) for p in head) else None
    if key is not None:
        return key
    digest = hashlib.sha256("\0".join((*parts, ext)).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{readable}~{digest}"


def _plain_key(readable: str, stem: str, ext: str) -> str | None:
    """The key of a file whose split and class names are plain (``readable``: the parts joined),
    when its stem and extension keep it plain too; None when it needs the hashed form."""
    if not _PLAIN_STEM(stem):
        return None
    if ext in ("", BARE_EXT):
        return readable
    return f"{readable}~{ext[1:]}" if _PLAIN_EXT(ext) else None


@functools.lru_cache(maxsize=4096)
def _plain_head(split: str, cls: str) -> str | None:
    """``split_cls``, the readable start of the keys of that class folder, when both are plain."""
    return f"{split}_{cls}" if _PLAIN_NAME(split) and _PLAIN_NAME(cls) else None


def _file_key(split: str, cls: str, rest: str) -> str:
    """``sample_key(split, cls, stem, ext=ext)`` of the file ``rest`` of a class folder, with the
    checks of the split and class names made once per folder (a listing of ImageNet makes 1.28 M keys)."""
    stem, ext = os.path.splitext(rest)
    head = _plain_head(split, cls)
    key = _plain_key(f"{head}_{stem}", stem, ext) if head is not None else None
    return key if key is not None else sample_key(split, cls, stem, ext=ext)


_PLAIN_JPEGS = re.compile(r"(?:[A-Za-z0-9_-]+\.jpg\n)*[A-Za-z0-9_-]+\.jpg\Z").match


def _folder_keys(split: str, cls: str, rests: list[str]) -> list[str]:
    """``[_file_key(split, cls, r) for r in rests]`` (the files of one class folder). When every
    name is a plain stem + ``.jpg`` (CIFAR-10's and most folders' case) the keys are made by string
    operations over all the names at once (~0.1 us a name instead of ~1.7 us)."""
    head = _plain_head(split, cls)
    if head is not None and rests:
        joined = "\n".join(rests)
        if joined.count("\n") == len(rests) - 1 and _PLAIN_JPEGS(joined):  # (no name holds a newline)
            prefix = head + "_"
            return (prefix + joined[:-4].replace(".jpg\n", "\n" + prefix)).split("\n")
    return [_file_key(split, cls, r) for r in rests]


def check_unique_keys(items: list["Item"], name_of) -> None:
    """A SourceError naming both source files when two items share a key."""
    seen: dict[str, Item] = {}
    for it in items:
        other = seen.setdefault(it.key, it)
        if other is not it:
            raise SourceError(f"{name_of(other)} and {name_of(it)} both give sample key {it.key!r}; "
                              f"rename one of them")


class Source:
    """Base class. Subclasses set name/description/classes and implement ``_items`` and ``_read``.

    ``resize`` (an int S or None) is the resizing policy: shorter side to S, then centre crop SxS.
    """

    name: str = "source"
    description: str = ""
    classes: list[str]
    resize: int | None = None
    limits: ImageLimits = DEFAULT_LIMITS  # what one image may cost (pixels, bytes) before it is decoded

    def __init__(self):
        self._cache: dict[str, list[Item]] = {}
        self._key_hash: dict[str, str] = {}

    def resize_policy(self) -> dict | None:
        return None if self.resize is None else {"shorter_side": self.resize, "crop": "center",
                                                 "size": [self.resize, self.resize], "filter": "bicubic"}

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

    def split_token(self, split: str) -> str:
        """Identifies what a split holds: a hash of its sorted sample keys (cached) and the size and
        mtime of the archive file behind it (checked live). A process that keeps a source open
        (a pool worker) compares it with the planner's token before trusting its positions."""
        if split not in self._key_hash:
            import hashlib

            self._key_hash[split] = hashlib.sha1("\n".join(it.key for it in self.items(split)).encode()).hexdigest()[:16]
        return f"{self._key_hash[split]}:{self.stat_token()}"

    def stat_token(self) -> str:
        """Where the source lives (an extracted archive's folder name carries the archive's size and
        mtime) and, for a file, its size and mtime."""
        path = getattr(self, "path", None)
        if path is None:
            return ""
        try:
            st = os.stat(path)
        except OSError:
            return f"{path}|missing"
        return f"{path}|" + ("" if os.path.isdir(path) else f"{st.st_size}.{st.st_mtime_ns}")

    def _read(self, item: Item) -> np.ndarray:
        raise NotImplementedError

    def for_workers(self) -> "Source | None":
        """This opened source as worker processes should receive it (pickled: its listing, sorted
        listings and split tokens travel, so a worker does not list the source again), or None when
        a worker should open its own (the pixels themselves are in memory: npz arrays, CIFAR batches)."""
        return None

    def item_name(self, item: Item) -> str:
        return f"{self.name}:{item.key}"

    def _read_into(self, item: Item, out: np.ndarray) -> np.ndarray | None:
        """Read an item into ``out`` (a slot of the batch, the size of the batch's first image) and
        return None, or return its pixels when it cannot go there directly."""
        return self._read(item)

    def load(self, items: list[Item], on_bad_image: str = "stop") -> Batch:
        """Read items into one batch. All images must have the same size (resize upstream). The
        batch array is allocated once, at the first image's size, and images are decoded into it."""
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise SourceError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
        arr, keys, labels, skipped = None, [], [], []
        for it in items:
            try:
                img = self._read_into(it, arr[len(keys)]) if arr is not None else self._read(it)
                if img is not None and self.resize is not None:
                    img = resize_shorter_center_crop(img, self.resize)
            except SourceError:
                if on_bad_image == "skip":
                    skipped.append(self.item_name(it))
                    continue
                raise
            if img is not None:
                if arr is None:
                    arr = np.empty((len(items),) + img.shape, np.uint8)
                elif img.shape != arr.shape[1:]:
                    raise SourceError(f"image {self.item_name(it)} is {img.shape[1]}x{img.shape[0]}, others in its "
                                      f"batch are {arr.shape[2]}x{arr.shape[1]}; choose a resize policy")
                arr[len(keys)] = img
            keys.append(it.key)
            labels.append(it.label)
        arr = arr[:len(keys)] if arr is not None else np.zeros((0, 0, 0, 3), np.uint8)
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
        for sp in self._splits:
            if not SPLIT_NAME(sp):
                raise SourceError(f"{self.path}: array x_{sp} names split {sp!r}; a split name may only hold "
                                  f"letters, digits, '-' and '_' (it becomes a folder and shard names)")
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
        y = self._arrays[split][1].tolist()
        return [Item(split, sample_key(split, f"{i:06d}"), int(lab), i) for i, lab in enumerate(y)]

    def _read(self, item):
        img = self._x(item.split)[item.ref]
        return np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img

    def load(self, items, on_bad_image="stop"):
        if not items or self.resize is not None:
            return super().load(items, on_bad_image)
        x = self._x(items[0].split)
        idx = np.asarray([it.ref for it in items])
        if len(idx) > 1 and idx[-1] - idx[0] == len(idx) - 1 and (np.diff(idx) == 1).all():
            imgs = x[idx[0]:idx[-1] + 1].view()  # consecutive images: a read-only view, no copy
            imgs.flags.writeable = False
        else:
            imgs = x[idx]
        if imgs.ndim == 3:
            imgs = np.repeat(imgs[..., None], 3, -1)
        return Batch([it.key for it in items], np.ascontiguousarray(imgs),
                     np.asarray([it.label for it in items], np.int64))


def _common_folders(names: list[str]) -> int:
    """How many leading folders every name shares (such as "imagenette2-160/" or a zip's single top
    folder), stopping at a split folder and keeping at least <class>/<file> below."""
    strip = 0
    while True:
        first = names[0].split("/")
        if len(first) - strip <= 2 or first[strip] in SPLIT_NAMES:
            return strip
        pre = "/".join(first[:strip + 1]) + "/"
        if not all(n.startswith(pre) and n.count("/") - strip >= 2 for n in names):
            return strip
        strip += 1


class FolderSource(Source):
    """``<split>/<class>/<file>`` or ``<class>/<file>`` in a directory or a .zip file."""

    def __init__(self, path: str | os.PathLike, limits: ImageLimits = DEFAULT_LIMITS):
        super().__init__()
        self.path = Path(path)
        self.limits = limits
        self.is_zip = self.path.is_file()
        self._zip: ZipArchive | None = None
        if self.is_zip:
            self._zip = ZipArchive(self.path)
            names = self._zip.names
        elif self.path.is_dir():
            names = list_folder(self.path)
        else:
            raise SourceError(f"source {self.path} does not exist")
        names = sorted(n for n in names if n.lower().endswith(IMAGE_EXTS) and "__MACOSX" not in n)
        if not names:
            raise SourceError(f"source {self.path}: no images found (extensions: {', '.join(IMAGE_EXTS)})")
        # the names grouped by folder: the split, class and key prefix are worked out once per folder
        # (a listing of ImageNet makes 1.28 M keys), keeping no other per-name list
        strip = _common_folders(names)
        folders: dict[str, list[str]] = {}
        for n in names:
            folders.setdefault(n.rpartition("/")[0], []).append(n)
        has_splits = all(len(p) >= 2 and p[0] in SPLIT_NAMES for p in (d.split("/")[strip:] for d in folders))
        one: dict[str, str] = {}  # one string object per split and class name, not one per image

        def place(folder: str, first: str) -> tuple[str, str, int]:
            """(split, class, length of the names' part up to the class folder) of a folder's files."""
            parts = folder.split("/")
            p = parts[strip:]
            if has_splits:
                return one.setdefault(p[0], p[0]), p[1], len("/".join(parts[:strip + 2])) + 1
            if folder and p:  # (a file at the top has no class folder)
                return "train", p[0], len("/".join(parts[:strip + 1])) + 1
            raise SourceError(f"source {self.path}: image {'/'.join(first.split('/')[strip:])} is not inside a class folder")

        placed = [(place(d, files[0]), files) for d, files in folders.items()]
        self.classes = sorted({c for (_, c, _), _ in placed})
        cidx = {c: i for i, c in enumerate(self.classes)}
        self._by_split: dict[str, list[Item]] = {}
        for (sp, c, cut), files in placed:
            label = cidx[c]
            keys = _folder_keys(sp, c, [name[cut:] for name in files])
            self._by_split.setdefault(sp, []).extend(map(Item._make, zip(repeat(sp), keys, repeat(label), files)))
        for v in self._by_split.values():
            check_unique_keys(v, self.item_name)
        self.name = self.path.stem
        kind = "zip" if self.is_zip else "folder"
        self.description = f"image {kind} {self.path.name} ({', '.join(f'{s}: {len(v)}' for s, v in sorted(self._by_split.items()))})"

    @property
    def splits(self):
        return sorted(self._by_split, key=lambda s: (SPLIT_NAMES.index(s) if s in SPLIT_NAMES else 99, s))

    def _items(self, split):
        return self._by_split[split]

    def for_workers(self) -> "FolderSource":
        for sp in self.splits:
            self.split_token(sp)  # sorted listings and key hashes computed here, once, not in every worker
        return self

    def __getstate__(self):
        # the listing travels as columns, sorted by key: pickling named tuples one by one costs ~5 us
        # each (0.4 s for CIFAR-10, seconds for ImageNet), lists of strings and ints almost nothing
        state = dict(self.__dict__)
        state["_by_split"] = {sp: ([it.key for it in v], [it.label for it in v], [it.ref for it in v])
                              for sp, v in ((sp, self.items(sp)) for sp in self._by_split)}
        state["_cache"] = {}
        return state

    def __setstate__(self, state):
        columns = state.pop("_by_split")
        self.__dict__.update(state)
        self._by_split = {sp: list(map(Item._make, zip(repeat(sp), *c))) for sp, c in columns.items()}
        self._cache = dict(self._by_split)  # already sorted by key

    def item_name(self, item):
        return f"{self.path}/{item.ref}" if not self.is_zip else f"{self.path}:{item.ref}"

    def read_bytes(self, item: Item) -> bytes:
        if self._zip is not None:
            return self._zip.read(item.ref, self.limits)
        try:
            with open(self.path / item.ref, "rb") as f:
                self.limits.check_bytes(os.fstat(f.fileno()).st_size, self.item_name(item))
                return f.read()
        except OSError as e:
            raise SourceError(f"cannot read {self.item_name(item)}: {e}") from None

    def _read(self, item):
        return decode_image(self.read_bytes(item), self.item_name(item), self.limits)

    def _read_into(self, item, out):
        data = self.read_bytes(item)
        name = self.item_name(item)
        return None if decode_jpeg_into(data, out, name, self.limits) else decode_image(data, name, self.limits)


_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


def load_cifar_batch(path: Path) -> dict:
    """One CIFAR-10 python batch file, read with an unpickler that only builds dicts, lists,
    strings, bytes, numbers and numpy arrays: a crafted archive cannot run code."""
    import pickle

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _CIFAR_PICKLE_GLOBALS:
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{path.name}: refusing to load {module}.{name}: a CIFAR-10 batch holds "
                                         f"only arrays, lists and strings")

    with open(path, "rb") as f:
        d = Restricted(f, encoding="latin1").load()
    if not isinstance(d, dict):
        raise ValueError(f"{path.name} is not a CIFAR-10 batch (a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


class CifarSource(Source):
    """CIFAR-10 in its official python format: ``cifar-10-batches-py/`` (data_batch_1..5, test_batch)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        import pickle

        self.path = Path(path)
        folder = self.path if (self.path / "batches.meta").exists() else self.path / "cifar-10-batches-py"
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        self._x, self._y = {}, {}
        try:
            meta = load_cifar_batch(folder / "batches.meta")
            self.classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta["label_names"]]
            for split, names in files.items():
                xs, ys = [], []
                for n in names:
                    d = load_cifar_batch(folder / n)
                    xs.append(np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                    ys.append(np.asarray(d["labels"], np.int64))
                self._x[split], self._y[split] = np.concatenate(xs), np.concatenate(ys)
        except (OSError, KeyError, TypeError, EOFError, pickle.UnpicklingError, ValueError) as e:
            raise SourceError(f"{folder}: not a readable CIFAR-10 python folder ({e})") from None
        self.name = "cifar10"
        self.description = f"CIFAR-10 python format at {folder} (train: {len(self._y['train'])}, test: {len(self._y['test'])})"

    @property
    def splits(self):
        return ["train", "test"]

    def _items(self, split):
        # keys follow the official batch order, per class, like the shared JPEG copies: <split>_<class>_NNNN
        counts = [0] * len(self.classes)
        out = []
        for i, lab in enumerate(np.asarray(self._y[split]).tolist()):
            out.append(Item(split, sample_key(split, self.classes[lab], f"{counts[lab]:04d}"), lab, i))
            counts[lab] += 1
        return out

    def _read(self, item):
        return self._x[item.split][item.ref]

    def load(self, items, on_bad_image="stop"):
        if not items or self.resize is not None:
            return super().load(items, on_bad_image)
        idx = np.asarray([it.ref for it in items])
        return Batch([it.key for it in items], np.ascontiguousarray(self._x[items[0].split][idx]),
                     np.asarray([it.label for it in items], np.int64))


class MultiSource(Source):
    """Several sources with the same classes seen as one (e.g. the train and test zips of CIFAR-10)."""

    def __init__(self, parts: list[Source]):
        super().__init__()
        self.parts = parts
        classes = parts[0].classes
        for p in parts[1:]:
            if p.classes != classes:
                raise SourceError(f"sources {parts[0].name} and {p.name} have different classes")
        self.classes = list(classes)
        self.name = parts[0].name.split("-")[0] if len(parts) > 1 else parts[0].name
        self.description = "; ".join(p.description for p in parts)
        self._owner: dict[str, list[Source]] = {}
        for p in parts:
            for sp in p.splits:
                self._owner.setdefault(sp, []).append(p)

    @property
    def splits(self):
        return sorted(self._owner, key=lambda s: (SPLIT_NAMES.index(s) if s in SPLIT_NAMES else 99, s))

    def _items(self, split):
        owners = self._owner[split]
        if len(owners) == 1:  # (CIFAR-10's train and test zips) the part's own items, listed and checked there
            return owners[0].items(split)
        items = [Item(split, it.key, it.label, (i, it)) for i, p in enumerate(owners) for it in p.items(split)]
        check_unique_keys(items, self.item_name)
        return items

    def _part(self, item: Item) -> tuple[Source, Item]:
        """The part that lists ``item`` and the item as it lists it: a split only one part has keeps
        that part's items as they are; a split several parts share wraps them as (part, item)."""
        owners = self._owner[item.split]
        if len(owners) == 1:
            return owners[0], item
        i, inner = item.ref
        return owners[i], inner

    def for_workers(self) -> "MultiSource | None":
        if not all(p.for_workers() is p for p in self.parts):
            return None
        for sp in self.splits:
            self.split_token(sp)
        return self

    def __getstate__(self):
        # the merged, sorted listing as (part, position in that part's sorted listing) columns
        state = dict(self.__dict__)
        cache = {}
        for sp, items in self._cache.items():
            owners = self._owner[sp]
            if len(owners) == 1:  # the part's own listing, which travels with the part
                continue
            pos = [{id(it): j for j, it in enumerate(p.items(sp))} for p in owners]
            cache[sp] = ([it.ref[0] for it in items], [pos[it.ref[0]][id(it.ref[1])] for it in items])
        state["_cache"] = cache
        return state

    def __setstate__(self, state):
        columns = state.pop("_cache")
        self.__dict__.update(state)
        self._cache = {sp: owners[0].items(sp) for sp, owners in self._owner.items() if len(owners) == 1}
        for sp, (which, where) in columns.items():
            lists = [p.items(sp) for p in self._owner[sp]]
            inner = [lists[i][j] for i, j in zip(which, where)]
            self._cache[sp] = list(map(Item._make, zip(repeat(sp), [it.key for it in inner], [it.label for it in inner],
                                                       zip(which, inner))))

    def item_name(self, item):
        part, inner = self._part(item)
        return part.item_name(inner)

    def stat_token(self) -> str:
        return ",".join(p.stat_token() for p in self.parts)

    def _read(self, item):
        part, inner = self._part(item)
        return part._read(inner)

    def _read_into(self, item, out):
        part, inner = self._part(item)
        return part._read_into(inner, out)


def _open_one(p: Path, limits: ImageLimits) -> Source:
    if not p.exists():
        raise SourceError(f"source {p} does not exist")
    low = p.name.lower()
    if low.endswith(".npz"):
        return NpzSource(p)
    if low.endswith((".tar.gz", ".tgz", ".tar")):
        p = extract_archive(p, limits)
    if p.is_dir() and ((p / "batches.meta").exists() or (p / "cifar-10-batches-py" / "batches.meta").exists()):
        return CifarSource(p)
    return FolderSource(p, limits)


def list_folder(root: Path) -> list[str]:
    """Relative names of the files under ``root``, following symlinks that resolve inside it; a
    symlink to outside ``root`` and a symlink loop (a folder inside itself) are SourceErrors naming
    them. Dangling links are listed (reading them names them)."""
    real_root = os.path.realpath(root)
    out: list[str] = []

    def visit(folder: str, rel: str, above: tuple[str, ...]) -> None:
        real = os.path.realpath(folder)
        if real in above:
            raise SourceError(f"source {root}: {rel.rstrip('/')} leads back to {real}, a folder it is inside "
                              f"(a symlink loop)")
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            name = rel + entry.name
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if os.path.commonpath([target, real_root]) != real_root:
                    raise SourceError(f"source {root}: {name} is a symlink to {target}, outside the source folder "
                                      f"(only links inside it are followed); copy the files in, or pass that "
                                      f"folder as its own --source")
                if not os.path.exists(entry.path):
                    out.append(name)
                    continue
            if entry.is_dir():
                visit(entry.path, name + "/", above + (real,))
            elif entry.is_file():
                out.append(name)

    visit(str(root), "", ())
    return out


def estimated_images(spec) -> int | None:
    """At most how many images a source holds, known without opening it: the entries that its zip
    files declare (folders and other files included); None for anything else (folders, .npz,
    archives that must be extracted), whose count needs the listing."""
    from .archives import zip_entry_count

    specs = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    total = 0
    for x in (str(x).strip() for x in specs):
        p = Path(x)
        n = zip_entry_count(p) if x and x.lower().endswith(".zip") and p.is_file() else None
        if n is None:
            return None
        total += n
    return total or None


def open_source(spec, resize: int | None = None, limits: ImageLimits = DEFAULT_LIMITS) -> Source:
    """Open a source: an ``.npz``; an image folder, ``.zip`` or ``.tgz`` with class folders (e.g.
    Imagenette's ``imagenette2-160``); CIFAR-10's python folder or ``.tar.gz``; or several of those
    (a list, or paths joined with commas) merged into one source. ``resize`` = shorter side + centre
    crop; ``limits`` = what one image may cost before it is decoded (pixels, bytes)."""
    specs = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    parts = [_open_one(Path(str(x).strip()), limits) for x in specs if str(x).strip()]
    if not parts:
        raise SourceError("no source given")
    src = parts[0] if len(parts) == 1 else MultiSource(parts)
    if resize is not None:
        if int(resize) < 1:
            raise SourceError(f"resize must be a positive size in pixels, got {resize}")
        src.resize = int(resize)
        for p in getattr(src, "parts", []):
            p.resize = int(resize)
    return src
