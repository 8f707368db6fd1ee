"""``etc-data encrypt|decrypt``: a folder or .zip of images to a folder of lossless PNGs."""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from pathlib import Path

import click
import numpy as np

from ..errors import EtcError
from ..keys import load_key
from ..schemes import PAD_POLICIES, WeakKeyWarning, make_scheme
from ..sources import FolderSource, SourceError, decode_image
from .keys import key_option


def _write_png(img: np.ndarray, path: Path) -> None:
    """Write atomically: a half-written file never carries the final name."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    try:
        Image.fromarray(img).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_folder(direction: str, key_ref, scheme_spec, block_size, dataset, pad, src, dst, batch=256) -> int:
    from tqdm import tqdm

    key = load_key(key_ref)
    scheme = make_scheme(scheme_spec, key=key, dataset=dataset, block_size=block_size, pad=pad)
    source = FolderSource(src)
    dst = Path(dst)
    # every image of the folder, with its relative path kept; grouped by size so that batches are arrays
    entries = [(s, it) for s in source.splits for it in source.items(s)]
    done = 0
    with tqdm(total=len(entries), unit="img", desc=direction) as bar:
        groups: dict[tuple, list] = defaultdict(list)
        warned: set[tuple] = set()

        def flush(shape):
            nonlocal done
            group = groups.pop(shape)
            x = np.stack([g[1] for g in group])
            if direction == "encrypt" and shape not in warned:
                warned.add(shape)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", WeakKeyWarning)
                    scheme.warn_if_weak(shape[0], shape[1])
                for w in caught:
                    click.secho(str(w.message), fg="red", err=True)
            y = scheme.encrypt(x) if direction == "encrypt" else scheme.decrypt(x)
            for (rel, _), img in zip(group, y):
                _write_png(img, dst / (os.path.splitext(rel)[0] + ".png"))
            done += len(group)
            bar.update(len(group))

        for _, it in entries:
            name = source.item_name(it)
            img = decode_image(source.read_bytes(it), name)
            scheme.padded_size(img.shape[0], img.shape[1], item=name)  # error names the image
            groups[img.shape].append((str(it.ref), img))
            if len(groups[img.shape]) >= batch:
                flush(img.shape)
        for shape in list(groups):
            flush(shape)
    return done


def register(cli: click.Group) -> None:
    for direction in ("encrypt", "decrypt"):
        @cli.command(direction, help=f"{direction.capitalize()} every image of SRC (folder or .zip) into DST "
                                     f"as lossless PNG, keeping relative paths.")
        @key_option()
        @click.option("--scheme", default="etc", show_default=True, help="etc, blockwise[:opts], pe, ele, plain")
        @click.option("--block-size", type=int, default=None, help="block size (scheme default: etc 16)")
        @click.option("--dataset", required=True, help="dataset id (selects the per-dataset subkey)")
        @click.option("--pad", type=click.Choice(PAD_POLICIES), default="error", show_default=True,
                      help="what to do when H or W is not a multiple of the block size")
        @click.argument("src", type=click.Path(exists=True))
        @click.argument("dst", type=click.Path(file_okay=False))
        def cmd(key_ref, scheme, block_size, dataset, pad, src, dst, _direction=direction):
            try:
                n = run_folder(_direction, key_ref, scheme, block_size, dataset, pad, src, dst)
            except SourceError as e:
                raise EtcError(str(e)) from None
            click.echo(f"{_direction}ed {n} images into {dst}")
