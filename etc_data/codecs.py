"""Image codecs behind one interface: encode a uint8 RGB image (H, W, 3) to bytes, decode back.

Codec specs are strings ``name[:param=value,...]``:

=========  =====  ========  ==========================================================================
name       ext    lossless  parameters (default)
=========  =====  ========  ==========================================================================
jpeg       jpg    no        q (85) quality 1-100; sub (420) chroma subsampling 420/422/444/gray;
                            fastdct (0). libjpeg-turbo through simplejpeg.
jpegls     jls    yes       (none) CharLS through imagecodecs, near-lossless off.
j2k        jp2    yes       impl (pillow): ``pillow`` = OpenJPEG with Pillow's defaults (reversible 5/3
                            wavelet, no multi-component transform, OpenJPEG's 6 resolutions, JP2
                            container): the setting the paper's sizes fit; ``imagecodecs`` = OpenJPEG
                            with imagecodecs' defaults (colour transform on, fewer resolutions on small
                            images: 3 at 32 px). mct (0 for pillow, 1 for imagecodecs): reversible
                            colour transform, the main difference (about -20 % on CIFAR);
                            res (0 = the implementation's default): number of resolutions (wavelet
                            levels + 1); fmt (jp2): ``jp2`` container or bare ``j2k`` codestream.
png        png    yes       level (6) zlib level 0-9, through imagecodecs.
webp       webp   yes       method (4) effort 0-6, lossless WebP through imagecodecs.
jxl        jxl    yes       effort (7) 1-9, lossless JPEG XL through imagecodecs.
raw        ppm    yes       (none) uncompressed binary PPM (a 13-byte header + H*W*3 bytes).
=========  =====  ========  ==========================================================================

Batch helpers spread images over threads: simplejpeg and imagecodecs release the GIL while coding.
Before decoding, the image's width and height are read from its header (``images.image_dims``) and
an image past ``images.DEFAULT_MAX_PIXELS`` is refused: a hostile shard cannot make a reader
allocate gigabytes.
"""

from __future__ import annotations

import functools
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .errors import EtcError
from .schemes import check_jpeg_compat


class CodecError(EtcError):
    """Unknown codec or parameter, or an image that does not encode/decode (message names it)."""


# name -> (ext, lossless, {param: (default, parser, allowed-description)})
def _int_range(lo, hi):
    def parse(name, v):
        try:
            i = int(v)
        except (TypeError, ValueError):
            raise CodecError(f"codec parameter {name}={v!r} must be an integer in {lo}..{hi}") from None
        if not lo <= i <= hi:
            raise CodecError(f"codec parameter {name}={v!r} must be in {lo}..{hi}")
        return i
    return parse


def _choice(*options):
    def parse(name, v):
        s = str(v).lower()
        if s not in options:
            raise CodecError(f"codec parameter {name}={v!r} must be one of {', '.join(options)}")
        return s
    return parse


_bool = _int_range(0, 1)

CODECS: dict[str, tuple[str, bool, dict]] = {
    "jpeg": ("jpg", False, {"q": (85, _int_range(1, 100)), "sub": ("420", _choice("420", "422", "444", "gray")),
                            "fastdct": (0, _bool)}),
    "jpegls": ("jls", True, {}),
    "j2k": ("jp2", True, {"impl": ("pillow", _choice("pillow", "imagecodecs")), "mct": (None, _bool),
                          "res": (0, _int_range(0, 32)), "fmt": ("jp2", _choice("jp2", "j2k"))}),
    "png": ("png", True, {"level": (6, _int_range(0, 9))}),
    "webp": ("webp", True, {"method": (4, _int_range(0, 6))}),
    "jxl": ("jxl", True, {"effort": (7, _int_range(1, 9))}),
    "raw": ("ppm", True, {}),
}
ALIASES = {"jpg": "jpeg", "jls": "jpegls", "jpeg-ls": "jpegls", "jpeg2000": "j2k", "jp2": "j2k", "jpegxl": "jxl",
           "ppm": "raw", "none": "raw"}
EXT_TO_CODEC = {v[0]: k for k, v in CODECS.items()}
DEFAULT_CODEC = "jpeg:q=85,sub=420"  # what prepare writes unless told otherwise


@dataclass(frozen=True)
class Codec:
    name: str
    params: dict = field(default_factory=dict)

    @property
    def ext(self) -> str:
        return CODECS[self.name][0]

    @property
    def lossless(self) -> bool:
        return CODECS[self.name][1]

    @property
    def subsampling(self) -> str | None:
        return self.params.get("sub") if self.name == "jpeg" else None

    @property
    def spec(self) -> str:
        """Normalised spec: every parameter, in a fixed order, so equal codecs compare equal."""
        ps = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}:{ps}" if ps else self.name

    def __str__(self) -> str:
        return self.spec

    def encode(self, img: np.ndarray) -> bytes:
        img = np.ascontiguousarray(img)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise CodecError(f"{self.name}: expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
        return _ENCODERS[self.name](img, self.params)

    def encode_many(self, images) -> list[bytes]:
        """Encode a (N, H, W, 3) uint8 batch, checked once rather than per image (the per-image
        checks cost as much as a 32 px JPEG encode)."""
        if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3:
            fn, p = _ENCODERS[self.name], self.params
            images = np.ascontiguousarray(images)  # then every image of it is contiguous too
            if self.name == "jpeg" and p["sub"] != "gray":  # the encoder bound once: ~3 us less per image
                import simplejpeg

                enc, kw = simplejpeg.encode_jpeg, _jpeg_rgb_args(p)
                return [enc(im, **kw) for im in images]
            return [fn(im, p) for im in images]
        return [self.encode(im) for im in images]

    def decode_into(self, blobs: list[bytes], out: np.ndarray) -> np.ndarray:
        """Decode blobs into ``out``, an (N, H, W, 3) uint8 batch of the expected size: JPEGs are
        decoded in place (no per-image array and no stacking copy), other codecs image by image."""
        if self.name == "jpeg" and out.flags.c_contiguous:
            import simplejpeg

            for i, b in enumerate(blobs):
                try:
                    r = simplejpeg.decode_jpeg(b, colorspace="rgb", buffer=out[i])
                except Exception as e:  # noqa: BLE001 - corrupt data, or not the expected size
                    raise CodecError(f"jpeg: cannot decode {len(b)} bytes into {out.shape[1:3]}: {e}") from None
                if r.shape != out.shape[1:]:
                    raise CodecError(f"jpeg: decoded {r.shape[:2]}, expected {tuple(out.shape[1:3])}")
            return out
        for i, b in enumerate(blobs):
            img = self.decode(b)
            if img.shape != out.shape[1:]:
                raise CodecError(f"{self.name}: decoded {img.shape[:2]}, expected {tuple(out.shape[1:3])}")
            out[i] = img
        return out

    def decode(self, data: bytes) -> np.ndarray:
        data = data if isinstance(data, bytes) else bytes(data)
        self._check_header(data)
        try:
            out = _DECODERS[self.name](data, self.params)
        except CodecError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure means corrupt data
            raise CodecError(f"{self.name}: cannot decode {len(data)} bytes: {e}") from None
        if out.ndim == 2:
            out = np.repeat(out[..., None], 3, -1)
        return out

    def _check_header(self, data) -> None:
        """Refuse an image whose header is unreadable or whose size is past the pixel limit."""
        if self.name == "raw":
            return  # a PPM is checked against its own length
        from .images import DEFAULT_MAX_PIXELS, image_dims

        dims = image_dims(data)
        if dims is None:
            raise CodecError(f"{self.name}: cannot decode {len(data)} bytes: no readable {self.name} header")
        if dims[0] * dims[1] > DEFAULT_MAX_PIXELS:
            raise CodecError(f"{self.name}: header says {dims[1]}x{dims[0]} pixels, over the limit of "
                             f"{DEFAULT_MAX_PIXELS:,}; not decoded")


def get_codec(spec: str | Codec) -> Codec:
    """Parse ``jpeg:q=85,sub=420``, ``jpegls``, ``j2k:impl=imagecodecs``... into a Codec."""
    if isinstance(spec, Codec):
        return spec
    s = str(spec).strip()
    name, _, rest = s.partition(":")
    name = ALIASES.get(name.strip().lower(), name.strip().lower())
    if name not in CODECS:
        raise CodecError(f"unknown codec {s!r}; valid: {', '.join(CODECS)}")
    allowed = CODECS[name][2]
    given = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        k, eq, v = part.partition("=")
        k = k.strip().lower()
        if not eq:
            raise CodecError(f"codec {name}: parameter {part!r} must look like name=value")
        if k not in allowed:
            raise CodecError(f"codec {name}: unknown parameter {k!r}; valid: {', '.join(allowed) or 'none'}")
        given[k] = allowed[k][1](k, v.strip())
    params = {k: given.get(k, default) for k, (default, _) in allowed.items()}
    if name == "j2k" and params["mct"] is None:
        params["mct"] = 1 if params["impl"] == "imagecodecs" else 0
    return Codec(name, params)


@functools.lru_cache(maxsize=None)
def codec_for_ext(ext: str) -> Codec:
    """The default codec of a sample extension (readers call this per sample: parsed once per ext)."""
    e = ext.lower().lstrip(".")
    if e not in EXT_TO_CODEC and e != "jpeg":
        raise CodecError(f"no codec for extension .{e}; known: {', '.join(EXT_TO_CODEC)}")
    return get_codec(EXT_TO_CODEC.get(e, "jpeg"))


def check_scheme_codec(scheme, codec: Codec | str) -> None:
    """Refuse an EtC/blockwise block size that does not align with a JPEG codec's MCU."""
    codec = get_codec(codec)
    if codec.name == "jpeg":
        bs = None if isinstance(scheme, str) else scheme.block_size
        check_jpeg_compat(scheme, bs, codec.subsampling)


# ----------------------------------------------------------------------------- implementations

def _jpeg_rgb_args(p) -> dict:
    """simplejpeg.encode_jpeg's arguments for an RGB image under codec parameters ``p``."""
    return dict(quality=p["q"], colorspace="rgb", colorsubsampling=p["sub"], fastdct=bool(p["fastdct"]))


def _jpeg_enc(img, p):
    import simplejpeg

    if p["sub"] == "gray":
        gray = np.ascontiguousarray(
            np.round(img @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8)[..., None])
        return simplejpeg.encode_jpeg(gray, quality=p["q"], colorspace="gray", fastdct=bool(p["fastdct"]))
    return simplejpeg.encode_jpeg(img, **_jpeg_rgb_args(p))


def _jpeg_dec(data, p):
    import simplejpeg

    return simplejpeg.decode_jpeg(data, colorspace="rgb")


def _pillow_enc(fmt, **kw):
    def enc(img, p):
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt, **kw)
        return buf.getvalue()
    return enc


def _j2k_enc(img, p):
    if p["impl"] == "pillow":
        kw = {"num_resolutions": p["res"]} if p["res"] else {}
        return _pillow_enc("JPEG2000", irreversible=False, mct=p["mct"], no_jp2=p["fmt"] == "j2k", **kw)(img, p)
    import imagecodecs

    kw = {"resolutions": p["res"]} if p["res"] else {}
    return imagecodecs.jpeg2k_encode(img, level=0, reversible=True, mct=bool(p["mct"]), codecformat=p["fmt"], **kw)


def _ic(fn_name, **kw):
    def enc(img, p):
        import imagecodecs

        return getattr(imagecodecs, fn_name)(img, **{k: (p[v] if isinstance(v, str) and v in p else v)
                                                     for k, v in kw.items()})
    return enc


def _ic_dec(fn_name):
    def dec(data, p):
        import imagecodecs

        return getattr(imagecodecs, fn_name)(data)
    return dec


def _raw_enc(img, p):
    h, w, _ = img.shape
    return f"P6\n{w} {h}\n255\n".encode() + img.tobytes()


def _raw_dec(data, p):
    parts = data.split(b"\n", 3)
    if len(parts) != 4 or parts[0] != b"P6" or parts[2] != b"255":
        raise CodecError("raw: not a binary PPM (P6, maxval 255)")
    w, h = map(int, parts[1].split())
    body = parts[3]
    if len(body) != w * h * 3:
        raise CodecError(f"raw: {len(body)} pixel bytes, expected {w * h * 3} for {w}x{h}")
    return np.frombuffer(body, np.uint8).reshape(h, w, 3).copy()


_ENCODERS = {
    "jpeg": _jpeg_enc,
    "jpegls": _ic("jpegls_encode"),
    "j2k": _j2k_enc,
    "png": _ic("png_encode", level="level"),
    "webp": _ic("webp_encode", lossless=True, method="method", level=100),
    "jxl": _ic("jpegxl_encode", lossless=True, effort="effort"),
    "raw": _raw_enc,
}
_DECODERS = {
    "jpeg": _jpeg_dec,
    "jpegls": _ic_dec("jpegls_decode"),
    "j2k": _ic_dec("jpeg2k_decode"),
    "png": _ic_dec("png_decode"),
    "webp": _ic_dec("webp_decode"),
    "jxl": _ic_dec("jpegxl_decode"),
    "raw": _raw_dec,
}


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _map_chunks(fn, items, workers):
    workers = default_workers() if workers is None else max(1, int(workers))
    items = list(items)
    if workers == 1 or len(items) < 64:
        return [fn(x) for x in items]
    step = -(-len(items) // (workers * 4))
    chunks = [items[i:i + step] for i in range(0, len(items), step)]
    with ThreadPoolExecutor(workers) as ex:
        return [y for part in ex.map(lambda c: [fn(x) for x in c], chunks) for y in part]


def encode_batch(codec: Codec | str, images, workers: int | None = None) -> list[bytes]:
    """Encode every image of a (N, H, W, 3) batch (or list of images), using ``workers`` threads."""
    codec = get_codec(codec)
    workers = default_workers() if workers is None else max(1, int(workers))
    n = len(images)
    if not isinstance(images, np.ndarray) or workers == 1 or n < 64:
        return codec.encode_many(images) if isinstance(images, np.ndarray) else _map_chunks(codec.encode, images, workers)
    step = -(-n // (workers * 4))
    with ThreadPoolExecutor(workers) as ex:
        return [b for part in ex.map(codec.encode_many, (images[i:i + step] for i in range(0, n, step))) for b in part]


def decode_batch(codec: Codec | str, blobs, workers: int | None = None) -> np.ndarray:
    """Decode a list of encoded images of one size into a (N, H, W, 3) batch."""
    codec = get_codec(codec)
    out = _map_chunks(codec.decode, blobs, workers)
    return np.stack(out) if out else np.zeros((0, 0, 0, 3), np.uint8)
