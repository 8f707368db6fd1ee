"""``etc-data encrypt|decrypt``: a folder or .zip of images to a folder of lossless PNGs (encrypt
records its parameters in ``etc-data-folder.json``; decrypt reads them and refuses another key)."""

from __future__ import annotations

import click

from ..schemes import PAD_POLICIES
from .options import image_limit_options, key_option


SIDECAR_NOTE = {"encrypt": "; recorded in DST/etc-data-folder.json",
                "decrypt": "; default: what SRC/etc-data-folder.json records (checked against it when given)"}


def register(cli: click.Group) -> None:
    for direction in ("encrypt", "decrypt"):
        @cli.command(direction, help=f"{direction.capitalize()} every image of SRC (folder or .zip) into DST "
                                     f"as lossless PNG, keeping relative paths.")
        @key_option()
        @click.option("--scheme", default=None, help="etc, blockwise[:opts], pe, ele, plain [default: etc]"
                      + SIDECAR_NOTE[direction])
        @click.option("--block-size", type=int, default=None, help="block size (scheme default: etc 16)"
                      + SIDECAR_NOTE[direction])
        @click.option("--dataset", required=direction == "encrypt", default=None,
                      help="dataset id (selects the per-dataset subkey)" + SIDECAR_NOTE[direction])
        @click.option("--pad", type=click.Choice(PAD_POLICIES), default=None,
                      help="what to do when H or W is not a multiple of the block size [default: error]"
                      + SIDECAR_NOTE[direction])
        @click.option("--on-bad-image", type=click.Choice(["stop", "skip"]), default="stop", show_default=True,
                      help="an unreadable image (or one past the limits) stops the job, or is skipped and listed")
        @image_limit_options
        @click.argument("src", type=click.Path(exists=True))
        @click.argument("dst", type=click.Path(file_okay=False))
        def cmd(key_ref, scheme, block_size, dataset, pad, on_bad_image, max_image_pixels, max_image_bytes, src, dst,
                _direction=direction):
            import warnings

            from tqdm import tqdm

            from ..folders import FolderConfig, decrypt_folder, encrypt_folder
            from ..schemes import WeakKeyWarning

            cfg = FolderConfig(src=src, dst=dst, dataset=dataset or "", key_ref=key_ref, scheme=scheme,
                               block_size=block_size, pad=pad, on_bad_image=on_bad_image,
                               max_image_pixels=max_image_pixels, max_image_bytes=max_image_bytes)
            job = encrypt_folder if _direction == "encrypt" else decrypt_folder
            skipped: list[str] = []

            def progress(done, total):
                bar.total = total
                bar.update(done - bar.n)

            with tqdm(unit="img", desc=_direction) as bar, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", WeakKeyWarning)
                n = job(cfg, progress=progress, on_skip=lambda name, reason: skipped.append(reason))
            for w in caught:
                if issubclass(w.category, WeakKeyWarning):
                    click.secho(str(w.message), fg="red", err=True)
            for reason in skipped:
                click.echo(f"skipped: {reason}", err=True)
            click.echo(f"{_direction}ed {n} images into {dst}" + (f"; skipped {len(skipped)}" if skipped else ""))
