"""Checkpoints: the file that passes between data owners and model developers.

A checkpoint is a dict saved with ``torch.save``::

    {"format": "etc-data-ckpt/1", "model": state_dict, "model_config": {...},   # models.create_model
     "normalize": {"mean": [...], "std": [...]},
     "scheme": {"scheme", "block_size", "pad", "options"}, "dataset": str, "key_fingerprint": str | None,
     "classes": [...], "image_size": [H, W], "codec": str,
     "epoch": int, "best_acc": float, "metrics": {...}, "train_config": {...},
     "optimizer": state_dict | None, "scheduler": state_dict | None, "rng": {...} | None}

It records which encryption (scheme, block size, key fingerprint, dataset id) its inputs must
have, so evaluation and model encryption can refuse data made for another key. Checkpoints are
read and written through the storage layer: ``s3://`` and ``gs://`` URLs work like local paths.
"""

from __future__ import annotations

import io
import os

from .errors import EtcError
from .storage import StorageError, atomic_open, read_bytes

CKPT_FORMAT = "etc-data-ckpt/1"


class CheckpointError(EtcError):
    """A checkpoint cannot be read, is not an etc-data checkpoint, or is for another key."""


def save_checkpoint(url: str | os.PathLike, state: dict, storage_options: dict | None = None) -> None:
    """Write atomically: a crash mid-save never leaves a half checkpoint under the name."""
    import torch

    if state.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{url}: refusing to save a dict that is not an etc-data checkpoint")
    with atomic_open(str(url), storage_options) as f:
        torch.save(state, f)


def load_checkpoint(url: str | os.PathLike, key=None, key_ref: str | None = None,
                    storage_options: dict | None = None) -> dict:
    """Load a checkpoint; refuse it when its key fingerprint differs from the given key's."""
    import torch

    try:
        raw = read_bytes(str(url), storage_options)
    except StorageError as e:
        raise CheckpointError(f"cannot read checkpoint {url}: {e}") from None
    try:
        ck = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {url}: {e}") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{url} is not an etc-data checkpoint (format {CKPT_FORMAT})")
    if key is None and key_ref is not None:
        from .keys import load_key

        key = load_key(key_ref)
    fp = ck.get("key_fingerprint")
    if key is not None and fp is not None and key.fingerprint != fp:
        raise CheckpointError(f"checkpoint {url} was made for key fingerprint {fp}, not {key.fingerprint}; refused")
    return ck


def model_from_checkpoint(ck: dict):
    """The timm model a checkpoint describes, with its weights."""
    from .models import create_model

    m = create_model(ck["model_config"])
    m.load_state_dict(ck["model"])
    return m


def capture_rng(aug_rng) -> dict:
    """Every random state a resumed run needs to continue exactly (torch, numpy, python, the augmentation RNG)."""
    import random

    import numpy as np
    import torch

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "aug": aug_rng.bit_generator.state}


def restore_rng(state: dict, aug_rng) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    aug_rng.bit_generator.state = state["aug"]


def train_state(*, model_state: dict, model_config: dict, normalize: dict, manifest, fingerprint: str | None,
                epoch: int, best_acc: float, optimizer: dict | None, scheduler: dict | None, rng: dict | None,
                metrics: dict, train_config: dict) -> dict:
    """The checkpoint dict of a training run at the end of ``epoch`` (layout in the module docstring)."""
    return {"format": CKPT_FORMAT, "model": model_state, "model_config": model_config, "normalize": normalize,
            "scheme": manifest.scheme_params(), "dataset": manifest.dataset, "key_fingerprint": fingerprint,
            "classes": manifest.classes, "image_size": manifest.image_size, "codec": manifest.codec,
            "epoch": epoch, "best_acc": best_acc, "optimizer": optimizer, "scheduler": scheduler, "rng": rng,
            "metrics": metrics, "train_config": train_config}
