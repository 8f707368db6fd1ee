"""What other readers of the shards need: a decoder for every codec, and index files.

The shards are plain WebDataset tars, so any WebDataset client reads them; what a client may
lack is a decoder for the image codec, and the index file it opens a dataset with:

- ``etc_data_handler``: a webdataset decoder handler for every image extension etc-data writes
  (``jpg``, ``jls``, ``jp2``, ``png``, ``webp``, ``jxl``, ``ppm``), decoding with the project's own
  codecs (simplejpeg, imagecodecs) to uint8 HWC arrays; ``image_handler(spec)`` gives the other
  webdataset image specs (``rgb``, ``torchrgb8``, ``torchrgb``, ``pil``). Pillow-based readers
  (webdataset's default decoder, timm's ``wds/`` reader, Hugging Face ``datasets``, torchvision)
  cannot decode JPEG-LS or JPEG XL; ``pillow_decodable`` tells, by trying, and prepare warns.
- ``decode_sample``: the same decoding for one sample dict (wids, litdata / MDS conversions).
- ``write_wids_descriptor``: ``<split>/<split>.wids.json``, the dataset description webdataset's
  indexed reader (``wids.ShardListDataset``) opens; shard URLs are relative to it and list only
  the shards the manifest lists.

``import etc_data.readers`` imports neither webdataset nor torch (torch and Pillow only load for
the image specs that return their types).
"""

from __future__ import annotations

import functools
import json

import numpy as np

from .codecs import EXT_TO_CODEC, Codec, codec_for_ext, get_codec
from .errors import EtcError
from .manifest import Manifest, split_url_of
from .storage import join, write_bytes

IMAGE_EXTS = tuple(EXT_TO_CODEC) + ("jpeg",)
IMAGE_SPECS = ("rgb8", "rgb", "torchrgb8", "torchrgb", "torch", "pil", "pilrgb")
WIDS_SUFFIX = ".wids.json"


class ReaderWarning(UserWarning):
    """The shards are fine, but some common readers cannot decode their codec."""


def _convert(img: np.ndarray, spec: str):
    if spec == "rgb8":
        return img
    if spec == "rgb":
        return img.astype(np.float32) / 255.0
    if spec in ("pil", "pilrgb"):
        from PIL import Image

        return Image.fromarray(img)
    import torch

    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    return t if spec == "torchrgb8" else t.float() / 255.0


class ImageHandler:
    """A webdataset decoder handler: ``(key, data) -> image`` for the image extensions etc-data
    writes, ``None`` for anything else (the next handler takes it). ``spec``: ``rgb8`` (uint8 HWC
    numpy, the default), ``rgb`` (float32 HWC in [0, 1]), ``torchrgb8`` (uint8 CHW tensor),
    ``torchrgb``/``torch`` (float CHW in [0, 1]), ``pil``."""

    def __init__(self, spec: str = "rgb8"):
        if spec not in IMAGE_SPECS:
            raise EtcError(f"image spec {spec!r} is not one of {', '.join(IMAGE_SPECS)}")
        self.spec = spec

    def __call__(self, key: str, data: bytes):
        ext = str(key).rsplit(".", 1)[-1].lower()
        if ext not in IMAGE_EXTS:
            return None
        return _convert(codec_for_ext(ext).decode(data), self.spec)

    def __repr__(self) -> str:
        return f"etc_data.readers.ImageHandler({self.spec!r})"


etc_data_handler = ImageHandler("rgb8")


def image_handler(spec: str = "rgb8") -> ImageHandler:
    """The handler for one of ``IMAGE_SPECS`` (``etc_data_handler`` is ``image_handler("rgb8")``)."""
    return ImageHandler(spec)


def decode_sample(sample: dict, spec: str = "rgb8") -> dict:
    """A sample dict with its image field decoded, ``cls`` as an int and ``json`` parsed. Field
    names may carry webdataset's or wids' leading dot (``jpg`` or ``.jpg``); values may be bytes
    or file objects (wids)."""
    handler = ImageHandler(spec)
    out = {}
    for k, v in sample.items():
        if hasattr(v, "read"):
            v = v.read()
        name = k.lstrip(".")
        if k.startswith("__") or not isinstance(v, (bytes, bytearray, memoryview)):
            out[k] = v
        elif name in IMAGE_EXTS:
            out[k] = handler(name, bytes(v))
        elif name == "cls":
            out[k] = int(bytes(v))
        elif name == "json":
            out[k] = json.loads(bytes(v))
        else:
            out[k] = v
    return out


@functools.lru_cache(maxsize=None)
def pillow_decodable(codec: str | Codec) -> bool:
    """Whether Pillow (hence timm, Hugging Face ``datasets``, torchvision, webdataset's default
    decoder) decodes this codec's images exactly: tried on a small image, not looked up."""
    import io

    from PIL import Image

    c = get_codec(codec)
    img = (np.arange(16 * 16 * 3, dtype=np.uint32).reshape(16, 16, 3) * 37 % 251).astype(np.uint8)
    try:
        with Image.open(io.BytesIO(c.encode(img))) as im:
            got = np.asarray(im.convert("RGB"))
    except Exception:  # noqa: BLE001 - any failure means "not readable by Pillow"
        return False
    return got.shape == img.shape and (not c.lossless or np.array_equal(got, img))


def reader_warning(codec: str | Codec) -> str | None:
    """The warning prepare gives for a codec Pillow-based readers cannot decode, else None."""
    c = get_codec(codec)
    if pillow_decodable(c.spec):
        return None
    return (f"codec {c.name} (.{c.ext} samples) is not decodable by Pillow: timm's wds reader, Hugging Face "
            f"datasets, torchvision and webdataset's default decoder cannot read these shards (DALI neither); "
            f"decode them with etc_data.readers.etc_data_handler (docs/reading.md), or choose jpeg, png, webp "
            f"or j2k")


def wids_descriptor(m: Manifest) -> dict:
    """The wids dataset description of a split: its listed shards, relative to the split folder."""
    return {"wids_version": 1, "name": f"{m.dataset}/{m.split}",
            "shardlist": [{"url": e["name"], "nsamples": int(e["samples"]), "filesize": int(e["bytes"])}
                          for e in m.shards],
            "etc_data": {"manifest": "manifest.json", "codec": m.codec, "classes": list(m.classes),
                         "note": "decode images with etc_data.readers.decode_sample"}}


def write_wids_descriptor(split_url: str, m: Manifest, storage_options: dict | None = None) -> str:
    """Write ``<split>/<split>.wids.json`` (after the manifest: it lists the manifest's shards)."""
    url = join(split_url_of(split_url), f"{m.split}{WIDS_SUFFIX}")
    write_bytes(url, (json.dumps(wids_descriptor(m), indent=1) + "\n").encode(), storage_options)
    return url
