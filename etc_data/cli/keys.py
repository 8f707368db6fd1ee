"""``etc-data keys new|public|fingerprint|space``."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..keys import load_key, new_key_file
from ..schemes import MIN_KEY_BITS, key_space, parse_scheme_spec, spec_label, weak_key_message
from .options import key_option


def register(cli: click.Group) -> None:
    @cli.group()
    def keys():
        """Create and inspect owner keys (the secret is never printed)."""

    @keys.command("new")
    @click.option("--owner", required=True, help="owner name recorded in the key file")
    @click.option("--out", type=click.Path(dir_okay=False), default=None,
                  help="key file to create (default ~/.config/etc-data/keys/OWNER.key); never overwritten")
    def new(owner, out):
        """Create a 256-bit key file with mode 0600; print its path, fingerprint and public key."""
        if out is None:
            base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "etc-data" / "keys"
            out = base / f"{owner}.key"
        k = new_key_file(out, owner)
        click.echo(f"created {out}")
        click.echo(f"owner {k.owner}")
        click.echo(f"fingerprint {k.fingerprint}")
        click.echo(f"public key {k.public_key}")

    @keys.command("public")
    @key_option()
    @click.option("--out", type=click.Path(dir_okay=False), default=None,
                  help="also write the public key to this file (public: no 0600 needed)")
    def public(key_ref, out):
        """Print the owner's public key (one line): what the cloud and model developers pin with --trust."""
        pub = load_key(key_ref).public_key
        if out is not None:
            from ..storage import write_bytes

            write_bytes(out, (pub + "\n").encode())
        click.echo(pub)

    @keys.command("fingerprint")
    @click.argument("ref", required=False)
    def fp(ref):
        """Print the key's fingerprint (SHA-256 of its public key, 32 hex chars), as manifests carry it."""
        click.echo(load_key(ref).fingerprint)

    @keys.command("space")
    @click.option("--scheme", default="etc", show_default=True)
    @click.option("--image-size", type=int, required=True, help="image side (square) in pixels")
    @click.option("--block-size", type=int, default=None, help="block size (scheme default if omitted)")
    def space(scheme, image_size, block_size):
        """Print log2 and log10 of a configuration's key space."""
        name, _ = parse_scheme_spec(scheme)
        bits = key_space(scheme, image_size, block_size)
        label = spec_label(scheme)
        click.echo(f"scheme {label} image {image_size}x{image_size} block {block_size or 'default'}: "
                   f"log2 = {bits:.1f}, log10 = {bits * 0.30103:.1f}")
        if name != "plain" and bits < MIN_KEY_BITS:
            click.secho(weak_key_message(label, bits, image_size, image_size, block_size), fg="red", err=True)
