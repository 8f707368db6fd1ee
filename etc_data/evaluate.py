"""The evaluate job: a checkpoint's accuracy on a split of (encrypted) shards.

    from etc_data import EvalConfig, evaluate_checkpoint
    evaluate_checkpoint(EvalConfig(checkpoint="runs/c10/best.pt", shards="ROOT/test"))
    # {"accuracy": 0.91, "samples": 10000}

The shards must be what the checkpoint was made for: the same scheme, block size and key
fingerprint, in a manifest signed by a trusted owner (``trust``; the owner key, when one is given,
is trusted). No key is needed. Every sample is seen exactly once, also when the work is split over
DDP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import EtcError
from .manifest import read_manifest, split_url_of


class EvalError(EtcError):
    pass


@dataclass
class EvalConfig:
    checkpoint: str                 # a checkpoint file or URL
    shards: str                     # split URL (ROOT/test)
    key_ref: str | None = None      # optional: evaluation needs no key (an owner's own key is checked)
    trust: list[str] = field(default_factory=list)  # accepted signers: public keys or files; [] = trust on first use
    device: str = "auto"
    batch_size: int = 256
    workers: int = 2
    storage_options: dict = field(default_factory=dict)
    worker_start: str | None = None  # DataLoader worker start method (None: the platform default)


def evaluate_model(model, loader, device, mean=(0.5,) * 3, std=(0.5,) * 3, world: int = 1) -> dict:
    """Accuracy over every sample the loader yields (on each rank, then summed over ranks)."""
    import torch

    from .loader import to_float_nchw

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            x = to_float_nchw(x, device, mean, std)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x)
            correct += int((logits.argmax(1).cpu() == y).sum())
            total += len(y)
    if world > 1:
        import torch.distributed as dist

        t = torch.tensor([correct, total], dtype=torch.long, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        correct, total = int(t[0]), int(t[1])
    return {"accuracy": correct / max(1, total), "samples": total}


def evaluate_checkpoint(cfg: EvalConfig) -> dict:
    """``{"accuracy", "samples"}`` of a checkpoint on a split; the shards must match the checkpoint's setup."""
    from .checkpoint import load_checkpoint, model_from_checkpoint, scheme_matches
    from .keys import optional_key
    from .loader import make_loader
    from .train import decode_mode, matching_fingerprint, pick_device
    from .trust import TrustPolicy

    dev = pick_device(cfg.device)
    split_url = split_url_of(cfg.shards)
    key = optional_key(cfg.key_ref)
    m = read_manifest(split_url, cfg.storage_options, TrustPolicy.from_refs(cfg.trust, key))
    ck = load_checkpoint(cfg.checkpoint, key=key, storage_options=cfg.storage_options)
    matching_fingerprint(m, key, split_url)
    ck_scheme = ck.get("scheme") or {}
    if m.scheme != "plain" or ck_scheme.get("scheme", "plain") != "plain":
        if not scheme_matches(ck_scheme, m):
            raise EvalError(f"checkpoint expects scheme {ck_scheme.get('scheme')} block {ck_scheme.get('block_size')} "
                            f"options {ck_scheme.get('options') or {}}, shards at {split_url} are {m.scheme} block "
                            f"{m.block_size} options {m.scheme_options or {}}")
    if ck.get("key_fingerprint") != m.key_fingerprint:
        raise EvalError(f"checkpoint {cfg.checkpoint} was made for key fingerprint {ck.get('key_fingerprint')}, "
                        f"the shards at {split_url} carry {m.key_fingerprint}; refused")
    model = model_from_checkpoint(ck).to(dev)
    norm = ck.get("normalize", {"mean": [0.5] * 3, "std": [0.5] * 3})
    loader = make_loader(split_url, cfg.batch_size, train=False, workers=cfg.workers,
                         storage_options=cfg.storage_options, decode=decode_mode(dev, m), manifest=m,
                         worker_start=cfg.worker_start)[0]
    return evaluate_model(model, loader, dev, norm["mean"], norm["std"])
