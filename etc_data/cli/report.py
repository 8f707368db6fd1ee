"""``etc-data report sizes``: the compression-size report (the paper's Table IV, and beyond)."""

from __future__ import annotations

import click

from .options import key_option


def register(cli: click.Group) -> None:
    from ..report import DEFAULT_CODECS, DEFAULT_SCHEMES

    @cli.group()
    def report():
        """Reports on what encryption costs."""

    @report.command("sizes")
    @click.option("--source", "sources", multiple=True, required=True, help="any source etc-data prepare reads")
    @click.option("--schemes", default=",".join(DEFAULT_SCHEMES), show_default=True,
                  help="comma-separated scheme specs (options too: plain,etc,etc:common=1,sub=8,le)")
    @click.option("--codec", "codecs", multiple=True, help="codec spec; repeat (parameters contain commas). "
                  f"Default: {', '.join(DEFAULT_CODECS)}")
    @click.option("--block-size", type=int, default=16, show_default=True,
                  help="block size of etc / blockwise (le and ele use 4, pe is per pixel)")
    @key_option(help_extra="Default: an ephemeral random key, never stored.")
    @click.option("--dataset", default=None, help="dataset id for the subkey (with --key)")
    @click.option("--split", "splits", multiple=True, help="only these splits (default: all)")
    @click.option("--limit", type=int, default=None, help="at most N images per split")
    @click.option("--resize", type=int, default=None, help="shorter side to N then centre crop")
    @click.option("--workers", type=int, default=None, help="encoder threads (default: all cores)")
    @click.option("--on-bad-image", type=click.Choice(["stop", "skip"]), default="stop", show_default=True)
    @click.option("--psnr/--no-psnr", default=True, show_default=True,
                  help="decode, decrypt and score lossy codecs (--no-psnr: sizes only, about a third faster)")
    @click.option("--out", required=True, help="folder (or URL) for sizes.json/.md/.png")
    def sizes(sources, schemes, codecs, block_size, key_ref, dataset, splits, limit, resize, workers, on_bad_image, psnr,
              out):
        """Encode every image once per scheme and codec; write sizes.json, sizes.md, sizes.png."""
        from tqdm import tqdm

        from ..report import ReportConfig, size_report
        from ..schemes import split_scheme_list
        from ..sources import open_source

        cfg = ReportConfig(source=list(sources), out=out, schemes=split_scheme_list(schemes),
                           codecs=list(codecs) or list(DEFAULT_CODECS), block_size=block_size, key_ref=key_ref,
                           dataset=dataset, splits=list(splits) or None, limit=limit, resize=resize, workers=workers,
                           on_bad_image=on_bad_image, psnr=psnr)
        cfg.check()
        src = open_source(cfg.source, resize=resize)
        total = sum(min(len(src.items(s)), limit or 10**12) for s in (cfg.splits or src.splits))
        with tqdm(total=total, unit="img", desc="report") as bar:
            rep = size_report(cfg, progress=bar.update, source=src)  # opened once: its total sizes the bar
        click.echo(rep.markdown())
        if key_ref is None:
            click.echo("(an ephemeral random key was used and discarded)")
        click.echo(f"wrote {out}/sizes.json, sizes.md, sizes.png")
