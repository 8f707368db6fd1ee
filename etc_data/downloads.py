"""Downloading the public datasets the papers use, with torchvision's own downloaders.

Nothing here runs in the tests or the pipeline by default (machines here cannot reach the
dataset hosts); the downloaded folders are ordinary sources for ``open_source``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SourceError

IMAGENETTE_URLS = {
    "full": "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz",
    "320": "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz",
    "160": "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
}


def download_cifar10(root: str | os.PathLike) -> Path:
    """Download and extract the official CIFAR-10 python archive (torchvision's code; needs internet)."""
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(str(root), train=True, download=True)
    except Exception as e:  # noqa: BLE001 - no network here is the common case
        raise SourceError(f"cannot download CIFAR-10 into {root}: {e}") from None
    return Path(root) / "cifar-10-batches-py"


def download_imagenette(root: str | os.PathLike, size: str = "160") -> Path:
    """Download and extract the official Imagenette archive (torchvision's downloader; needs internet)."""
    if size not in IMAGENETTE_URLS:
        raise SourceError(f"imagenette size {size!r} unknown; valid: {', '.join(IMAGENETTE_URLS)}")
    from torchvision.datasets.utils import download_and_extract_archive

    url = IMAGENETTE_URLS[size]
    try:
        download_and_extract_archive(url, download_root=str(root))
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"cannot download Imagenette from {url}: {e}") from None
    return Path(root) / url.rsplit("/", 1)[1].split(".")[0]
