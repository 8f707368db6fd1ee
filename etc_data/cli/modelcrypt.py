"""``etc-data encrypt-model``: a plain-trained checkpoint -> one for blockwise-encrypted images."""

from __future__ import annotations

from pathlib import Path

import click

from .keys import key_option


def register(cli: click.Group) -> None:
    @cli.command("encrypt-model")
    @key_option(help_extra="The owner key the test images are encrypted with.")
    @click.option("--dataset", required=True, help="dataset id (the one given to prepare for the shards)")
    @click.option("--scheme", "scheme_spec", default="blockwise", show_default=True,
                  help="blockwise[:negpos=0|1,scramble=0|1]; scramble=1 only for ViT (permutes position embeddings)")
    @click.argument("in_ckpt", type=click.Path(exists=True, dir_okay=False))
    @click.argument("out_ckpt", type=click.Path(dir_okay=False))
    def encrypt_model_cmd(key_ref, dataset, scheme_spec, in_ckpt, out_ckpt):
        """Encrypt a plain checkpoint so it gives the same outputs on blockwise-encrypted images
        (block size = the model's patch size). Evaluate it on shards prepared with
        --scheme blockwise[:scramble=1] --block-size PATCH and the same key and dataset id."""
        from ..keys import load_key
        from ..modelcrypt import ModelCryptError, encrypt_model
        from ..train import load_checkpoint, save_checkpoint

        if Path(out_ckpt).exists():
            raise ModelCryptError(f"{out_ckpt} exists; not overwritten")
        key = load_key(key_ref)
        ck = load_checkpoint(in_ckpt)
        try:
            out, note = encrypt_model(ck, key, dataset, scheme_spec)
        except ModelCryptError as e:
            raise ModelCryptError(f"{in_ckpt}: {e}") from None
        save_checkpoint(Path(out_ckpt), out)
        s = out["scheme"]
        opts = ",".join(f"{k}={int(v)}" for k, v in s["options"].items())
        click.echo(f"wrote {out_ckpt}: scheme {s['scheme']}:{opts} block {s['block_size']}, dataset {dataset}, "
                   f"key fingerprint {out['key_fingerprint']}")
        click.echo(note)
