"""The headline case of model encryption for compressible images: a ViT-B/16 at 224 px turned into a
model for etc:common=1 images (block 16 = its patch), measured on real Imagenette images.

No pretrained weights can be downloaded here, so timm's ``vit_base_patch16_224`` architecture is
built with its random initialisation (seeded): the exactness of the weight transform does not
depend on the weights. Through the real job path (``encrypt_checkpoint`` with an owner key made for
the run), for etc:common=1 (scrambled through the position embeddings) and its two-level form
etc:common=1,sub=8, with ImageNet normalisation, it prints:

* max |logit difference| between (plain model, plain images) and (encrypted model, encrypted
  images), and whether every top-1 prediction agrees;
* the key space note encrypt-model prints (196! block orders x 96 for etc:common=1);
* JPEG QF85 4:4:4 bytes per image of the same Imagenette images, plain vs encrypted.

    python benchmarks/bench_vit_etc_common.py [--images 8] [--size-images 1000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

SHARED = Path(os.environ.get("ETC_DATA_SHARED", Path(__file__).resolve().parents[2] / "shared" / "data"))
SPECS = ["etc:common=1", "etc:common=1,sub=8"]
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def imagenette(n: int) -> np.ndarray:
    from etc_data.images import decode_image

    with zipfile.ZipFile(SHARED / "imagenette-224-subset.zip") as z:
        names = sorted(x for x in z.namelist() if x.endswith(".JPEG"))
        names = names[:: max(1, len(names) // n)][:n]
        return np.stack([decode_image(z.read(x), x) for x in names])


def logits(ck: dict, x: np.ndarray) -> torch.Tensor:
    from etc_data.checkpoint import model_from_checkpoint

    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    t = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        return model_from_checkpoint(ck).eval()(t)


def main() -> None:
    from etc_data.codecs import get_codec
    from etc_data.keys import load_key, new_key_file
    from etc_data.modelcrypt import encrypt_checkpoint
    from etc_data.models import create_model, vit_config
    from etc_data.schemes import make_scheme

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="images for the logit comparison")
    ap.add_argument("--size-images", type=int, default=1000, help="images for the JPEG sizes")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = dict(vit_config("vit_base_patch16_224"), img_size=224, num_classes=1000)
    t0 = time.perf_counter()
    ck = {"format": "etc-data-ckpt/1", "model": create_model(cfg).state_dict(), "model_config": cfg,
          "normalize": {"mean": IMAGENET[0], "std": IMAGENET[1]},
          "scheme": {"scheme": "plain", "block_size": None, "pad": "error", "options": {}}, "dataset": "inet",
          "key_fingerprint": None}
    x = imagenette(a.images)
    plain = logits(ck, x)
    with tempfile.TemporaryDirectory() as d:
        new_key_file(Path(d) / "owner.key", "bench")
        key = load_key(str(Path(d) / "owner.key"))
        for spec in SPECS:
            enc_ck, note = encrypt_checkpoint(ck, key, "inet", spec)
            s = make_scheme(spec, key=key, dataset="inet", block_size=16)
            enc = logits(enc_ck, s.encrypt(x))
            wrong = logits(enc_ck, x)
            print(f"{spec}: max |logit diff| {float((plain - enc).abs().max()):.2e} over {len(x)} Imagenette images "
                  f"x 1000 classes; top-1 agrees: {bool((plain.argmax(1) == enc.argmax(1)).all())}; encrypted model on "
                  f"plain images: max |diff| {float((plain - wrong).abs().max()):.2f}")
            print(f"  {note}")
        sizes = imagenette(a.size_images)
        codec = get_codec("jpeg:q=85,sub=444")
        base = sum(map(len, codec.encode_many(sizes)))
        for spec in ["etc", *SPECS, "blockwise"]:
            s = make_scheme(spec, key=key, dataset="inet", block_size=16)
            n = sum(map(len, codec.encode_many(s.encrypt(sizes))))
            print(f"JPEG QF85 4:4:4, {len(sizes)} Imagenette images: {spec} {n / len(sizes):,.0f} B/image, "
                  f"x{n / base:.4f} of plain ({base / len(sizes):,.0f} B)")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
