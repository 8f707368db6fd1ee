"""``etc-data train`` and ``etc-data evaluate``."""

from __future__ import annotations

import json

import click

from .options import key_option, storage_config_option, storage_options, trust_option


def _one_or_list(values: tuple):
    """One URL as a string (a single owner, as before), several as a list."""
    return values[0] if len(values) == 1 else list(values)


def register(cli: click.Group) -> None:
    from ..models import DEFAULT_VIT_VARIANT, VIT_VARIANTS

    @cli.command("train")
    @click.option("--shards", required=True, multiple=True,
                  help="train split URL (ROOT/train), any fsspec URL; repeat for several owners (one model, "
                       "a stem per owner)")
    @click.option("--test-shards", multiple=True, help="test split URL, evaluated every epoch; one per --shards")
    @click.option("--owner-weight", "owner_weights", type=float, multiple=True,
                  help="share of each owner in a batch, one per --shards (default: in proportion to their sizes)")
    @click.option("--shared-stem", is_flag=True, help="one stem for all owners (a baseline: ignores that keys differ)")
    @click.option("--init", default=None, help="start from this single-owner checkpoint's body (its architecture "
                                               "too; the stem starts fresh)")
    @click.option("--freeze-body", is_flag=True, help="with --init: train the stem only (a new owner joins)")
    @key_option(help_extra="Optional: training needs no key. Given (or in $ETC_DATA_KEY), it must be the "
                           "shards' own (checked before training), and its public key is trusted.")
    @trust_option()
    @click.option("--model", "arch", type=click.Choice(["convmixer", "vit"]), default="convmixer", show_default=True)
    @click.option("--dim", type=int, default=256, show_default=True)
    @click.option("--depth", type=int, default=8, show_default=True)
    @click.option("--kernel", type=int, default=9, show_default=True, help="ConvMixer depthwise kernel")
    @click.option("--patch", type=int, default=1, show_default=True)
    @click.option("--heads", type=int, default=4, show_default=True, help="ViT heads (custom ViT)")
    @click.option("--vit-variant", default=DEFAULT_VIT_VARIANT, show_default=True,
                  help=f"{', '.join(VIT_VARIANTS)} or custom (--dim/--depth/--heads/--patch)")
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
    @storage_config_option()
    @click.option("--out", required=True, help="output folder or URL (checkpoints, metrics.jsonl, curves.png)")
    def train_cmd(shards, test_shards, owner_weights, shared_stem, init, freeze_body, key_ref, trust, arch, dim,
                  depth, kernel, patch, heads, vit_variant, pretrained_file, epochs, batch_size, lr, weight_decay,
                  schedule, mixup, cutmix, cutmix_mode, workers, device, seed, resume, max_steps, stop_after,
                  storage_config, out):
        """Train a classifier on (encrypted) WebDataset shards, streamed."""
        from ..models import convmixer_config, vit_config
        from ..train import TrainConfig, train_model

        model = convmixer_config(dim, depth, kernel, patch) if arch == "convmixer" else \
            vit_config(vit_variant, dim, depth, heads, patch, pretrained_file)
        cfg = TrainConfig(shards=_one_or_list(shards), test_shards=_one_or_list(test_shards) or None, out=out,
                          key_ref=key_ref, trust=list(trust), model=model, epochs=epochs, batch_size=batch_size, lr=lr,
                          weight_decay=weight_decay, schedule=schedule, mixup=mixup, cutmix=cutmix,
                          cutmix_mode=cutmix_mode, workers=workers, device=device, seed=seed, resume=resume,
                          max_steps=max_steps, stop_after=stop_after,
                          storage_options=storage_options(storage_config), owner_weights=list(owner_weights) or None,
                          shared_stem=shared_stem, init=init, freeze_body=freeze_body)
        metrics = train_model(cfg)
        if metrics:
            click.echo(f"done: {len(metrics)} epochs, last test accuracy {metrics[-1]['test_acc']}, "
                       f"checkpoints in {out}")

    @cli.command("evaluate")
    @click.option("--checkpoint", required=True, help="checkpoint file or URL")
    @click.option("--shards", required=True, help="split URL (ROOT/test)")
    @key_option(help_extra="Optional: evaluation needs no key. Given, it must match the shards' and the "
                           "checkpoint's fingerprint, and its public key is trusted.")
    @trust_option()
    @click.option("--batch-size", type=int, default=256, show_default=True)
    @click.option("--workers", type=int, default=2, show_default=True)
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
    @storage_config_option()
    def evaluate_cmd(checkpoint, shards, key_ref, trust, batch_size, workers, device, storage_config):
        """Print one JSON line: {"accuracy": ..., "samples": ...}."""
        from ..evaluate import EvalConfig, evaluate_checkpoint

        res = evaluate_checkpoint(EvalConfig(checkpoint=checkpoint, shards=shards, key_ref=key_ref, trust=list(trust),
                                             device=device, batch_size=batch_size, workers=workers,
                                             storage_options=storage_options(storage_config)))
        click.echo(json.dumps(res))
