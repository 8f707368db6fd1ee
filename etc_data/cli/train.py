"""``etc-data train`` and ``etc-data evaluate``."""

from __future__ import annotations

import json

import click

from .keys import key_option


def register(cli: click.Group) -> None:
    @cli.command("train")
    @click.option("--shards", required=True, help="train split URL (ROOT/train), any fsspec URL")
    @click.option("--test-shards", default=None, help="test split URL, evaluated every epoch")
    @key_option(help_extra="Checked against the shards' key fingerprint before training.")
    @click.option("--model", "arch", type=click.Choice(["convmixer", "vit"]), default="convmixer", show_default=True)
    @click.option("--dim", type=int, default=256, show_default=True)
    @click.option("--depth", type=int, default=8, show_default=True)
    @click.option("--kernel", type=int, default=9, show_default=True, help="ConvMixer depthwise kernel")
    @click.option("--patch", type=int, default=1, show_default=True)
    @click.option("--heads", type=int, default=None, help="ViT heads (custom ViT)")
    @click.option("--vit-variant", default="vit_base_patch16_224", show_default=True,
                  help="vit_base_patch16_224, vit_small_patch16_224, vit_tiny_patch16_224 or custom")
    @click.option("--pretrained-file", default=None, type=click.Path(exists=True, dir_okay=False),
                  help="local ViT weights (nothing is downloaded)")
    @click.option("--epochs", type=int, default=10, show_default=True)
    @click.option("--batch-size", type=int, default=128, show_default=True, help="per-rank batch size")
    @click.option("--lr", type=float, default=0.01, show_default=True)
    @click.option("--weight-decay", type=float, default=0.01, show_default=True)
    @click.option("--schedule", type=click.Choice(["onecycle", "triangular"]), default="onecycle", show_default=True)
    @click.option("--mixup", type=float, default=0.8, show_default=True, help="mixup alpha (0: off)")
    @click.option("--cutmix", type=float, default=1.0, show_default=True, help="CutMix alpha (0: off)")
    @click.option("--cutmix-mode", type=click.Choice(["timm", "block"]), default="timm", show_default=True,
                  help="timm: any box; block: boxes on the encryption block grid")
    @click.option("--workers", type=int, default=2, show_default=True, help="DataLoader workers per rank")
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--resume", is_flag=True, help="continue from OUT/last.pt")
    @click.option("--max-steps", type=int, default=None, help="cap batches per epoch (quick runs)")
    @click.option("--stop-after", type=int, default=None, help="stop after N epochs of this run (resume later)")
    @click.option("--storage-config", type=click.Path(exists=True, dir_okay=False), default=None)
    @click.option("--out", required=True, type=click.Path(file_okay=False))
    def train_cmd(shards, test_shards, key_ref, arch, dim, depth, kernel, patch, heads, vit_variant, pretrained_file,
                  epochs, batch_size, lr, weight_decay, schedule, mixup, cutmix, cutmix_mode, workers, device, seed,
                  resume, max_steps, stop_after, storage_config, out):
        """Train a classifier on (encrypted) WebDataset shards, streamed."""
        from ..train import TrainConfig, train
        from .prepare import _storage

        if arch == "convmixer":
            model = {"arch": "convmixer", "dim": dim, "depth": depth, "kernel": kernel, "patch": patch}
        else:
            model = {"arch": "vit", "variant": vit_variant, "dim": dim, "depth": depth, "heads": heads or 4,
                     "patch": patch, "pretrained_file": pretrained_file}
        cfg = TrainConfig(shards=shards, test_shards=test_shards, out=out, key_ref=key_ref, model=model,
                          epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule,
                          mixup=mixup, cutmix=cutmix, cutmix_mode=cutmix_mode, workers=workers, device=device,
                          seed=seed, resume=resume, max_steps=max_steps, stop_after=stop_after,
                          storage_options=_storage(storage_config))
        metrics = train(cfg)
        if metrics:
            click.echo(f"done: {len(metrics)} epochs, last test accuracy {metrics[-1]['test_acc']}, "
                       f"checkpoints in {out}")

    @cli.command("evaluate")
    @click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False))
    @click.option("--shards", required=True, help="split URL (ROOT/test)")
    @key_option(help_extra="Must match the shards' and the checkpoint's fingerprint.")
    @click.option("--batch-size", type=int, default=256, show_default=True)
    @click.option("--workers", type=int, default=2, show_default=True)
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
    @click.option("--storage-config", type=click.Path(exists=True, dir_okay=False), default=None)
    def evaluate_cmd(checkpoint, shards, key_ref, batch_size, workers, device, storage_config):
        """Print one JSON line: {"accuracy": ..., "samples": ...}."""
        from ..train import evaluate
        from .prepare import _storage

        res = evaluate(checkpoint, shards, key_ref, device, batch_size, workers, _storage(storage_config))
        click.echo(json.dumps(res))
