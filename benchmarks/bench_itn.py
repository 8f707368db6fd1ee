"""The security figure: plain-image SSIM of every scheme under the ciphertext-only attacks, the
inverse transformation network (ITN) next to the jigsaw solver and feature reconstruction (the
comparison of MaungMaung & Kiya, Fig. 6 and Fig. 8).

Audits the exact CIFAR-10 test subset (a deterministic sample) for EtC, etc:common=1 (with and
without sub-blocks), blockwise (block 16), LE and ELE (4x4 blocks) and PE; the ITN of each scheme
trains on the CIFAR-10 training JPEG copies under fresh random keys for a time budget (GPU when
there is one) and is applied under the audit's own ephemeral key. Writes audit.json/.md,
ssim_boxplot.png and examples.png into --out and prints the table docs/security.md quotes.

    python benchmarks/bench_itn.py [--sample 32] [--seconds 180] [--device auto] [--out out/itn]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from etc_data.audit import AuditConfig, audit_schemes

SHARED = Path(os.environ.get("ETC_DATA_SHARED", Path(__file__).resolve().parents[2] / "shared" / "data"))
SCHEMES = ["etc", "etc:common=1", "etc:common=1,sub=8", "blockwise", "le", "ele", "pe"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(SHARED / "cifar10-lossless-subset.npz"))
    ap.add_argument("--train", default=str(SHARED / "cifar10-train-jpeg.zip"), help="the attacker's public images")
    ap.add_argument("--scheme", action="append", help=f"default: {', '.join(SCHEMES)}")
    ap.add_argument("--sample", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=180.0, help="ITN training time per scheme")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="out/itn")
    a = ap.parse_args()
    schemes = a.scheme or SCHEMES
    t0 = time.perf_counter()
    rep = audit_schemes(AuditConfig(source=a.source, schemes=schemes, sample=a.sample, attacks=["itn"],
                                    itn_train=a.train, itn_seconds=a.seconds * len(schemes), itn_device=a.device,
                                    out=a.out))
    table: dict = {}
    for r in rep["results"]:
        table.setdefault(f"{r['scheme']}/B{r['block_size']}", {})[r["attack"]] = r["ssim_mean"]
    print(f"{rep['source']} {rep['split']}, {rep['sample']} images; ITN trained on {rep['itn']['train_images']} "
          f"images of {rep['itn']['train_source']}")
    print("| scheme / block | encrypted | jigsaw | FR | ITN | ITN steps (batch 32), time, device |")
    print("|---|---|---|---|---|---|")
    for lab, s in table.items():
        c = rep["itn"]["configs"][lab]
        cells = [f"{s[k]:.3f}" if k in s else "n/a" for k in ("none", "jigsaw", "fr", "itn")]
        print(f"| {lab} | " + " | ".join(cells) + f" | {c['steps']}, {c['seconds']} s, {c['device']} |")
    print(f"total {time.perf_counter() - t0:.0f} s; figures in {a.out}/ssim_boxplot.png, {a.out}/examples.png")


if __name__ == "__main__":
    main()
