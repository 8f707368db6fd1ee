"""Multi-owner training: is one model from two owners' data (different keys) better than each alone?

Two owners hold disjoint halves of the CIFAR-10 train copies (owner A: images from the first half of
every class, owner B: from the second half) and encrypt them under their own keys; each also
encrypts the same test images under their own key. At the same number of optimiser steps, batch
size and schedule, every configuration is trained key-less (only the owners' public keys):

(a) each owner alone (a single-owner run on its own shards);
(b) joint, one stem per owner (``etc-data train --shards A/train --shards B/train``);
(c) joint, one shared stem (``--shared-stem``: ignores that the keys differ);
(d) plain images of both halves (one model on the plain union: the reference), next to (a) on
    plain images (does twice the data help at all within this budget?);

for EtC (block 16), ``etc:common=1,scramble=0`` and ``blockwise`` (one common key for all blocks,
block = patch size = 2; ConvMixer cannot absorb a block scrambling), and prints each owner's test
accuracy on its own encrypted test copy. The claim under test: (b) beats (a) for both owners. The
figures come from the JPEG q75 CIFAR copies in ../shared/data (not official CIFAR-10 numbers), a
small ConvMixer and a short CPU budget (see --help for the sizes; measured figures in
docs/training.md).

    python benchmarks/bench_multi_owner.py --schemes plain,etc,etc-common            # 5,000 per owner
    python benchmarks/bench_multi_owner.py --schemes plain,etc,etc-common --per-owner 1000 --batch-size 32 \
        --steps 31 --epochs 20                                                       # data-limited
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from etc_data.keys import load_key, new_key_file
from etc_data.prepare import PrepareConfig, prepare_dataset
from etc_data.sources import CIFAR10_CLASSES
from etc_data.train import TrainConfig, train_model

SHARED = Path(os.environ.get("ETC_DATA_SHARED", Path(__file__).resolve().parents[2] / "shared" / "data"))
SCHEMES = {"plain": ("plain", None), "etc": ("etc", 16), "blockwise": ("blockwise", 2),
           "etc-common": ("etc:common=1,scramble=0", 2)}
JOINT = {"plain": [("(d) plain union (joint, one stem)", True)],
         "etc": [("(b) joint, stem per owner", False), ("(c) joint, shared stem", True)]}


def read_zip(path: Path, per_class: int, start: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of every class from the ``start``-th on (file order), decoded."""
    from PIL import Image

    xs, ys = [], []
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        for label, cls in enumerate(CIFAR10_CLASSES):
            mine = [n for n in names if n.split("/")[-2] == cls][start:start + per_class]
            xs += [np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")) for n in mine]
            ys += [label] * len(mine)
    return np.stack(xs), np.asarray(ys, np.int64)


def make_owners(work: Path, per_owner: int, n_test: int) -> dict:
    """Both owners' npz sources (disjoint train halves, the same test images) and keys."""
    test = read_zip(SHARED / "cifar10-test-jpeg.zip", n_test // 10, 0)
    owners = {}
    for i, (name, start) in enumerate((("A", 0), ("B", 2500))):
        x, y = read_zip(SHARED / "cifar10-train-jpeg.zip", per_owner // 10, start)
        order = np.random.default_rng(i).permutation(len(y))  # class-sorted shards defeat the shuffle buffer
        x, y = x[order], y[order]
        np.savez(work / f"cifar10-{name}.npz", x_train=x, y_train=y, x_test=test[0], y_test=test[1])
        new_key_file(work / f"{name}.key", f"owner-{name}")
        owners[name] = {"npz": work / f"cifar10-{name}.npz", "key": work / f"{name}.key",
                        "pub": load_key(work / f"{name}.key").public_key}
    return owners


def prepare(work: Path, owners: dict, scheme: str, block: int | None) -> dict:
    """Each owner's dataset root for one scheme (encrypted under that owner's key)."""
    roots = {}
    for name, o in owners.items():
        root = work / f"{scheme}-{name}"
        prepare_dataset(PrepareConfig(source=str(o["npz"]), out=str(root), dataset="c10", scheme=scheme,
                                      block_size=block, codec="raw", key_ref=str(o["key"]), shard_size=500))
        roots[name] = root
    return roots


def run(work: Path, args, label: str, roots: list[Path], pubs: list[str], **kw) -> list[float]:
    """Train one configuration key-less; its test accuracy per owner."""
    cfg = TrainConfig(shards=[str(r / "train") for r in roots], test_shards=[str(r / "test") for r in roots],
                      out=str(work / "runs" / label), trust=pubs, model=dict(args.model), epochs=args.epochs,
                      max_steps=args.steps, batch_size=args.batch_size, mixup=0.0, cutmix=0.0, workers=0,
                      device="cpu", **kw)
    t0 = time.time()
    last = train_model(cfg, progress=False)[-1]
    accs = [o["test_acc"] for o in last["owners"]] if "owners" in last else [last["test_acc"]]
    print(json.dumps({"config": label, "test_acc": accs, "time_s": round(time.time() - t0, 1)}), flush=True)
    return accs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-owner", type=int, default=5000, help="train images per owner (a tenth per class)")
    ap.add_argument("--test", type=int, default=2000, help="test images (each owner encrypts its own copy)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=78, help="steps per epoch, the same for every configuration")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dim", type=int, default=48)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--schemes", default="plain,etc,blockwise,etc-common", help=f"of {', '.join(SCHEMES)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (loading runs in the same process)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)  # on a shared CPU, 2 spinning threads ran 5x slower than 1
    args.model = {"arch": "convmixer", "dim": args.dim, "depth": args.depth, "kernel": 5, "patch": 2}
    results = {"setup": {k: v for k, v in vars(args).items()}, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        owners = make_owners(work, args.per_owner, args.test)
        pubs = [o["pub"] for o in owners.values()]
        for name in args.schemes.split(","):
            roots = prepare(work, owners, *SCHEMES[name])
            rows = {"(a) alone": {}}
            for o, pub in zip(("A", "B"), pubs):
                rows["(a) alone"][o] = run(work, args, f"{name}-alone-{o}", [roots[o]], [pub])[0]
            for label, shared in JOINT.get(name, JOINT["etc"]):
                acc = run(work, args, f"{name}-{label[1]}", [roots["A"], roots["B"]], pubs, shared_stem=shared)
                rows[label] = {"A": acc[0], "B": acc[1]}
            results["rows"] += [{"scheme": name, "config": k, **v} for k, v in rows.items()]
    print(f"\n{args.per_owner} train images per owner, {args.test} test, ConvMixer-{args.dim}/{args.depth} "
          f"(kernel 5, patch 2), batch {args.batch_size}, {args.epochs} x {args.steps} steps, CPU")
    print("| scheme | configuration | owner A | owner B |\n|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['scheme']} | {r['config']} | {100 * r['A']:.1f} % | {100 * r['B']:.1f} % |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
