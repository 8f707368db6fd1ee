"""The streaming trainer, readable top to bottom.

    etc-data train --shards ROOT/train --test-shards ROOT/test --key KEY --model convmixer \\
        --dim 256 --depth 8 --kernel 9 --patch 1 --epochs 100 --out runs/c10

1. read both manifests; refuse a key whose fingerprint differs from the shards' (before any
   training); check sample counts;
2. build the timm model (ConvMixer / ViT); on CUDA swap ConvMixer's depthwise convs for the
   Triton kernel when ``etc_data.dwconv`` is available;
3. the paper's recipe: AdamW (lr 0.01, wd 0.01), one-cycle schedule, mixup + CutMix (timm's
   Mixup, or block-aligned CutMix for encrypted images), mean = std = 0.5 so negative-positive
   is a sign flip, bf16 autocast on GPU;
4. every epoch: evaluate on the encrypted test shards, append ``metrics.jsonl``, redraw
   ``curves.png``, save ``last.pt`` (model, optimizer, scheduler, epoch, RNG) and ``best.pt``;
5. DDP with torchrun (gloo on CPU, nccl on GPU): every rank gets the same number of batches.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import EtcError
from .manifest import Manifest, read_manifest, split_url_of

CKPT_FORMAT = "etc-data-ckpt/1"


class TrainError(EtcError):
    pass


@dataclass
class TrainConfig:
    shards: str
    test_shards: str | None
    out: str
    key_ref: str | None = None
    model: dict = field(default_factory=lambda: {"arch": "convmixer", "dim": 256, "depth": 8, "kernel": 9, "patch": 1})
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    weight_decay: float = 0.01
    schedule: str = "onecycle"  # or "triangular"
    mixup: float = 0.8
    cutmix: float = 1.0
    cutmix_mode: str = "timm"   # "timm" (any box) or "block" (block-aligned, exact plain counterpart)
    label_smoothing: float = 0.1
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    workers: int = 2
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    amp: bool = True
    storage_options: dict = field(default_factory=dict)
    max_steps: int | None = None  # cap steps per epoch (quick runs)
    worker_start: str | None = None  # DataLoader worker start method: None (platform default, fork) or "spawn"
    stop_after: int | None = None  # stop after this many epochs of this invocation (preemptible jobs; --resume goes on)


# ----------------------------------------------------------------------------- keys & manifests

def check_key(manifest: Manifest, key_ref: str | None, where: str) -> str | None:
    """Refuse a key whose fingerprint is not the one the shards were made with."""
    if manifest.scheme == "plain":
        return None
    if manifest.key_fingerprint is None:
        raise TrainError(f"{where}: manifest has no key fingerprint for scheme {manifest.scheme}")
    from .keys import ENV_VAR, load_key

    if key_ref is None and not os.environ.get(ENV_VAR):
        raise TrainError(f"{where} holds {manifest.scheme}-encrypted shards: give the owner's key (--key) to check "
                         f"it matches fingerprint {manifest.key_fingerprint}")

    fp = load_key(key_ref).fingerprint
    if fp != manifest.key_fingerprint:
        raise TrainError(f"{where}: key fingerprint {fp} does not match the shards' {manifest.key_fingerprint}; "
                         f"wrong key (refused before training)")
    return fp


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, state: dict) -> None:
    import torch

    from .storage import atomic_open

    with atomic_open(str(path)) as f:  # a crash mid-save never leaves a half checkpoint under the name
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike, key=None, key_ref: str | None = None) -> dict:
    """Load a checkpoint; refuse it when its key fingerprint differs from the given key's."""
    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise TrainError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise TrainError(f"{path} is not an etc-data checkpoint (format {CKPT_FORMAT})")
    if key is None and key_ref is not None:
        from .keys import load_key

        key = load_key(key_ref)
    fp = ck.get("key_fingerprint")
    if key is not None and fp is not None and key.fingerprint != fp:
        raise TrainError(f"checkpoint {path} was made for key fingerprint {fp}, not {key.fingerprint}; refused")
    return ck


def model_from_checkpoint(ck: dict):
    from .models import create_model

    m = create_model(ck["model_config"])
    m.load_state_dict(ck["model"])
    return m


# ----------------------------------------------------------------------------- distributed

def dist_info() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def pick_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise TrainError(f"--device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


# ----------------------------------------------------------------------------- evaluation

def decode_mode(device, manifest: Manifest) -> str:
    """JPEG shards are decoded on the GPU when training there; everything else in the loader workers."""
    return "cuda" if (device.type == "cuda" and manifest.codec.startswith("jpeg")) else "cpu"


def evaluate_model(model, split_url: str, manifest: Manifest, device, batch_size: int = 256, workers: int = 2,
                   mean=(0.5,) * 3, std=(0.5,) * 3, storage_options=None, rank=0, world=1, worker_start=None) -> dict:
    """Accuracy over every test sample exactly once (split over ranks, then summed)."""
    import torch

    from .loader import make_loader, to_float_nchw

    dl, _, _, _ = make_loader(split_url, batch_size, rank=rank, world=world, train=False, workers=workers,
                              storage_options=storage_options, decode=decode_mode(device, manifest),
                              manifest=manifest, worker_start=worker_start)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in dl:
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


def evaluate(checkpoint: str, shards_url: str, key_ref: str | None = None, device: str = "auto",
             batch_size: int = 256, workers: int = 2, storage_options: dict | None = None) -> dict:
    """``etc-data evaluate``: a checkpoint on a split; the shards must match the checkpoint's setup."""
    dev = pick_device(device)
    split_url = split_url_of(shards_url)
    m = read_manifest(split_url, storage_options)
    ck = load_checkpoint(checkpoint, key_ref=key_ref) if key_ref else load_checkpoint(checkpoint)
    check_key(m, key_ref, split_url)
    ck_scheme = ck.get("scheme") or {}
    if m.scheme != "plain" or ck_scheme.get("scheme", "plain") != "plain":
        if ck_scheme.get("scheme") != m.scheme or ck_scheme.get("block_size") != m.block_size:
            raise TrainError(f"checkpoint expects scheme {ck_scheme.get('scheme')} block {ck_scheme.get('block_size')}, "
                             f"shards at {split_url} are {m.scheme} block {m.block_size}")
        if ck.get("key_fingerprint") not in (None, m.key_fingerprint):
            raise TrainError(f"checkpoint key fingerprint {ck.get('key_fingerprint')} differs from the shards' "
                             f"{m.key_fingerprint}")
    model = model_from_checkpoint(ck).to(dev)
    norm = ck.get("normalize", {"mean": [0.5] * 3, "std": [0.5] * 3})
    return evaluate_model(model, split_url, m, dev, batch_size, workers, norm["mean"], norm["std"], storage_options)


# ----------------------------------------------------------------------------- training

def lr_factor(schedule: str, total: int):
    """Learning-rate multiplier per step. onecycle: linear warm-up over the first 25 %, then cosine
    to 0; triangular (the ConvMixer paper's): linear up to the peak at 40 %, linear down to 0."""
    peak = max(1, round((0.25 if schedule == "onecycle" else 0.4) * total))

    def f(step: int) -> float:
        if step < peak:
            return (step + 1) / peak
        rest = max(1, total - peak)
        t = min(1.0, (step - peak) / rest)
        return 0.5 * (1 + math.cos(math.pi * t)) if schedule == "onecycle" else 1.0 - t

    return f


def _plot(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [m["epoch"] for m in metrics]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(ep, [m["train_loss"] for m in metrics], marker="o")
    ax[0].set_xlabel("epoch"), ax[0].set_ylabel("train loss")
    ax[1].plot(ep, [m["test_acc"] for m in metrics], marker="o", color="C1")
    ax[1].set_xlabel("epoch"), ax[1].set_ylabel("test accuracy")
    fig.tight_layout()
    from .storage import atomic_open

    with atomic_open(str(path)) as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def train(cfg: TrainConfig, progress: bool = True) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from .loader import make_loader, to_float_nchw
    from .models import create_model, patch_size

    rank, world, local_rank = dist_info()
    device = pick_device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    # 1. manifests and key, before anything expensive
    train_url = split_url_of(cfg.shards)
    m_train = read_manifest(train_url, cfg.storage_options)
    fp = check_key(m_train, cfg.key_ref, train_url)
    m_test, test_url = None, None
    if cfg.test_shards:
        test_url = split_url_of(cfg.test_shards)
        m_test = read_manifest(test_url, cfg.storage_options)
        check_key(m_test, cfg.key_ref, test_url)
        same = ("scheme", "block_size", "key_fingerprint", "dataset", "classes", "image_size")
        diff = [k for k in same if getattr(m_test, k) != getattr(m_train, k)]
        if diff:
            raise TrainError(f"{test_url} differs from {train_url} in {', '.join(diff)}")
    if m_train.num_samples < world * cfg.batch_size:
        raise TrainError(f"{train_url}: {m_train.num_samples} samples are fewer than one batch per rank "
                         f"({world} x {cfg.batch_size})")

    # 2. model
    mcfg = dict(cfg.model, num_classes=len(m_train.classes), img_size=m_train.image_size[0])
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = create_model(mcfg).to(device)
    if device.type == "cuda" and mcfg["arch"] == "convmixer":
        try:
            from .dwconv import patch_convmixer
        except ImportError:
            patch_convmixer = None
        if patch_convmixer is not None:
            model = patch_convmixer(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    core = model.module if world > 1 else model

    # 3. data and recipe
    dl, ds, _, steps = make_loader(train_url, cfg.batch_size, rank=rank, world=world, seed=cfg.seed, train=True,
                                   workers=cfg.workers, storage_options=cfg.storage_options,
                                   decode=decode_mode(device, m_train),
                                   manifest=m_train, worker_start=cfg.worker_start)
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    if steps < 1:
        raise TrainError(f"{train_url}: no full batch per rank with batch size {cfg.batch_size}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = steps * cfg.epochs
    if cfg.schedule not in ("onecycle", "triangular"):
        raise TrainError(f"schedule must be onecycle or triangular, got {cfg.schedule!r}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.schedule, total))
    ncls = len(m_train.classes)
    mixer = None
    if cfg.cutmix_mode == "timm" and (cfg.mixup > 0 or cfg.cutmix > 0):
        from timm.data import Mixup

        mixer = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=ncls)
    elif cfg.cutmix_mode not in ("timm", "block"):
        raise TrainError(f"cutmix mode must be timm or block, got {cfg.cutmix_mode!r}")
    block = m_train.block_size or patch_size(mcfg)
    aug_rng = np.random.default_rng(cfg.seed + rank)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: list[dict] = []
    start_epoch, best = 0, -1.0
    if cfg.resume and (out / "last.pt").exists():
        ck = load_checkpoint(out / "last.pt", key_ref=cfg.key_ref if fp else None)
        core.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start_epoch, best = ck["epoch"] + 1, ck.get("best_acc", -1.0)
        torch.set_rng_state(ck["rng"]["torch"])
        np.random.set_state(ck["rng"]["numpy"])
        random.setstate(ck["rng"]["python"])
        aug_rng.bit_generator.state = ck["rng"]["aug"]
        if (out / "metrics.jsonl").exists():
            metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
            metrics = [m for m in metrics if m["epoch"] < start_epoch]

    def soft_targets(y):
        return F.one_hot(y, ncls).float() * (1 - cfg.label_smoothing) + cfg.label_smoothing / ncls

    end_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start_epoch + cfg.stop_after)
    for epoch in range(start_epoch, end_epoch):
        model.train()
        ds.epoch = epoch
        t0, seen, loss_sum, n_steps = time.time(), 0, 0.0, 0
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        for i, (x, y) in enumerate(dl):
            if i >= steps:
                break
            x = to_float_nchw(x, device, cfg.mean, cfg.std)
            y = y.to(device)
            if mixer is not None:
                x, t = mixer(x, y)
            elif cfg.cutmix_mode == "block":
                t = soft_targets(y)
                if cfg.mixup > 0 and aug_rng.random() < 0.5:  # mixup commutes with encryption too
                    lam = float(aug_rng.beta(cfg.mixup, cfg.mixup))
                    x, t = lam * x + (1 - lam) * x.flip(0), lam * t + (1 - lam) * t.flip(0)
                elif cfg.cutmix > 0:
                    from .augment import block_cutmix

                    x, t = block_cutmix(x, t, block, cfg.cutmix, aug_rng)
            else:
                t = soft_targets(y)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=(device.type == "cuda" and cfg.amp)):
                logits = model(x)
            loss = torch.sum(-t * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
            loss_sum += float(loss.detach())
            n_steps += 1
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / n_steps:.3f}", img_s=f"{seen * world / (time.time() - t0):.0f}")
        if bar:
            bar.close()
        if n_steps < steps:
            raise TrainError(f"{train_url}: epoch {epoch} gave {n_steps} batches, expected {steps}")
        train_time = time.time() - t0
        row = {"epoch": epoch, "train_loss": loss_sum / n_steps, "img_per_s": seen * world / train_time,
               "lr": sched.get_last_lr()[0], "steps": n_steps, "time_s": round(train_time, 2)}
        if m_test is not None:
            ev = evaluate_model(model, test_url, m_test, device, max(cfg.batch_size, 128), cfg.workers, cfg.mean,
                                cfg.std, cfg.storage_options, rank, world, cfg.worker_start)
            row.update(test_acc=ev["accuracy"], test_samples=ev["samples"])
        else:
            row.update(test_acc=None, test_samples=0)
        metrics.append(row)
        if rank == 0:
            state = {"format": CKPT_FORMAT, "model": core.state_dict(), "model_config": mcfg,
                     "normalize": {"mean": list(cfg.mean), "std": list(cfg.std)},
                     "scheme": m_train.scheme_params(), "dataset": m_train.dataset, "key_fingerprint": fp,
                     "classes": m_train.classes, "image_size": m_train.image_size, "codec": m_train.codec,
                     "epoch": epoch, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate(), "aug": aug_rng.bit_generator.state},
                     "metrics": row, "train_config": {k: v for k, v in asdict(cfg).items() if k != "storage_options"}}
            acc = row["test_acc"] if row["test_acc"] is not None else -row["train_loss"]
            if acc > best:
                best = acc
                state["best_acc"] = best
                save_checkpoint(out / "best.pt", state)
            state["best_acc"] = best
            save_checkpoint(out / "last.pt", state)
            with open(out / "metrics.jsonl", "w") as f:
                for m in metrics:
                    f.write(json.dumps(m) + "\n")
            _plot(metrics, out / "curves.png")
            if progress:
                print(json.dumps(row), flush=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return metrics
