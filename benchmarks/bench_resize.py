"""The resize path of ``etc-data prepare --resize S`` (shorter side to S, bicubic, centre crop):
Pillow (the default) against pillow-simd (an opt-in drop-in replacement of PIL).

pillow-simd replaces the ``PIL`` package, so it cannot sit next to Pillow in the project's venv. It
is measured in a separate throwaway venv: this script re-runs itself there with ``--worker`` (that
mode needs only numpy and PIL) and prints both figures from one run:

    apt-get install -y libjpeg-dev zlib1g-dev          # headers pillow-simd builds against
    python3 -m venv /tmp/simdvenv && /tmp/simdvenv/bin/pip install numpy pillow-simd
    python benchmarks/bench_resize.py --simd-python /tmp/simdvenv/bin/python

Inputs: the real Imagenette images of ../shared/data (224 px) resized to 160, and the same images
first enlarged to 448x336 (an original-size-like landscape, outside the timing) resized to 224.
One thread, so the figure is per core; prepare runs one such loop per worker process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ETC_DATA_SHARED", ROOT.parent / "shared" / "data"))


def resize_shorter_center_crop(img, size):
    """Same arithmetic as etc_data.sources.resize_shorter_center_crop (kept here so the worker
    mode runs in a venv without etc_data)."""
    import numpy as np
    from PIL import Image

    h, w = img.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    im = Image.fromarray(img).resize((nw, nh), Image.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def worker(limit: int, repeat: int) -> dict:
    import io

    import numpy as np
    import PIL
    from PIL import Image

    with zipfile.ZipFile(SHARED / "imagenette-224-subset.zip") as z:
        names = sorted(n for n in z.namelist() if n.endswith(".JPEG"))[:limit]
        imgs = [np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")) for n in names]
    big = [np.asarray(Image.fromarray(im).resize((448, 336), Image.BICUBIC)) for im in imgs]
    out = {"pil": f"{PIL.__version__} ({'simd' if 'post' in PIL.__version__ else 'Pillow'})", "images": len(imgs)}
    for label, src, size in (("224->160", imgs, 160), ("448x336->224", big, 224)):
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            res = [resize_shorter_center_crop(im, size) for im in src]
            best = min(best, time.perf_counter() - t)
        out[label] = {"seconds": best, "img_per_s": len(src) / best,
                      "checksum": int(sum(int(r[::17, ::13].sum()) for r in res))}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--simd-python", default=None, help="python of a venv with pillow-simd installed")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.limit, a.repeat)))
        return
    runs = {"Pillow": worker(a.limit, a.repeat)}
    if a.simd_python:
        r = subprocess.run([a.simd_python, __file__, "--worker", "--limit", str(a.limit), "--repeat", str(a.repeat)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"pillow-simd run failed:\n{r.stderr}")
        runs["pillow-simd"] = json.loads(r.stdout.strip().splitlines()[-1])
    else:
        print("(no --simd-python given: Pillow only)")
    for name, r in runs.items():
        print(f"{name:12s} PIL {r['pil']}, {r['images']} images")
        for label in ("224->160", "448x336->224"):
            print(f"  {label:14s} {r[label]['seconds']:.3f} s  {r[label]['img_per_s']:.0f} img/s")
    if "pillow-simd" in runs:
        for label in ("224->160", "448x336->224"):
            p, s = runs["Pillow"][label], runs["pillow-simd"][label]
            print(f"speed-up {label}: {p['seconds'] / s['seconds']:.2f}x; pixel checksum "
                  f"{'equal' if p['checksum'] == s['checksum'] else 'differs (other rounding)'}")


if __name__ == "__main__":
    main()
