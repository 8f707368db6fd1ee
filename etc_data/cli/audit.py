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
                  help="scheme spec(s); repeat or comma-separate (etc,etc:common=1,sub=8,le,ele,pe,blockwise)")
    @click.option("--block-size", "block_sizes", multiple=True,
                  help="block size(s); repeat or comma-separate. Default: each scheme's own (etc/blockwise 16, "
                       "le/ele 4); pe is always per pixel")
    @click.option("--sample", type=int, default=16, show_default=True, help="number of images (deterministic)")
    @click.option("--split", default=None, help="split to sample (default test, val, or the first)")
    @click.option("--seed", type=int, default=0, show_default=True, help="sampling seed")
    @click.option("--attack", "attacks", multiple=True, type=click.Choice(["itn"]),
                  help="add a learned attack to jigsaw and fr: itn (inverse transformation network)")
    @click.option("--itn-train", default=None,
                  help="public images the ITN trains on (default: the source's other split, e.g. train)")
    @click.option("--itn-images", type=int, default=50000, show_default=True, help="at most this many of them")
    @click.option("--itn-seconds", type=float, default=300.0, show_default=True,
                  help="ITN training time for all schemes and block sizes together")
    @click.option("--itn-steps", type=int, default=None, help="instead: ITN steps per scheme and block size")
    @click.option("--itn-device", default="auto", show_default=True, help="auto (cuda when available), cpu, cuda")
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="output folder")
    def audit(source, schemes, block_sizes, sample, split, seed, attacks, itn_train, itn_images, itn_seconds, itn_steps,
              itn_device, out):
        """Measure leakage: SSIM/PSNR of encrypted vs plain, jigsaw and FR attacks (and the ITN with
        --attack itn), key space.

        Ciphertexts are made with an ephemeral random key: the attacks never see a key."""
        from ..audit import AuditConfig, audit_schemes
        from ..schemes import split_scheme_list

        cfg = AuditConfig(source=source, schemes=split_scheme_list(schemes),
                          block_sizes=_split_list(block_sizes, int) or None, out=out, sample=sample, split=split,
                          seed=seed, attacks=list(attacks), itn_train=itn_train, itn_images=itn_images,
                          itn_seconds=itn_seconds, itn_steps=itn_steps, itn_device=itn_device)
        rep = audit_schemes(cfg)
        for w in rep["weak_key_warnings"]:
            click.echo(w if w.lower().startswith("warning") else f"warning: {w}", err=True)
        for r in rep["results"]:
            click.echo(f"{r['scheme']:22s} B={r['block_size']:<3d} {r['attack']:7s} "
                       f"SSIM={r['ssim_mean']:.3f} PSNR={r['psnr_mean']:.2f}")
        if rep["itn"]:
            i = rep["itn"]
            click.echo(f"itn: trained on {i['train_images']} images of {i['train_source']} under random keys: " + "; ".join(
                f"{lab} {c['steps']} steps/{c['seconds']} s on {c['device']}" for lab, c in i["configs"].items()))
        click.echo(f"wrote {out}/audit.json, audit.md, ssim_boxplot.png, examples.png")
