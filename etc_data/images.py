"""Plain images in and out of files: decoding to uint8 RGB arrays and the resize policy.

``decode_image`` turns the bytes of any common image file into an ``(H, W, 3)`` uint8 array:
JPEGs through libjpeg-turbo (simplejpeg, several times faster than Pillow on small images),
everything else, and any JPEG that simplejpeg rejects, through Pillow. Grayscale, palette and
alpha images become RGB explicitly. ``resize_shorter_center_crop`` is the one resize policy a
manifest can record: shorter side to S (bicubic), then a centred S x S crop.
"""

from __future__ import annotations

import io

import numpy as np

from .errors import SourceError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode image bytes to (H, W, 3) uint8; a SourceError naming ``name`` when it cannot be."""
    if data[:2] == b"\xff\xd8":
        try:
            import simplejpeg

            return simplejpeg.decode_jpeg(data, colorspace="rgb")
        except (ImportError, ValueError):
            pass  # CMYK, progressive oddities, truncated data: Pillow decides (and names the file)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SourceError(f"cannot decode image {name}: {e}") from None


def decode_jpeg_into(data: bytes, out: np.ndarray) -> bool:
    """Decode a JPEG straight into ``out`` (H, W, 3) uint8 when it is one of exactly that size
    (no per-image array, no copy); False when it is not (the caller then uses ``decode_image``)."""
    if data[:2] != b"\xff\xd8" or not out.flags.c_contiguous:
        return False
    try:
        import simplejpeg

        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        if (h, w) != out.shape[:2]:
            return False
        simplejpeg.decode_jpeg(data, colorspace="rgb", buffer=out)
        return True
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
