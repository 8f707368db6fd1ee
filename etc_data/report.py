"""The size-report job: what encryption costs in bytes, per scheme and codec.

    from etc_data import ReportConfig, size_report
    rep = size_report(ReportConfig(source="cifar10-lossless-subset.npz", schemes=["plain", "etc"],
                                   codecs=["jpeg:q=85,sub=444", "jpegls"], out="out/sizes"))

Every image of the source is encrypted once per scheme and encoded once per codec. For lossy
codecs the decoded image is decrypted and compared with the plain image (PSNR), unless
``psnr=False`` (``--no-psnr``): then sizes cost the encoder calls alone (the decode, decryption
and scoring are about a third of the time at 224 px) and ``psnr`` is null. Outputs:
``sizes.json`` (the contract below), ``sizes.md`` (laid out like Table IV of MaungMaung & Kiya:
rows codecs, columns schemes, MB and ratio to plain) and ``sizes.png`` (bytes per image).

    {"source": ..., "block_size": 16, "images": N, "key": "ephemeral" | fingerprint,
     "results": [{"scheme", "codec", "images", "total_bytes", "mean_bytes", "psnr"}, ...]}
"""

from __future__ import annotations

import json
import secrets
import warnings
from dataclasses import dataclass, field

import numpy as np

from .codecs import check_scheme_codec, get_codec
from .errors import EtcError
from .schemes import SCHEMES, WeakKeyWarning, make_scheme, parse_scheme_spec, spec_label
from .sources import BAD_IMAGE_POLICIES, Source, open_source

PSNR_CAP = 100.0  # dB, for images decoded without error
DEFAULT_SCHEMES = ["plain", "etc", "etc:common=1", "le", "ele", "pe"]
DEFAULT_CODECS = ["jpeg:q=85,sub=444", "jpeg:q=80,sub=444", "jpegls", "j2k", "raw"]


class ReportError(EtcError):
    pass


@dataclass
class Cell:
    scheme: str
    codec: str
    images: int = 0
    total_bytes: int = 0
    psnr_sum: float = 0.0
    lossy: bool = False

    def row(self) -> dict:
        return {"scheme": self.scheme, "codec": self.codec, "images": self.images, "total_bytes": self.total_bytes,
                "mean_bytes": self.total_bytes / self.images if self.images else None,
                "psnr": (self.psnr_sum / self.images) if (self.lossy and self.images) else None}


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of two uint8 batches (capped at PSNR_CAP for identical images).
    Small images: exact int32 sums over chunks. Large images: absolute differences in uint8, then
    float32 and a BLAS dot per image, 3x faster than an int32 copy (which costs a good part of a
    JPEG encode at 224 px); those sums agree with exact integer sums to ~1e-5 relative, i.e. 1e-4 dB."""
    n = len(a)
    sse = np.empty(n, np.float64)
    if n and a[0].size <= 16384:  # small images: exact int32 sums over chunks, no per-image Python loop
        for i in range(0, n, 256):
            d = np.subtract(a[i:i + 256], b[i:i + 256], dtype=np.int32).reshape(len(a[i:i + 256]), -1)
            sse[i:i + 256] = np.einsum("ij,ij->i", d, d)
    else:
        for i in range(n):  # |a - b| in uint8 (two cheap passes), then one float32 conversion and a BLAS dot
            d = np.maximum(a[i], b[i])
            d -= np.minimum(a[i], b[i])
            f = d.ravel().astype(np.float32)
            sse[i] = float(f @ f)
    mse = sse / (a[0].size if n else 1)
    with np.errstate(divide="ignore"):
        out = 10 * np.log10(255.0 ** 2 / mse)
    return np.minimum(out, PSNR_CAP)


def _code_batch(codec, scheme, enc: np.ndarray, plain: np.ndarray, workers: int | None,
                score: bool = True) -> tuple[int, int, float]:
    """Encode (and for lossy codecs, when ``score``, decode, decrypt and score) a batch in chunks
    spread over threads: each chunk stays in cache from encoding to PSNR, and the codecs and numpy
    release the GIL. Returns (images, total bytes, sum of PSNR)."""
    from concurrent.futures import ThreadPoolExecutor

    from .codecs import default_workers

    def chunk(sl):
        blobs = codec.encode_many(enc[sl])
        nbytes = sum(len(b) for b in blobs)
        if codec.lossless or not score:
            return nbytes, 0.0
        dec = scheme.decrypt(codec.decode_into(blobs, np.empty(enc[sl].shape, np.uint8)))
        return nbytes, float(psnr(dec, plain[sl]).sum())

    n = len(enc)
    w = default_workers() if workers is None else max(1, workers)
    step = max(1, min(256, -(-n // (w * 2))))
    slices = [slice(i, i + step) for i in range(0, n, step)]
    if w == 1:
        parts = [chunk(sl) for sl in slices]
    else:
        with ThreadPoolExecutor(w) as ex:
            parts = list(ex.map(chunk, slices))
    return n, sum(p[0] for p in parts), sum(p[1] for p in parts)


@dataclass
class ReportConfig:
    """A size report: every image of ``source`` encoded once per scheme and codec."""

    source: str | list[str]
    out: str | None = None                 # folder for sizes.json/.md/.png (None: not written)
    schemes: list[str] = field(default_factory=lambda: list(DEFAULT_SCHEMES))
    codecs: list[str] = field(default_factory=lambda: list(DEFAULT_CODECS))
    block_size: int | None = 16            # of the JPEG-aligned schemes (etc, blockwise); le/ele use 4, pe 1
    key_ref: str | None = None             # None: an ephemeral random key that is never stored
    dataset: str | None = None             # dataset id for the subkey (default: the source name)
    splits: list[str] | None = None
    limit: int | None = None               # at most N images per split
    resize: int | None = None
    workers: int | None = None             # encoder threads (default: one per core)
    on_bad_image: str = "stop"
    psnr: bool = True                      # decode, decrypt and score lossy codecs (False: sizes only)

    def check(self) -> None:
        if not self.schemes or not self.codecs:
            raise ReportError("give at least one scheme and one codec")
        for name in ("limit", "resize", "workers", "block_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ReportError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise ReportError(f"on-bad-image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {self.on_bad_image!r}")


@dataclass
class SizeReport:
    source: str
    block_size: int | None
    key: str
    cells: dict = field(default_factory=dict)  # (scheme, codec) -> Cell
    schemes: list[str] = field(default_factory=list)
    codecs: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_state(self) -> dict:
        """Every figure, JSON-able (what a per-split Prefect task returns; no key, no pixels)."""
        return {"source": self.source, "block_size": self.block_size, "key": self.key, "schemes": self.schemes,
                "codecs": self.codecs, "skipped": self.skipped,
                "cells": [[c.scheme, c.codec, c.images, c.total_bytes, c.psnr_sum, c.lossy] for c in self.cells.values()]}

    @classmethod
    def merge(cls, states: list[dict]) -> "SizeReport":
        """Add per-split figures (``to_state`` of reports with the same schemes and codecs) into one report."""
        first = states[0]
        rep = cls(first["source"], first["block_size"], first["key"], schemes=list(first["schemes"]),
                  codecs=list(first["codecs"]))
        for st in states:
            rep.skipped += st["skipped"]
            for s, c, n, nbytes, psnr_sum, lossy in st["cells"]:
                cell = rep.cells.setdefault((s, c), Cell(s, c, lossy=lossy))
                cell.images += n
                cell.total_bytes += nbytes
                cell.psnr_sum += psnr_sum
        return rep

    def to_json(self) -> dict:
        rows = [self.cells[(s, c)].row() for c in self.codecs for s in self.schemes]
        return {"source": self.source, "block_size": self.block_size, "key": self.key,
                "images": rows[0]["images"] if rows else 0, "skipped_images": self.skipped, "results": rows}

    def markdown(self) -> str:
        n = self.cells[(self.schemes[0], self.codecs[0])].images if self.cells else 0
        lines = ["# Compressed size by scheme and codec", "",
                 f"- source: {self.source}", f"- images: {n}", f"- block size: {self.block_size} (etc, blockwise); "
                 f"le and ele use 4x4 blocks, pe is per pixel", f"- key: {self.key}", "",
                 "Each cell: total MB for these images, bytes per image, and the ratio to plain with the same codec."
                 " PSNR (dB) of the decoded and decrypted image against the plain image for lossy codecs.", ""]
        lines.append("| codec | " + " | ".join(self.schemes) + " |")
        lines.append("|---|" + "---|" * len(self.schemes))
        for c in self.codecs:
            base = self.cells.get(("plain", c))
            cells = []
            for s in self.schemes:
                r = self.cells[(s, c)].row()
                txt = f"{r['total_bytes'] / 1e6:.2f} MB, {r['mean_bytes']:.0f} B"
                if base is not None and base.total_bytes:
                    txt += f", x{r['total_bytes'] / base.total_bytes:.3f}"
                if r["psnr"] is not None:
                    txt += f", {r['psnr']:.1f} dB"
                cells.append(txt)
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        if self.skipped:
            lines += ["", f"Skipped {len(self.skipped)} unreadable images: " + ", ".join(self.skipped[:20])]
        return "\n".join(lines) + "\n"

    def plot(self, path) -> None:
        """Bar chart of bytes per image (``path``: a file name or a binary file object)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(self.codecs), 4.2))
        w = 0.8 / len(self.schemes)
        x = np.arange(len(self.codecs))
        for i, s in enumerate(self.schemes):
            vals = [self.cells[(s, c)].row()["mean_bytes"] for c in self.codecs]
            ax.bar(x + (i - (len(self.schemes) - 1) / 2) * w, vals, w, label=s)
        ax.set_xticks(x, [c.replace(",", ",\n") for c in self.codecs], fontsize=8)
        ax.set_ylabel("bytes per image")
        ax.set_title(f"Compressed size per image ({self.source}, block {self.block_size})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120, format="png")
        plt.close(fig)

    def write(self, out: str, storage_options: dict | None = None) -> str:
        """sizes.json, sizes.md and sizes.png in ``out`` (a folder or URL), each written atomically."""
        from .storage import atomic_open, join, write_bytes

        write_bytes(join(out, "sizes.json"), (json.dumps(self.to_json(), indent=1) + "\n").encode(), storage_options)
        write_bytes(join(out, "sizes.md"), self.markdown().encode(), storage_options)
        with atomic_open(join(out, "sizes.png"), storage_options) as f:
            self.plot(f)
        return out


def size_report(cfg: ReportConfig, progress=None, key_loader=None, source: Source | None = None) -> SizeReport:
    """The size-report job: open the source (or use ``source``, ``cfg.source`` already opened by
    the caller), measure, write ``cfg.out`` when given. ``progress(n)`` is called with the number
    of images done after each batch; ``key_loader(ref)`` resolves ``cfg.key_ref`` (default: a path
    or env:NAME)."""
    cfg.check()
    src = source if source is not None else open_source(cfg.source, resize=cfg.resize)
    key = None
    if cfg.key_ref:
        from .keys import load_key

        key = (key_loader or load_key)(cfg.key_ref)
    rep = measure_sizes(src, cfg.schemes, cfg.codecs, cfg.block_size, key, cfg.dataset, cfg.splits, cfg.limit,
                        workers=cfg.workers, on_bad_image=cfg.on_bad_image, progress=progress, psnr=cfg.psnr)
    if cfg.out:
        rep.write(cfg.out)
    return rep


def measure_sizes(source: Source, schemes: list[str], codecs: list[str], block_size: int | None = 16, key=None,
                  dataset: str | None = None, splits: list[str] | None = None, limit: int | None = None,
                  batch_size: int = 1000, workers: int | None = None, on_bad_image: str = "stop",
                  progress=None, psnr: bool = True) -> SizeReport:
    """Encode every image of an open source once per scheme and codec; ``key`` None means an
    ephemeral random key; ``psnr=False``: lossy codecs are not decoded and scored."""
    if not schemes or not codecs:
        raise ReportError("give at least one scheme and one codec")
    names = [spec_label(s) for s in schemes]  # one column per spec: etc and etc:common=1 are different schemes
    codec_objs = [get_codec(c) for c in codecs]
    dataset = dataset or source.name
    ephemeral = secrets.token_bytes(32) if key is None else None

    def build(spec):
        cls = SCHEMES[parse_scheme_spec(spec)[0]]
        bs = block_size if cls.jpeg_block_aligned else None
        if not cls.keyed:
            return make_scheme(spec, block_size=bs)
        if key is not None:
            return make_scheme(spec, key=key, dataset=dataset, block_size=bs)
        from .keys import derive_subkey

        return make_scheme(spec, subkey=derive_subkey(ephemeral, dataset, cls.name, bs or cls.default_block_size or 0),
                           block_size=bs)

    scheme_objs = [build(s) for s in schemes]
    for so in scheme_objs:
        for c in codec_objs:
            check_scheme_codec(so, c)
    rep = SizeReport(source.description or source.name, block_size,
                     "ephemeral random key (not stored)" if key is None else f"fingerprint {key.fingerprint}",
                     schemes=names, codecs=[c.spec for c in codec_objs])
    for s in names:
        for c in codec_objs:
            rep.cells[(s, c.spec)] = Cell(s, c.spec, lossy=psnr and not c.lossless)
    for split in splits or source.splits:
        for batch in source.batches(split, batch_size, limit, on_bad_image=on_bad_image):
            rep.skipped += batch.skipped
            plain = batch.images
            for name, so in zip(names, scheme_objs):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", WeakKeyWarning)
                    enc = so.encrypt(plain)
                for c in codec_objs:
                    n, nbytes, psnr_sum = _code_batch(c, so, enc, plain, workers, psnr)
                    cell = rep.cells[(name, c.spec)]
                    cell.images += n
                    cell.total_bytes += nbytes
                    cell.psnr_sum += psnr_sum
            if progress:
                progress(len(plain))
    if not rep.cells or rep.cells[(names[0], codec_objs[0].spec)].images == 0:
        raise ReportError(f"source {source.name}: no images to report on")
    return rep
