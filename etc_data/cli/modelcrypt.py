"""``etc-data encrypt-model``: a plain-trained checkpoint -> one for images encrypted with one key shared by
every block (``blockwise`` or the JPEG-compressible ``etc:common=1``)."""

from __future__ import annotations

import click

from .options import key_option, storage_config_option, storage_options, trust_option


def register(cli: click.Group) -> None:
    @cli.command("encrypt-model")
    @key_option(help_extra="The owner key the test images are encrypted with.")
    @click.option("--dataset", default=None, help="dataset id (the one given to prepare for the shards; "
                  "default: that of --shards)")
    @click.option("--scheme", "scheme_spec", default=None,
                  help="blockwise[:negpos=0|1,scramble=0|1] or etc:common=1[,scramble=0|1][,sub=S] (compresses like "
                       "plain JPEG); scramble=1 only for ViT (permutes position embeddings) "
                       "[default: that of --shards, else blockwise]")
    @click.option("--shards", default=None, help="the split the model is for (ROOT/test): dataset id and scheme "
                  "come from its signed manifest, and the encrypted model must fit it")
    @trust_option()
    @storage_config_option()
    @click.argument("in_ckpt")
    @click.argument("out_ckpt")
    def encrypt_model_cmd(key_ref, dataset, scheme_spec, shards, trust, storage_config, in_ckpt, out_ckpt):
        """Encrypt a plain checkpoint so it gives the same outputs on encrypted images (block size =
        the model's patch size). Evaluate it on shards prepared with the same --scheme,
        --block-size PATCH, key and dataset id."""
        from ..modelcrypt import ModelCryptConfig, encrypt_model
        from ..schemes import spec_of

        res = encrypt_model(ModelCryptConfig(in_ckpt=in_ckpt, out_ckpt=out_ckpt, dataset=dataset or "", key_ref=key_ref,
                                             scheme=scheme_spec, shards=shards, trust=list(trust),
                                             storage_options=storage_options(storage_config)))
        s = res["scheme"]
        click.echo(f"wrote {out_ckpt}: scheme {spec_of(s['scheme'], s['options'])} block {s['block_size']}, "
                   f"dataset {res['dataset']}, key fingerprint {res['key_fingerprint']}")
        click.echo(res["key_space"])
