"""The train job: a streaming trainer, readable top to bottom.

    etc-data train --shards ROOT/train --test-shards ROOT/test --trust OWNER.pub --model convmixer \\
        --dim 256 --depth 8 --kernel 9 --patch 1 --epochs 100 --out runs/c10
    etc-data train --shards A/train --shards B/train --test-shards A/test --test-shards B/test \\
        --trust alice.pub --trust bob.pub --out runs/joint          # several owners, one model
    etc-data train --init runs/joint/owner-0/best.pt --shards C/train --freeze-body --out runs/c

    from etc_data import TrainConfig, train_model
    metrics = train_model(TrainConfig(shards="ROOT/train", test_shards="ROOT/test", out="runs/c10"))

``train_model`` runs these named steps in order:

1. ``setup_distributed``: rank, world size and device (DDP through torchrun: gloo on CPU, nccl on GPU);
2. ``read_splits``: the manifests of every owner (one ``Splits`` per ``--shards``; signatures checked
   against the trusted owners, ``trust``; an owner's test split must be signed by that owner), the key
   fingerprint check when a key is given (none is needed), equal class names across owners; then
   ``batch_shares`` checks the sample counts (all before anything expensive);
3. ``build_model``: the timm ConvMixer / ViT (its body from ``--init``, when given); with several
   owners an ``stems.OwnerStems`` (one input stem per owner, a shared body); on CUDA ConvMixer's
   depthwise convs become the Triton kernels of ``etc_data.dwconv`` when available;
4. the data: a streaming loader per owner and split (``loader.make_loader``), each built once; every
   batch holds a fixed number of samples of each owner (``batch_shares``: in proportion to the
   owners' sizes, or to ``owner_weights``), so every rank runs the same steps and every stem takes
   part in every step;
5. the paper's recipe: AdamW (lr 0.01, wd 0.01), one-cycle schedule (``lr_factor``), mixup + CutMix
   (``BatchMixer``, within each owner's part of the batch: timm's Mixup, or block-aligned CutMix
   with an exact plain counterpart), mean = std = 0.5 so negative-positive is a sign flip, bf16
   autocast on GPU;
6. every epoch: ``train_step`` per batch, ``evaluate_model`` on each owner's test split, then
   ``metrics.jsonl``, ``curves.png`` and the checkpoints (``checkpoint.train_state``) in ``out``,
   through the storage layer (``--out s3://...`` works): ``last.pt`` and ``best.pt`` for one owner;
   for several, ``last.pt`` is the joint state (for ``--resume``) and ``owner-K/last.pt`` and
   ``owner-K/best.pt`` are owner K's ordinary single-owner checkpoints (its stem + the body).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np

from .errors import EtcError
from .manifest import Manifest, read_manifest, split_url_of
from .models import convmixer_config
from .storage import exists, join, read_bytes, write_bytes


class TrainError(EtcError):
    pass


@dataclass
class TrainConfig:
    shards: str | list[str]          # train split URL (ROOT/train), or one per owner
    out: str                         # output folder or URL (checkpoints, metrics.jsonl, curves.png)
    test_shards: str | list[str] | None = None  # test split URL(s), one per owner, evaluated every epoch
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
    owner_weights: list[float] | None = None  # share of each owner in a batch; None: in proportion to their sizes
    shared_stem: bool = False      # one stem for all owners (a baseline that ignores that their keys differ)
    init: str | None = None        # a single-owner checkpoint whose body (all but the stem) starts the model
    freeze_body: bool = False      # train the stems only (a new owner joins a trained model); needs init

    @property
    def train_urls(self) -> list[str]:
        return [self.shards] if isinstance(self.shards, str) else list(self.shards)

    @property
    def test_urls(self) -> list[str]:
        t = self.test_shards
        return [] if not t else [t] if isinstance(t, str) else list(t)

    def check(self) -> None:
        n = len(self.train_urls)
        if n < 1:
            raise TrainError("shards: give at least one train split")
        if self.test_urls and len(self.test_urls) != n:
            raise TrainError(f"test-shards: give one per --shards ({n}), got {len(self.test_urls)}")
        if self.owner_weights is not None and (len(self.owner_weights) != n or min(self.owner_weights) <= 0):
            raise TrainError(f"owner weights must be {n} positive numbers (one per --shards), got {self.owner_weights}")
        if self.freeze_body and not self.init:
            raise TrainError("freeze-body needs --init (a trained body to keep)")
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
    """One owner's data: the train split (and test split) with their checked manifests."""
    train_url: str
    train: Manifest
    test_url: str | None = None
    test: Manifest | None = None

    @property
    def fingerprint(self) -> str | None:
        """The owner's key fingerprint (None for plain data: a signed manifest guarantees it)."""
        return self.train.key_fingerprint


def read_owner(cfg: TrainConfig, trust, key, train_ref: str, test_ref: str | None) -> Splits:
    """One owner's manifests: the train split signed by a trusted owner, its test split by the same one."""
    from .trust import TrustPolicy

    train_url = split_url_of(train_ref)
    m_train = read_manifest(train_url, cfg.storage_options, trust)
    matching_fingerprint(m_train, key, train_url)
    out = Splits(train_url, m_train)
    if test_ref:  # signed by the same owner, with the same key fingerprint (checked below)
        out.test_url = split_url_of(test_ref)
        out.test = read_manifest(out.test_url, cfg.storage_options, TrustPolicy().after_first_use(m_train.public_key))
        same = ("scheme", "block_size", "key_fingerprint", "dataset", "classes", "image_size")
        diff = [k for k in same if getattr(out.test, k) != getattr(m_train, k)]
        if diff:
            raise TrainError(f"{out.test_url} differs from {train_url} in {', '.join(diff)}")
    return out


def same_classes(classes: list[str], where: str, ref: list[str], ref_where: str) -> None:
    """Refuse data whose class names differ from the model's, naming the classes that differ."""
    if list(classes) == list(ref):
        return
    diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(classes, ref)) if a != b]
    if len(classes) != len(ref):
        diff.append(f"{len(classes)} classes vs {len(ref)}")
    raise TrainError(f"{where} has classes {list(classes)}, {ref_where} has {list(ref)} "
                     f"(differing: {'; '.join(diff)}); one model needs the same class names in the same order")


def read_splits(cfg: TrainConfig) -> list[Splits]:
    """Every owner's manifests (signatures checked against the trusted owners), checked against the
    key when one is given and against each other, before anything expensive."""
    from .keys import optional_key
    from .trust import TrustPolicy

    key = optional_key(cfg.key_ref)
    urls = [split_url_of(u) for u in cfg.train_urls]
    if len(set(urls)) < len(urls):
        raise TrainError(f"shards: a train split is given twice ({', '.join(u for u in urls if urls.count(u) > 1)})")
    if key is not None and len(urls) > 1:
        raise TrainError("an owner key (--key or $ETC_DATA_KEY) is for training on one owner's own shards; "
                         "several owners' shards take --trust only (no key)")
    trust = TrustPolicy.from_refs(cfg.trust, key)
    owners = [read_owner(cfg, trust, key, tr, te) for tr, te in zip(urls, cfg.test_urls or [None] * len(urls))]
    first = owners[0]
    for o in owners[1:]:
        same_classes(o.train.classes, o.train_url, first.train.classes, first.train_url)
        if o.train.image_size != first.train.image_size:
            raise TrainError(f"{o.train_url} has images of {o.train.image_size}, {first.train_url} of "
                             f"{first.train.image_size}; owners must share the image size")
    return owners


# ----------------------------------------------------------------------------- 3. model

def read_init(cfg: TrainConfig, owners: list[Splits]) -> dict | None:
    """The ``--init`` checkpoint (one owner's, loaded without running code), for the same class names."""
    if not cfg.init:
        return None
    from .checkpoint import load_checkpoint

    ck = load_checkpoint(cfg.init, storage_options=cfg.storage_options)
    same_classes(owners[0].train.classes, owners[0].train_url, ck.get("classes") or [], f"--init {cfg.init}")
    return ck


def build_model(model_config: dict, dist: Dist, seed: int, stem_of_owner: list[int] | None = None,
                init: dict | None = None, freeze_body: bool = False):
    """(model to train, its core module): the timm model on the device (its body from ``init``; one
    stem per owner when ``stem_of_owner`` is given), Triton depthwise convs on CUDA, only the stems
    trainable with ``freeze_body``, wrapped in DDP when world > 1."""
    import torch

    from .models import create_model
    from .stems import OwnerStems, train_only_stems, load_body

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    arch = model_config["arch"]
    model = create_model(model_config)
    if init is not None:
        load_body(model, init["model"], arch, "the --init checkpoint")
    if stem_of_owner is not None:
        model = OwnerStems(model, arch, stem_of_owner)
    model = model.to(dist.device)
    if freeze_body:
        train_only_stems(model, arch)
    if dist.device.type == "cuda" and arch == "convmixer":
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


# ----------------------------------------------------------------------------- 4. data

def batch_shares(cfg: TrainConfig, owners: list[Splits], world: int, unit: int) -> list[int]:
    """Samples of each owner in every batch: in proportion to the owners' sizes (or to
    ``owner_weights``), by largest remainder in multiples of ``unit`` (2 under timm's Mixup, which
    needs even batches); each owner gets at least one unit and one batch per rank."""
    if len(owners) == 1:
        shares = [cfg.batch_size]
    else:
        if cfg.batch_size % unit:
            raise TrainError(f"batch-size must be a multiple of {unit} with several owners and timm mixup/CutMix, "
                             f"got {cfg.batch_size}")
        weights = cfg.owner_weights or [o.train.num_samples for o in owners]
        units = cfg.batch_size // unit
        exact = [units * w / sum(weights) for w in weights]
        counts = [int(e) for e in exact]
        for i in sorted(range(len(owners)), key=lambda i: counts[i] - exact[i])[:units - sum(counts)]:
            counts[i] += 1
        shares = [c * unit for c in counts]
    for o, share in zip(owners, shares):
        if share < 1:
            raise TrainError(f"{o.train_url}: gets no sample of a batch of {cfg.batch_size}; raise --batch-size "
                             f"or its owner weight")
        if o.train.num_samples < world * share:
            raise TrainError(f"{o.train_url}: {o.train.num_samples} samples are fewer than one batch per rank "
                             f"({world} x {share})")
    return shares


def decode_mode(device, manifest: Manifest) -> str:
    """JPEG shards are decoded on the GPU when training there; everything else in the loader workers."""
    return "cuda" if (device.type == "cuda" and manifest.codec.startswith("jpeg")) else "cpu"


class OwnerLoaders(NamedTuple):
    train: "torch.utils.data.DataLoader"
    dataset: "ShardDataset"          # set its .epoch before each epoch
    steps: int                       # train batches per epoch on every rank
    test: "torch.utils.data.DataLoader | None"


def owner_loaders(cfg: TrainConfig, dist: Dist, o: Splits, share: int) -> OwnerLoaders:
    """One owner's streaming loaders: train (``share`` samples per batch) and test."""
    from .loader import make_loader

    common = dict(rank=dist.rank, world=dist.world, workers=cfg.workers, storage_options=cfg.storage_options,
                  worker_start=cfg.worker_start)
    dl, ds, _, steps = make_loader(o.train_url, share, seed=cfg.seed, train=True, manifest=o.train,
                                   decode=decode_mode(dist.device, o.train), **common)
    test_dl = None
    if o.test is not None:
        test_dl = make_loader(o.test_url, max(cfg.batch_size, 128), train=False, manifest=o.test,
                              decode=decode_mode(dist.device, o.test), **common)[0]
    return OwnerLoaders(dl, ds, steps, test_dl)


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
        if self.uses_timm(cfg):
            from timm.data import Mixup

            self.timm = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                              num_classes=num_classes)

    @staticmethod
    def uses_timm(cfg: TrainConfig) -> bool:
        """Whether batches go through timm's Mixup (which needs an even number of samples)."""
        return cfg.cutmix_mode == "timm" and (cfg.mixup > 0 or cfg.cutmix > 0)

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


def train_step(model, opt, sched, x, targets, amp: bool):
    """One optimiser step on a mixed batch (soft-target cross-entropy; ``x`` is a tensor, or one
    tensor per owner for an ``OwnerStems`` model); returns the per-sample losses (detached)."""
    import torch
    import torch.nn.functional as F

    dev = targets.device.type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=(dev == "cuda" and amp)):
        logits = model(x)
    losses = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1)
    opt.zero_grad(set_to_none=True)
    losses.mean().backward()
    opt.step()
    sched.step()
    return losses.detach()


# ----------------------------------------------------------------------------- 6. outputs

def _plot(metrics: list[dict], url: str, storage_options: dict) -> None:
    """Train loss and test accuracy per epoch: one line for the run, and one per owner when several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .storage import atomic_open

    ep = [m["epoch"] for m in metrics]
    series = [("all owners" if "owners" in metrics[0] else None, metrics)]
    series += [(f"owner {k}", [m["owners"][k] for m in metrics]) for k in range(len(metrics[0].get("owners", [])))]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, rows in series:
        ax[0].plot(ep, [r["train_loss"] for r in rows], marker="o", label=label)
        ax[1].plot(ep, [r["test_acc"] for r in rows], marker="o", label=label)
    ax[0].set_xlabel("epoch"), ax[0].set_ylabel("train loss")
    ax[1].set_xlabel("epoch"), ax[1].set_ylabel("test accuracy")
    if len(series) > 1:
        ax[1].legend()
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


def _write_outputs(out: str, metrics: list[dict], checkpoints: dict[str, dict], storage_options: dict) -> None:
    """The checkpoints (by path under ``out``), then ``metrics.jsonl`` and ``curves.png``."""
    from .checkpoint import save_checkpoint

    for name, state in checkpoints.items():
        save_checkpoint(join(out, name), state, storage_options)
    write_bytes(join(out, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics).encode(), storage_options)
    _plot(metrics, join(out, "curves.png"), storage_options)


def metrics_row(epoch: int, owners: list[Splits], shares: list[int], loss_sums, n_steps: int, train_time: float,
                lr: float, world: int, evals: list[dict | None]) -> dict:
    """One ``metrics.jsonl`` row: the run's figures (test accuracy over all owners' test samples),
    and with several owners, each owner's (``owners``)."""
    seen = n_steps * sum(shares)
    row = {"epoch": epoch, "train_loss": float(loss_sums.sum()) / seen, "img_per_s": seen * world / train_time,
           "lr": lr, "steps": n_steps, "time_s": round(train_time, 2), "test_acc": None, "test_samples": 0}
    per_owner = [{"owner": k, "shards": o.train_url, "key_fingerprint": o.fingerprint,
                  "train_loss": float(loss_sums[k]) / (n_steps * shares[k]),
                  "test_acc": ev["accuracy"] if ev else None, "test_samples": ev["samples"] if ev else 0}
                 for k, (o, ev) in enumerate(zip(owners, evals))]
    if evals[0] is not None:
        row["test_samples"] = sum(r["test_samples"] for r in per_owner)
        row["test_acc"] = sum(r["test_acc"] * r["test_samples"] for r in per_owner) / max(1, row["test_samples"])
    if len(owners) > 1:
        row["owners"] = per_owner
    return row


def owner_records(owners: list[Splits]) -> list[dict]:
    """Who each owner is, as a joint checkpoint records it (and ``--resume`` checks it)."""
    return [{"shards": o.train_url, "dataset": o.train.dataset, "key_fingerprint": o.fingerprint,
             "public_key": o.train.public_key, "scheme": o.train.scheme_params()} for o in owners]


def checkpoints_of_epoch(core, owners: list[Splits], mcfg: dict, common: dict, resumable: dict, row: dict,
                         bests: list[float], improved: list[bool]) -> dict[str, dict]:
    """The checkpoints an epoch writes, by path: one owner: ``last.pt`` (+ ``best.pt``); several: the
    joint ``last.pt`` and each owner's ``owner-K/last.pt`` (+ ``best.pt``), an ordinary checkpoint."""
    from .checkpoint import train_state

    if len(owners) == 1:
        state = train_state(model_state=core.state_dict(), model_config=mcfg, manifest=owners[0].train,
                            fingerprint=owners[0].fingerprint, best_acc=bests[0], metrics=row, **common, **resumable)
        return {"last.pt": state, **({"best.pt": state} if improved[0] else {})}
    records = [dict(r, best_acc=b) for r, b in zip(owner_records(owners), bests)]
    joint_cfg = dict(mcfg, owner_stems=core.stem_of_owner)
    out = {"last.pt": train_state(model_state=core.state_dict(), model_config=joint_cfg, manifest=owners[0].train,
                                  fingerprint=None, best_acc=max(bests), metrics=row, owners=records, **common,
                                  **resumable)}
    for k, o in enumerate(owners):
        state = train_state(model_state=core.owner_state_dict(k), model_config=mcfg, manifest=o.train,
                            fingerprint=o.fingerprint, best_acc=bests[k], metrics=row["owners"][k], optimizer=None,
                            scheduler=None, rng=None, **common)
        out[f"owner-{k}/last.pt"] = state
        if improved[k]:
            out[f"owner-{k}/best.pt"] = state
    return out


def resume_state(cfg: TrainConfig, owners: list[Splits]) -> dict | None:
    """``OUT/last.pt`` when resuming, refused when it was trained on other data or keys."""
    from .checkpoint import load_checkpoint

    last_url = join(cfg.out, "last.pt")
    if not (cfg.resume and exists(last_url, cfg.storage_options)):
        return None
    ck = load_checkpoint(last_url, storage_options=cfg.storage_options, joint=True)
    had = [(r.get("dataset"), r.get("key_fingerprint")) for r in ck.get("owners") or [ck]]
    now = [(o.train.dataset, o.fingerprint) for o in owners]
    if had != now:
        raise TrainError(f"{last_url} was trained on (dataset, key fingerprint) {had}, not on "
                         f"{', '.join(o.train_url for o in owners)} ({now}); refusing to resume")
    return ck


# ----------------------------------------------------------------------------- the job

def train_model(cfg: TrainConfig, progress: bool = True) -> list[dict]:
    """Train on (encrypted) shards of one or several owners, streamed; returns one metrics row per
    epoch of this run."""
    import torch

    from .checkpoint import capture_rng, restore_rng
    from .evaluate import evaluate_model
    from .loader import to_float_nchw
    from .models import patch_size
    from .stems import OwnerView, keep_body_frozen

    cfg.check()
    dist = setup_distributed(cfg.device)
    owners = read_splits(cfg)
    joint = len(owners) > 1
    shares = batch_shares(cfg, owners, dist.world, 2 if BatchMixer.uses_timm(cfg) else 1)
    init = read_init(cfg, owners)
    m0 = owners[0].train
    base = {k: v for k, v in init["model_config"].items() if k != "pretrained_file"} if init else cfg.model
    mcfg = dict(base, num_classes=len(m0.classes), img_size=m0.image_size[0])
    stem_of_owner = ([0] * len(owners) if cfg.shared_stem else list(range(len(owners)))) if joint else None
    model, core = build_model(mcfg, dist, cfg.seed, stem_of_owner, init, cfg.freeze_body)

    aug_rng = np.random.default_rng(cfg.seed + dist.rank)
    mixers = [BatchMixer(cfg, len(m0.classes), o.train.block_size or patch_size(mcfg), aug_rng) for o in owners]
    loaders = [owner_loaders(cfg, dist, o, share) for o, share in zip(owners, shares)]
    steps = min(ld.steps for ld in loaders)
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    if steps < 1:
        raise TrainError(f"{owners[0].train_url}: no full batch per rank with batch size {cfg.batch_size}")

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.schedule, steps * cfg.epochs))

    metrics: list[dict] = []
    start_epoch, bests = 0, [-1.0] * len(owners)
    ck = resume_state(cfg, owners)
    if ck is not None:
        core.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        restore_rng(ck["rng"], aug_rng)
        start_epoch = ck["epoch"] + 1
        bests = [r.get("best_acc", -1.0) for r in ck["owners"]] if joint else [ck.get("best_acc", -1.0)]
        metrics = _read_metrics(cfg.out, start_epoch, cfg.storage_options)

    end_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start_epoch + cfg.stop_after)
    for epoch in range(start_epoch, end_epoch):
        model.train()
        if cfg.freeze_body:
            keep_body_frozen(core, mcfg["arch"])
        for ld in loaders:
            ld.dataset.epoch = epoch
        t0, loss_sums, n_steps = time.time(), torch.zeros(len(owners)), 0
        bar = None
        if progress and dist.main:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        for i, parts in enumerate(zip(*(ld.train for ld in loaders))):
            if i >= steps:
                break
            mixed = [mix(to_float_nchw(x, dist.device, cfg.mean, cfg.std), y.to(dist.device))
                     for mix, (x, y) in zip(mixers, parts)]
            xs = [x for x, _ in mixed]
            losses = train_step(model, opt, sched, xs if joint else xs[0], torch.cat([t for _, t in mixed]), cfg.amp)
            loss_sums += torch.stack([part.sum() for part in losses.split(shares)]).float().cpu()
            n_steps += 1
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss_sums.sum()) / (n_steps * cfg.batch_size):.3f}",
                                img_s=f"{n_steps * cfg.batch_size * dist.world / (time.time() - t0):.0f}")
        if bar:
            bar.close()
        if n_steps < steps:
            raise TrainError(f"{owners[0].train_url}: epoch {epoch} gave {n_steps} batches, expected {steps}")
        train_time = time.time() - t0
        evals = [evaluate_model(OwnerView(model, k) if joint else model, ld.test, dist.device, cfg.mean, cfg.std,
                                dist.world) if ld.test is not None else None for k, ld in enumerate(loaders)]
        row = metrics_row(epoch, owners, shares, loss_sums, n_steps, train_time, sched.get_last_lr()[0], dist.world,
                          evals)
        metrics.append(row)
        if dist.main:
            scores = [r["test_acc"] if r["test_acc"] is not None else -r["train_loss"]
                      for r in row.get("owners", [row])]
            improved = [a > b for a, b in zip(scores, bests)]
            bests = [max(a, b) for a, b in zip(scores, bests)]
            common = dict(normalize={"mean": list(cfg.mean), "std": list(cfg.std)}, epoch=epoch,
                          train_config={k: v for k, v in asdict(cfg).items() if k != "storage_options"})
            resumable = dict(optimizer=opt.state_dict(), scheduler=sched.state_dict(), rng=capture_rng(aug_rng))
            _write_outputs(cfg.out, metrics, checkpoints_of_epoch(core, owners, mcfg, common, resumable, row, bests,
                                                                  improved), cfg.storage_options)
            if progress:
                print(json.dumps(row), flush=True)
    if dist.world > 1:
        import torch.distributed

        torch.distributed.barrier()
    return metrics
