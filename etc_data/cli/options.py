"""Options and helpers shared by several commands (the key reference, trusted owners, the storage config,
image limits)."""

from __future__ import annotations

import click

from ..images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS


def _key_ref(ctx, param, value):
    """Refuse key material passed where a reference is expected, before anything stores or logs it."""
    from ..keys import check_key_ref

    check_key_ref(value)
    return value


def key_option(required: bool = False, help_extra: str = ""):
    return click.option("--key", "key_ref", required=required, metavar="PATH|env:NAME", callback=_key_ref,
                        help="owner key file (mode 0600) or env:NAME; default $ETC_DATA_KEY. " + help_extra)


def trust_option():
    return click.option("--trust", "trust", multiple=True, metavar="PUBKEY|FILE",
                        help="accept manifests signed by this owner only (a public key, ed25519:..., or a file "
                             "holding one: etc-data keys public); repeat for several owners. Without it, the "
                             "manifest's own public key is checked and named in a warning (trust on first use); "
                             "--key trusts its own public key.")


def storage_config_option():
    return click.option("--storage-config", type=click.Path(exists=True, dir_okay=False), default=None,
                        help="YAML with storage_options (no secrets: credentials come from the environment)")


def storage_options(storage_config: str | None) -> dict:
    """The storage_options of a --storage-config file ({} without one)."""
    if not storage_config:
        return {}
    from ..storage import load_storage_config

    return load_storage_config(storage_config)["storage_options"]


def image_limit_options(fn):
    """--max-image-pixels and --max-image-bytes: what one source image may cost before it is decoded."""
    fn = click.option("--max-image-bytes", type=int, default=DEFAULT_MAX_BYTES, show_default=True,
                      help="largest image file or archive member, in bytes (checked before inflating)")(fn)
    return click.option("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS, show_default=True,
                        help="largest image, width x height from its header (checked before decoding)")(fn)
