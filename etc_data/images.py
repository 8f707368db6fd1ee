"""Plain images in and out of files: decoding to uint8 RGB arrays, size limits and the resize policy.

``decode_image`` turns the bytes of any common image file into an ``(H, W, 3)`` uint8 array:
JPEGs through libjpeg-turbo (simplejpeg, several times faster than Pillow on small images),
everything else, and any JPEG that simplejpeg rejects, through Pillow. Grayscale, palette and
alpha images become RGB explicitly; 16-bit images are scaled to 8 bits (``round(v * 255 /
65535)``), never clipped; 32-bit and floating-point images are refused.

Bombs: ``ImageLimits`` bounds what one image may cost before anything is decoded or inflated:
``max_pixels`` (width x height, read from the header; default Pillow's own error threshold,
178,956,970, which no real dataset reaches) and ``max_bytes`` (the encoded file, or an archive
member before it is inflated; default 1 GiB). An image past a limit is a bad image like any other:
a ``SourceError`` naming it. ``image_dims`` reads width and height from the header of every format
the codecs write (JPEG, JPEG-LS, PNG, JPEG 2000, WebP, JPEG XL), so shard decoders check too.

``resize_shorter_center_crop`` is the one resize policy a manifest can record: shorter side to S
(bicubic), then a centred S x S crop.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from .errors import SourceError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_MAX_PIXELS = 178_956_970   # Pillow's DecompressionBombError threshold (2 x MAX_IMAGE_PIXELS)
DEFAULT_MAX_BYTES = 1 << 30        # one encoded image file or archive member


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost: pixels (from its header) and bytes (encoded or still compressed)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self):
        for name in ("max_pixels", "max_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SourceError(f"max-image-{name[4:]} must be a positive integer, got {v!r}")

    def check_pixels(self, h: int, w: int, name: str) -> None:
        if h * w > self.max_pixels:
            raise SourceError(f"{name}: image is {w}x{h} = {w * h:,} pixels, over the limit of {self.max_pixels:,} "
                              f"(a decompression bomb or a huge image; raise it with --max-image-pixels)")

    def check_bytes(self, n: int, name: str, what: str = "file") -> None:
        if n > self.max_bytes:
            raise SourceError(f"{name}: {what} is {n:,} bytes, over the limit of {self.max_bytes:,} "
                              f"(raise it with --max-image-bytes)")


DEFAULT_LIMITS = ImageLimits()


def decode_image(data: bytes, name: str, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode image bytes to (H, W, 3) uint8; a SourceError naming ``name`` when it cannot be, or
    when it is over ``limits`` (checked from the header, before decoding)."""
    limits.check_bytes(len(data), name)
    dims = image_dims(data)
    if dims is not None:
        limits.check_pixels(*dims, name)
    if data[:2] == b"\xff\xd8":
        try:
            import simplejpeg

            return simplejpeg.decode_jpeg(data, colorspace="rgb")
        except (ImportError, ValueError):
            pass  # CMYK, progressive oddities, truncated data: Pillow decides (and names the file)
    return _decode_pillow(data, name, limits)


def _decode_pillow(data: bytes, name: str, limits: ImageLimits) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if Image.MAX_IMAGE_PIXELS is not None and limits.max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = -(-limits.max_pixels // 2)  # the user raised the limit: Pillow follows
    try:
        with Image.open(io.BytesIO(data)) as im:
            limits.check_pixels(im.height, im.width, name)
            im.load()
            return _to_rgb8(im, name)
    except Image.DecompressionBombError as e:
        raise SourceError(f"{name}: {e} (raise the limit with --max-image-pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SourceError(f"cannot decode image {name}: {e}") from None


def _to_rgb8(im, name: str) -> np.ndarray:
    """A loaded Pillow image as (H, W, 3) uint8. 16-bit gray is scaled, not clipped (Pillow's
    convert would turn 40000 into 255); Pillow itself reduces 16-bit colour PNGs to 8 bits."""
    if im.mode.startswith("I;16") or im.mode == "I":
        v = np.asarray(im)
        if v.size and (int(v.min()) < 0 or int(v.max()) > 65535):
            raise SourceError(f"cannot decode image {name}: 32-bit integer pixels (mode {im.mode}) have no 8-bit "
                              f"scale; convert it to 8 or 16 bits first")
        g = ((v.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(g[..., None], 3, -1)
    if im.mode == "F":
        raise SourceError(f"cannot decode image {name}: floating-point pixels (mode F) have no 8-bit scale")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


# ----------------------------------------------------------------------------- header sizes

def image_dims(data: bytes) -> tuple[int, int] | None:
    """(height, width) from an image's header, without decoding it; None for a format not parsed
    here (Pillow reads those headers itself) or a header too broken to read."""
    head = bytes(data[:16])
    try:
        if head[:2] == b"\xff\xd8":
            return _jpeg_dims(data)
        if head[:8] == b"\x89PNG\r\n\x1a\n":
            return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp_dims(data)
        if head[:4] == b"\xff\x4f\xff\x51" or head[4:8] == b"jP  ":
            return _j2k_dims(data)
        if head[:2] == b"\xff\x0a" or head[4:12] == b"JXL \r\n\x87\n":
            return _jxl_dims(data)
    except (IndexError, ValueError):
        return None
    return None


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # + JPEG-LS SOF55


def _jpeg_dims(d: bytes) -> tuple[int, int] | None:
    i, n = 2, len(d)
    while i + 4 <= n:
        if d[i] != 0xFF:
            return None
        m = d[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
            i += 2
            continue
        if m in _SOF:
            return int.from_bytes(d[i + 5:i + 7], "big"), int.from_bytes(d[i + 7:i + 9], "big")
        i += 2 + int.from_bytes(d[i + 2:i + 4], "big")
    return None


def _webp_dims(d: bytes) -> tuple[int, int] | None:
    kind = d[12:16]
    if kind == b"VP8 ":
        return int.from_bytes(d[28:30], "little") & 0x3FFF, int.from_bytes(d[26:28], "little") & 0x3FFF
    if kind == b"VP8L":
        bits = int.from_bytes(d[21:25], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if kind == b"VP8X":
        return int.from_bytes(d[27:30], "little") + 1, int.from_bytes(d[24:27], "little") + 1
    return None


def _j2k_dims(d: bytes) -> tuple[int, int] | None:
    """From the codestream's SIZ marker (what the decoder allocates by), in a JP2 file or bare."""
    i = d.find(b"\xff\x4f\xff\x51")
    if i < 0 or i + 24 > len(d):
        return None
    x, y, x0, y0 = (int.from_bytes(d[i + k:i + k + 4], "big") for k in (8, 12, 16, 20))
    return y - y0, x - x0


def _jxl_dims(d: bytes) -> tuple[int, int] | None:
    """JPEG XL SizeHeader (ISO/IEC 18181-1 D.2), in a bare codestream or the first jxlc/jxlp box."""
    if d[:2] != b"\xff\x0a":
        d = _jxl_codestream(d)
        if d is None or d[:2] != b"\xff\x0a":
            return None
    bits = int.from_bytes(d[2:18], "little")
    pos = 0

    def u(n: int) -> int:
        nonlocal pos
        v = (bits >> pos) & ((1 << n) - 1)
        pos += n
        return v

    def size(small: bool) -> int:
        return (u(5) + 1) * 8 if small else u((9, 13, 18, 30)[u(2)]) + 1

    small = bool(u(1))
    h = size(small)
    ratio = u(3)
    if ratio == 0:
        return h, size(small)
    num, den = ((1, 1), (12, 10), (4, 3), (3, 2), (16, 9), (5, 4), (2, 1))[ratio - 1]
    return h, h * num // den


def _jxl_codestream(d: bytes) -> bytes | None:
    i = 0
    while i + 8 <= len(d):
        n, kind = int.from_bytes(d[i:i + 4], "big"), d[i + 4:i + 8]
        head = 8
        if n == 1:
            n, head = int.from_bytes(d[i + 8:i + 16], "big"), 16
        elif n == 0:
            n = len(d) - i
        if kind == b"jxlc":
            return d[i + head:i + head + 32]
        if kind == b"jxlp":
            return d[i + head + 4:i + head + 36]
        if n < head:
            return None
        i += n
    return None


def decode_jpeg_into(data: bytes, out: np.ndarray, name: str, limits: ImageLimits = DEFAULT_LIMITS) -> bool:
    """Decode a JPEG straight into ``out`` (H, W, 3) uint8 when it is one of exactly that size
    (no per-image array, no copy); False when it is not (the caller then uses ``decode_image``;
    ``out`` may hold part of a smaller image by then).
    The byte limit is checked here; the pixel limit holds since ``out`` is the size of an image
    that passed it."""
    if data[:2] != b"\xff\xd8" or not out.flags.c_contiguous:
        return False
    limits.check_bytes(len(data), name)
    try:
        import simplejpeg

        # (simplejpeg reads the header first: an image larger than ``out`` is refused before any
        # decoding, a smaller one comes back with its own shape)
        return simplejpeg.decode_jpeg(data, colorspace="rgb", buffer=out).shape == out.shape
    except (ImportError, ValueError):
        return False


def resize_shorter_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is ``size`` (bicubic, Pillow), then centre-crop to size x size."""
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    from PIL import Image

    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    im = Image.fromarray(img).resize((nw, nh), Image.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))
