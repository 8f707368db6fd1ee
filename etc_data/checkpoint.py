"""Checkpoints: the file that passes between data owners and model developers.

A checkpoint is a dict saved with ``torch.save``::

    {"format": "etc-data-ckpt/1", "model": state_dict, "model_config": {...},   # models.create_model
     "normalize": {"mean": [...], "std": [...]},
     "scheme": {"scheme", "block_size", "pad", "options"}, "dataset": str, "key_fingerprint": str | None,
     "classes": [...], "image_size": [H, W], "codec": str,
     "epoch": int, "best_acc": float, "metrics": {...}, "train_config": {...},
     "optimizer": state_dict | None, "scheduler": state_dict | None, "rng": {...} | None}

A run on several owners' data (``train.py``, ``stems.py``) also writes a *joint* checkpoint, the state
``--resume`` continues from: its model holds one stem per owner (``model_config["owner_stems"]``), its
``owners`` list says whose data each stem is for (shards, dataset, key fingerprint, public key,
scheme, best accuracy), and its top-level scheme, dataset and key fingerprint are None. It is no
model for anyone's data, so every reader but ``--resume`` refuses it and points to the owners'
ordinary checkpoints (``owner-K/best.pt``).

It records which encryption (scheme, block size, key fingerprint, dataset id) its inputs must
have, so evaluation and model encryption can refuse data made for another key. Checkpoints are
read and written through the storage layer: ``s3://`` and ``gs://`` URLs work like local paths.

A checkpoint is something received from someone else, so loading it never runs code: it is read
with ``torch.load(weights_only=True)``, whose unpickler builds only tensors and plain data (dicts,
lists, tuples, strings, numbers, None) and refuses every other global. Everything saved is made of
those: the random states are stored as a tensor, lists and ints (``capture_rng``), not as numpy
objects. Anything else (a pickled ``__reduce__`` payload) is refused as "not a safe etc-data
checkpoint" before a single object of it is built.
"""

from __future__ import annotations

import io
import os
import pickle
import re

from .errors import EtcError
from .storage import StorageError, atomic_open, read_bytes

CKPT_FORMAT = "etc-data-ckpt/2"  # 2: loadable with weights_only (plain-data RNG states), public-key fingerprints


class CheckpointError(EtcError):
    """A checkpoint cannot be read, is not an etc-data checkpoint, or is for another key."""


def save_checkpoint(url: str | os.PathLike, state: dict, storage_options: dict | None = None) -> None:
    """Write atomically: a crash mid-save never leaves a half checkpoint under the name."""
    import torch

    if state.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{url}: refusing to save a dict that is not an etc-data checkpoint")
    with atomic_open(str(url), storage_options) as f:
        torch.save(state, f)


def load_checkpoint(url: str | os.PathLike, key=None, storage_options: dict | None = None,
                    joint: bool = False) -> dict:
    """Load a checkpoint; refuse it when its key fingerprint differs from the given key's, and a
    joint (several owners') checkpoint unless ``joint``."""
    import torch

    try:
        raw = read_bytes(str(url), storage_options)
    except StorageError as e:
        raise CheckpointError(f"cannot read checkpoint {url}: {e}") from None
    try:
        ck = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it would build {found.group(1)}" if found else "it holds objects other than tensors and plain data"
        raise CheckpointError(f"{url} is not a safe etc-data checkpoint: {what}; refused without loading it "
                              f"(nothing of it was run)") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {url}: {e}") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{url} is not an etc-data checkpoint (format {CKPT_FORMAT})")
    if ck.get("owners") and not joint:
        raise CheckpointError(f"{url} is the joint training state of {len(ck['owners'])} owners (for --resume); use "
                              f"one owner's checkpoint instead (owner-K/best.pt beside it)")
    fp = ck.get("key_fingerprint")
    if key is not None and fp is not None and key.fingerprint != fp:
        raise CheckpointError(f"checkpoint {url} was made for key fingerprint {fp}, not {key.fingerprint}; refused")
    return ck


def scheme_matches(scheme: dict, manifest) -> bool:
    """Whether a checkpoint's ``scheme`` record (scheme, block size, options) is that of the split
    ``manifest`` describes."""
    return (scheme.get("scheme"), scheme.get("block_size"), scheme.get("options") or {}) == \
        (manifest.scheme, manifest.block_size, manifest.scheme_options or {})


def model_from_checkpoint(ck: dict):
    """The timm model a checkpoint describes, with its weights."""
    from .models import create_model

    m = create_model(ck["model_config"])
    m.load_state_dict(ck["model"])
    return m


def capture_rng(aug_rng) -> dict:
    """Every random state a resumed run needs to continue exactly (torch, numpy, python, the
    augmentation RNG), as a tensor, lists, strings and ints only (what a safe load builds)."""
    import random

    import numpy as np
    import torch

    kind, mt, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "mt": [int(v) for v in mt], "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "python": {"version": version, "words": list(words), "gauss_next": gauss_next},
            "aug": aug_rng.bit_generator.state}


def restore_rng(state: dict, aug_rng) -> None:
    import random

    import numpy as np
    import torch

    n = state["numpy"]
    p = state["python"]
    torch.set_rng_state(state["torch"])
    np.random.set_state((n["kind"], np.asarray(n["mt"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((p["version"], tuple(p["words"]), p["gauss_next"]))
    aug_rng.bit_generator.state = state["aug"]


def train_state(*, model_state: dict, model_config: dict, normalize: dict, manifest, fingerprint: str | None,
                epoch: int, best_acc: float, optimizer: dict | None, scheduler: dict | None, rng: dict | None,
                metrics: dict, train_config: dict, owners: list[dict] | None = None) -> dict:
    """The checkpoint dict of a training run at the end of ``epoch`` (layout in the module docstring);
    with ``owners``, the joint state of a run on several owners' data (classes from ``manifest``)."""
    state = {"format": CKPT_FORMAT, "model": model_state, "model_config": model_config, "normalize": normalize,
             "scheme": manifest.scheme_params(), "dataset": manifest.dataset, "key_fingerprint": fingerprint,
             "classes": manifest.classes, "image_size": manifest.image_size, "codec": manifest.codec,
             "epoch": epoch, "best_acc": best_acc, "optimizer": optimizer, "scheduler": scheduler, "rng": rng,
             "metrics": metrics, "train_config": train_config}
    if owners:
        state.update(owners=owners, scheme=None, dataset=None, key_fingerprint=None)
    return state
