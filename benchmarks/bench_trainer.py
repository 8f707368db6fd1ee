"""Streaming trainer img/s vs. the same model and batch fed from tensors already in GPU memory.

    python benchmarks/bench_trainer.py [--model convmixer|vit|both] [--steps 60] [--batch-size 128]
        [--shards ROOT --key KEY] [--workers 8] [--limit 6000] [--device cuda|cpu] [--tiny]

ConvMixer-256/8 (patch 1, kernel 9) at 32 px on EtC CIFAR-10 shards (block 16, JPEG q85 4:4:4) and
ViT-B/16 at 224 px on EtC Imagenette shards (block 16). Without --shards the shards are prepared first
from ../shared/data with the project's own prepare step (into a temporary folder).
Both runs use the trainer's recipe (AdamW, bf16 autocast, timm Mixup, mean=std=0.5); the reference
loop replays batches that already sit on the GPU as uint8 NHWC, so the ratio isolates the input pipeline
(read, untar, JPEG decode, host->device copy, normalisation). Goal: ratio >= 0.95.
Prints one JSON line per model: streaming img/s, in-memory img/s, ratio. Exits 0 with a message without
CUDA. ``--device cpu --tiny`` (a ConvMixer-32/2, kernel 5, patch 2) only checks that the benchmark runs
(benchmarks/gpu_check.py --smoke); its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

TINY_CONVMIXER = {"arch": "convmixer", "dim": 32, "depth": 2, "kernel": 5, "patch": 2}
SETUPS = {
    "convmixer": dict(model={"arch": "convmixer", "dim": 256, "depth": 8, "kernel": 9, "patch": 1},
                      source=SHARED / "cifar10-lossless-subset.npz", resize=None),
    "vit": dict(model={"arch": "vit", "variant": "vit_base_patch16_224", "patch": 16},
                source=SHARED / "imagenette-224-subset.zip", resize=None),
}


def prepare_shards(name: str, tmp: Path, limit: int) -> Path:
    from etc_data.keys import new_key_file
    from etc_data.prepare import PrepareConfig, prepare_dataset

    key = tmp / f"{name}.key"
    if not key.exists():
        new_key_file(key, "bench")
    out = tmp / name
    prepare_dataset(PrepareConfig(source=str(SETUPS[name]["source"]), out=str(out), dataset=f"bench-{name}", key_ref=str(key),
                     scheme="etc", block_size=16, codec="jpeg:q=85,sub=444", limit=limit, splits=["train"]))
    return out, key


def streaming(name, root: Path, key: Path, args) -> float:
    from etc_data.train import TrainConfig, train_model

    with tempfile.TemporaryDirectory() as out:
        # epoch 0 warms up (compile/cudnn autotune, worker start); epoch 1 is measured
        cfg = TrainConfig(shards=str(root / "train"), test_shards=None, out=out, key_ref=str(key),
                          model=model_config(name, args), epochs=2, batch_size=args.batch_size,
                          workers=args.workers, device=args.device, max_steps=args.steps)
        metrics = train_model(cfg, progress=False)
    return metrics[-1]["img_per_s"]


def model_config(name: str, args) -> dict:
    return dict(TINY_CONVMIXER if args.tiny else SETUPS[name]["model"])


def in_memory(name, root: Path, args) -> float:
    import numpy as np
    import torch

    from etc_data.loader import make_loader, to_float_nchw
    from etc_data.manifest import read_manifest
    from etc_data.train import BatchMixer, Dist, TrainConfig, build_model, lr_factor, train_step

    dev = torch.device(args.device)
    m = read_manifest(str(root / "train"))
    dl, _, _, _ = make_loader(str(root / "train"), args.batch_size, workers=2, train=True, manifest=m)
    batches = []
    for x, y in dl:  # a few real batches, decoded once, then kept on the GPU
        batches.append((x.to(dev), y.to(dev)))
        if len(batches) == 8:
            break
    # the trainer's own steps: model (Triton depthwise convs on CUDA), recipe, mixing, one train step
    tc = TrainConfig(shards=str(root / "train"), out="", batch_size=args.batch_size)
    mcfg = dict(model_config(name, args), num_classes=len(m.classes), img_size=m.image_size[0])
    model, _ = build_model(mcfg, Dist(0, 1, 0, dev), tc.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(tc.schedule, 10 + args.steps))
    mixer = BatchMixer(tc, len(m.classes), m.block_size, np.random.default_rng(0))

    def run(n):
        for i in range(n):
            x, y = batches[i % len(batches)]
            x, t = mixer(to_float_nchw(x, dev), y)
            train_step(model, opt, sched, x, t, amp=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    run(10)
    t0 = time.perf_counter()
    run(args.steps)
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["convmixer", "vit", "both"], default="both")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="images per split to prepare (default: all available)")
    p.add_argument("--shards", help="an existing prepared dataset root for --model (with its --key)")
    p.add_argument("--key")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: only to check that the benchmark runs (no meaningful figure)")
    p.add_argument("--tiny", action="store_true", help="a ConvMixer-32/2 (kernel 5, patch 2) instead of the paper's")
    args = p.parse_args()
    try:
        import torch
    except ImportError:
        print("torch is not installed: nothing to measure")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the trainer benchmark needs a GPU; nothing measured")
        return 0
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    names = ["convmixer", "vit"] if args.model == "both" else [args.model]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if args.shards:
                root, key = Path(args.shards), Path(args.key)
            else:
                t0 = time.time()
                root, key = prepare_shards(name, Path(tmp), args.limit)
                print(f"{name}: shards prepared in {time.time() - t0:.1f} s", flush=True)
            s = streaming(name, root, key, args)
            r = in_memory(name, root, args)
            print(json.dumps({"model": name, "device": device_name, "batch_size": args.batch_size,
                              "streaming_img_s": round(s, 1), "in_memory_img_s": round(r, 1),
                              "ratio": round(s / r, 3), "goal": 0.95}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
