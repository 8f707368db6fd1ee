"""``etc-data audit``: ciphertext-only attacks and visual-similarity measures on a source sample."""

from __future__ import annotations

import click


def _split_list(values, conv=str):
    out = []
    for v in values:
        for part in str(v).split(","):
            if part.strip():
                try:
                    out.append(conv(part.strip()))
                except ValueError:
                    raise click.BadParameter(f"not a number: {part!r}")
    return out


def register(cli: click.Group) -> None:
    @cli.command("audit")
    @click.option("--source", required=True, help="anything open_source opens (.npz, folder, .zip)")
    @click.option("--scheme", "schemes", multiple=True, default=["etc"], show_default=True,
                  help="scheme(s); repeat or comma-separate")
    @click.option("--block-size", "block_sizes", multiple=True, default=["16"], show_default=True,
                  help="block size(s); repeat or comma-separate")
    @click.option("--sample", type=int, default=16, show_default=True, help="number of images (deterministic)")
    @click.option("--split", default=None, help="split to sample (default test, val, or the first)")
    @click.option("--seed", type=int, default=0, show_default=True, help="sampling seed")
    @click.option("--lpips-weights", default=None, help="local LPIPS weights (nothing is downloaded)")
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="output folder")
    def audit(source, schemes, block_sizes, sample, split, seed, lpips_weights, out):
        """Measure leakage: SSIM/PSNR of encrypted vs plain, jigsaw and FR attacks, key space.

        Ciphertexts are made with an ephemeral random key: the attacks never see a key."""
        from ..audit import AuditConfig, audit_schemes

        cfg = AuditConfig(source=source, schemes=_split_list(schemes), block_sizes=_split_list(block_sizes, int),
                          out=out, sample=sample, split=split, seed=seed, lpips_weights=lpips_weights)
        rep = audit_schemes(cfg)
        for w in rep["weak_key_warnings"]:
            click.echo(w if w.lower().startswith("warning") else f"warning: {w}", err=True)
        for r in rep["results"]:
            click.echo(f"{r['scheme']:10s} B={r['block_size']:<3d} {r['attack']:7s} "
                       f"SSIM={r['ssim_mean']:.3f} PSNR={r['psnr_mean']:.2f}")
        click.echo(rep["lpips"])
        click.echo(f"wrote {out}/audit.json, audit.md, ssim_boxplot.png, examples.png")
