"""The train job: a streaming trainer, readable top to bottom.

    etc-data train --shards ROOT/train --test-shards ROOT/test --trust OWNER.pub --model convmixer \\
        --dim 256 --depth 8 --kernel 9 --patch 1 --epochs 100 --out runs/c10

    from etc_data import TrainConfig, train_model
    metrics = train_model(TrainConfig(shards="ROOT/train", test_shards="ROOT/test", out="runs/c10"))

``train_model`` runs these named steps in order:

1. ``setup_distributed``: rank, world size and device (DDP through torchrun: gloo on CPU, nccl on GPU);
2. ``read_splits``: both manifests (signatures checked against the trusted owners, ``trust``), the
   key fingerprint check when a key is given (none is needed), sample counts (before anything expensive);
3. ``build_model``: the timm ConvMixer / ViT; on CUDA ConvMixer's depthwise convs become the
   Triton kernels of ``etc_data.dwconv`` when available;
4. the data: a streaming loader per split (``loader.make_loader``), each built once;
5. the paper's recipe: AdamW (lr 0.01, wd 0.01), one-cycle schedule (``lr_factor``), mixup + CutMix
   (``BatchMixer``: timm's Mixup, or block-aligned CutMix with an exact plain counterpart), mean =
   std = 0.5 so negative-positive is a sign flip, bf16 autocast on GPU;
6. every epoch: ``train_step`` per batch, ``evaluate_model`` on the test split, then
   ``metrics.jsonl``, ``curves.png``, ``last.pt`` and ``best.pt`` (``checkpoint.train_state``) in
   ``out``, through the storage layer (``--out s3://...`` works).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import EtcError
from .manifest import Manifest, read_manifest, split_url_of
from .models import convmixer_config
from .storage import exists, join, read_bytes, write_bytes


class TrainError(EtcError):
    pass


@dataclass
class TrainConfig:
    shards: str                      # train split URL (ROOT/train)
    out: str                         # output folder or URL (checkpoints, metrics.jsonl, curves.png)
    test_shards: str | None = None   # test split URL, evaluated every epoch
    key_ref: str | None = None       # optional: training needs no key (an owner's own key is checked)
    trust: list[str] = field(default_factory=list)  # accepted signers: public keys or files; [] = trust on first use
    model: dict = field(default_factory=convmixer_config)
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

    def check(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in ("onecycle", "triangular"):
            raise TrainError(f"schedule must be onecycle or triangular, got {self.schedule!r}")
        if self.cutmix_mode not in ("timm", "block"):
            raise TrainError(f"cutmix mode must be timm or block, got {self.cutmix_mode!r}")
        if self.workers < 0:
            raise TrainError(f"workers must be >= 0, got {self.workers}")


# ----------------------------------------------------------------------------- 1. distributed

@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: "torch.device"

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise TrainError(f"--device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


def setup_distributed(device_name: str) -> Dist:
    """Rank and world size from torchrun's environment; the process group is joined when world > 1."""
    import os

    import torch

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_name)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


# ----------------------------------------------------------------------------- 2. manifests and key

def matching_fingerprint(manifest: Manifest, key, where: str) -> str | None:
    """The shards' key fingerprint (None for plain shards). Training needs no key; an owner key
    given anyway (``--key``, $ETC_DATA_KEY) must be the shards' own, else it is refused here."""
    if manifest.scheme == "plain":
        return None
    if key is not None and key.fingerprint != manifest.key_fingerprint:
        raise TrainError(f"{where}: key fingerprint {key.fingerprint} does not match the shards' "
                         f"{manifest.key_fingerprint}; wrong key (refused before training)")
    return manifest.key_fingerprint


@dataclass
class Splits:
    train_url: str
    train: Manifest
    fingerprint: str | None
    test_url: str | None = None
    test: Manifest | None = None


def read_splits(cfg: TrainConfig, world: int) -> Splits:
    """Both manifests (signatures checked against the trusted owners), checked against the key
    when one is given and against each other, before anything expensive."""
    from .keys import optional_key
    from .trust import TrustPolicy

    key = optional_key(cfg.key_ref)
    trust = TrustPolicy.from_refs(cfg.trust, key)
    train_url = split_url_of(cfg.shards)
    m_train = read_manifest(train_url, cfg.storage_options, trust)
    fp = matching_fingerprint(m_train, key, train_url)
    out = Splits(train_url, m_train, fp)
    if cfg.test_shards:
        out.test_url = split_url_of(cfg.test_shards)
        out.test = read_manifest(out.test_url, cfg.storage_options, trust.after_first_use(m_train.public_key))
        matching_fingerprint(out.test, key, out.test_url)
        same = ("scheme", "block_size", "key_fingerprint", "dataset", "classes", "image_size")
        diff = [k for k in same if getattr(out.test, k) != getattr(m_train, k)]
        if diff:
            raise TrainError(f"{out.test_url} differs from {train_url} in {', '.join(diff)}")
    if m_train.num_samples < world * cfg.batch_size:
        raise TrainError(f"{train_url}: {m_train.num_samples} samples are fewer than one batch per rank "
                         f"({world} x {cfg.batch_size})")
    return out


# ----------------------------------------------------------------------------- 3. model

def build_model(model_config: dict, dist: Dist, seed: int):
    """(model to train, its core module): the timm model on the device, Triton depthwise convs on
    CUDA, wrapped in DDP when world > 1."""
    import torch

    from .models import create_model

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = create_model(model_config).to(dist.device)
    if dist.device.type == "cuda" and model_config["arch"] == "convmixer":
        try:
            from .dwconv import patch_convmixer
        except ImportError:
            patch_convmixer = None
        if patch_convmixer is not None:
            model = patch_convmixer(model)
    if dist.world > 1:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids), model
    return model, model


# ----------------------------------------------------------------------------- 5. recipe

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


class BatchMixer:
    """Mixes a batch and gives its soft targets: timm's Mixup/CutMix (``cutmix_mode="timm"``),
    block-aligned CutMix or mixup (``"block"``: both have exact plain counterparts on EtC images),
    or label smoothing only (both alphas 0)."""

    def __init__(self, cfg: TrainConfig, num_classes: int, block: int, rng: np.random.Generator):
        self.cfg, self.ncls, self.block, self.rng = cfg, num_classes, block, rng
        self.timm = None
        if cfg.cutmix_mode == "timm" and (cfg.mixup > 0 or cfg.cutmix > 0):
            from timm.data import Mixup

            self.timm = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                              num_classes=num_classes)

    def smooth(self, y):
        import torch.nn.functional as F

        eps = self.cfg.label_smoothing
        return F.one_hot(y, self.ncls).float() * (1 - eps) + eps / self.ncls

    def __call__(self, x, y):
        if self.timm is not None:
            return self.timm(x, y)
        t = self.smooth(y)
        if self.cfg.cutmix_mode != "block":
            return x, t
        if self.cfg.mixup > 0 and self.rng.random() < 0.5:  # mixup commutes with encryption too
            lam = float(self.rng.beta(self.cfg.mixup, self.cfg.mixup))
            return lam * x + (1 - lam) * x.flip(0), lam * t + (1 - lam) * t.flip(0)
        if self.cfg.cutmix > 0:
            from .augment import block_cutmix

            return block_cutmix(x, t, self.block, self.cfg.cutmix, self.rng)
        return x, t


def train_step(model, opt, sched, x, targets, amp: bool) -> float:
    """One optimiser step on a mixed batch (soft-target cross-entropy); returns the loss."""
    import torch
    import torch.nn.functional as F

    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=(x.device.type == "cuda" and amp)):
        logits = model(x)
    loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


# ----------------------------------------------------------------------------- 6. outputs

def _plot(metrics: list[dict], url: str, storage_options: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .storage import atomic_open

    ep = [m["epoch"] for m in metrics]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(ep, [m["train_loss"] for m in metrics], marker="o")
    ax[0].set_xlabel("epoch"), ax[0].set_ylabel("train loss")
    ax[1].plot(ep, [m["test_acc"] for m in metrics], marker="o", color="C1")
    ax[1].set_xlabel("epoch"), ax[1].set_ylabel("test accuracy")
    fig.tight_layout()
    with atomic_open(url, storage_options) as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def _read_metrics(out: str, before_epoch: int, storage_options: dict) -> list[dict]:
    url = join(out, "metrics.jsonl")
    if not exists(url, storage_options):
        return []
    rows = [json.loads(line) for line in read_bytes(url, storage_options).decode().splitlines() if line.strip()]
    return [m for m in rows if m["epoch"] < before_epoch]


def _write_outputs(out: str, metrics: list[dict], state: dict, is_best: bool, storage_options: dict) -> None:
    from .checkpoint import save_checkpoint

    if is_best:
        save_checkpoint(join(out, "best.pt"), state, storage_options)
    save_checkpoint(join(out, "last.pt"), state, storage_options)
    write_bytes(join(out, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics).encode(), storage_options)
    _plot(metrics, join(out, "curves.png"), storage_options)


# ----------------------------------------------------------------------------- the job

def decode_mode(device, manifest: Manifest) -> str:
    """JPEG shards are decoded on the GPU when training there; everything else in the loader workers."""
    return "cuda" if (device.type == "cuda" and manifest.codec.startswith("jpeg")) else "cpu"


def train_model(cfg: TrainConfig, progress: bool = True) -> list[dict]:
    """Train on (encrypted) shards, streamed; returns one metrics row per epoch of this run."""
    import torch

    from .checkpoint import capture_rng, load_checkpoint, restore_rng, train_state
    from .evaluate import evaluate_model
    from .loader import make_loader, to_float_nchw
    from .models import patch_size

    cfg.check()
    dist = setup_distributed(cfg.device)
    data = read_splits(cfg, dist.world)
    m_train = data.train
    mcfg = dict(cfg.model, num_classes=len(m_train.classes), img_size=m_train.image_size[0])
    model, core = build_model(mcfg, dist, cfg.seed)

    dl, ds, _, steps = make_loader(data.train_url, cfg.batch_size, rank=dist.rank, world=dist.world, seed=cfg.seed,
                                   train=True, workers=cfg.workers, storage_options=cfg.storage_options,
                                   decode=decode_mode(dist.device, m_train), manifest=m_train,
                                   worker_start=cfg.worker_start)
    test_dl = None
    if data.test is not None:
        test_dl = make_loader(data.test_url, max(cfg.batch_size, 128), rank=dist.rank, world=dist.world, train=False,
                              workers=cfg.workers, storage_options=cfg.storage_options,
                              decode=decode_mode(dist.device, data.test), manifest=data.test,
                              worker_start=cfg.worker_start)[0]
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    if steps < 1:
        raise TrainError(f"{data.train_url}: no full batch per rank with batch size {cfg.batch_size}")

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.schedule, steps * cfg.epochs))
    aug_rng = np.random.default_rng(cfg.seed + dist.rank)
    mixer = BatchMixer(cfg, len(m_train.classes), m_train.block_size or patch_size(mcfg), aug_rng)

    metrics: list[dict] = []
    start_epoch, best = 0, -1.0
    last_url = join(cfg.out, "last.pt")
    if cfg.resume and exists(last_url, cfg.storage_options):
        ck = load_checkpoint(last_url, storage_options=cfg.storage_options)
        if ck.get("key_fingerprint") != data.fingerprint or ck.get("dataset") != m_train.dataset:
            raise TrainError(f"{last_url} was trained on dataset {ck.get('dataset')} with key fingerprint "
                             f"{ck.get('key_fingerprint')}, not on {data.train_url} (dataset {m_train.dataset}, "
                             f"key fingerprint {data.fingerprint}); refusing to resume")
        core.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        restore_rng(ck["rng"], aug_rng)
        start_epoch, best = ck["epoch"] + 1, ck.get("best_acc", -1.0)
        metrics = _read_metrics(cfg.out, start_epoch, cfg.storage_options)

    end_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start_epoch + cfg.stop_after)
    for epoch in range(start_epoch, end_epoch):
        model.train()
        ds.epoch = epoch
        t0, seen, loss_sum, n_steps = time.time(), 0, 0.0, 0
        bar = None
        if progress and dist.main:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        for i, (x, y) in enumerate(dl):
            if i >= steps:
                break
            x, targets = mixer(to_float_nchw(x, dist.device, cfg.mean, cfg.std), y.to(dist.device))
            loss_sum += train_step(model, opt, sched, x, targets, cfg.amp)
            seen += len(y)
            n_steps += 1
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / n_steps:.3f}", img_s=f"{seen * dist.world / (time.time() - t0):.0f}")
        if bar:
            bar.close()
        if n_steps < steps:
            raise TrainError(f"{data.train_url}: epoch {epoch} gave {n_steps} batches, expected {steps}")
        train_time = time.time() - t0
        row = {"epoch": epoch, "train_loss": loss_sum / n_steps, "img_per_s": seen * dist.world / train_time,
               "lr": sched.get_last_lr()[0], "steps": n_steps, "time_s": round(train_time, 2),
               "test_acc": None, "test_samples": 0}
        if test_dl is not None:
            ev = evaluate_model(model, test_dl, dist.device, cfg.mean, cfg.std, dist.world)
            row.update(test_acc=ev["accuracy"], test_samples=ev["samples"])
        metrics.append(row)
        if dist.main:
            acc = row["test_acc"] if row["test_acc"] is not None else -row["train_loss"]
            is_best = acc > best
            best = max(best, acc)
            state = train_state(model_state=core.state_dict(), model_config=mcfg,
                                normalize={"mean": list(cfg.mean), "std": list(cfg.std)}, manifest=m_train,
                                fingerprint=data.fingerprint, epoch=epoch, best_acc=best, optimizer=opt.state_dict(),
                                scheduler=sched.state_dict(), rng=capture_rng(aug_rng), metrics=row,
                                train_config={k: v for k, v in asdict(cfg).items() if k != "storage_options"})
            _write_outputs(cfg.out, metrics, state, is_best, cfg.storage_options)
            if progress:
                print(json.dumps(row), flush=True)
    if dist.world > 1:
        import torch.distributed

        torch.distributed.barrier()
    return metrics
