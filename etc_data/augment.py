"""Augmentation in the encrypted domain.

Two facts make mixing augmentations safe on EtC images (one key for the whole dataset):

1. Mixup commutes exactly with encryption. Every EtC step is a permutation of values or the
   affine map q -> 255 - q, so on real-valued images E(l*a + (1-l)*b) = l*E(a) + (1-l)*E(b) since
   the mixup weights sum to 1. ``encrypt_float`` is that extension of a scheme to float images.
2. CutMix on whole blocks has an exact plain counterpart: pasting a set S of encrypted blocks of
   image b into image a equals encrypting the plain images mixed on the blocks that S came from
   (``perm[S]`` for EtC), with the same label ratio. A box that cuts through blocks has none, so
   ``block_cutmix`` draws boxes on the block grid.
"""

from __future__ import annotations

import numpy as np


def encrypt_float(scheme, x: np.ndarray) -> np.ndarray:
    """Apply a scheme's plan to real-valued images (N, H, W, 3): permutation, then 255 - v on the mask."""
    n, h, w, _ = x.shape
    p = scheme.plan(h, w)
    y = x.reshape(n, -1)[:, p.idx]
    if p.mask is not None:
        flip = p.mask.astype(bool)
        y[:, flip] = 255.0 - y[:, flip]
    return y.reshape(x.shape)


def block_box(h: int, w: int, block: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box on the block grid covering about (1 - lam) of the image: (top, left, height, width) in pixels."""
    hb, wb = h // block, w // block
    cut = np.sqrt(1.0 - lam)
    bh = int(np.clip(round(hb * cut), 0, hb))
    bw = int(np.clip(round(wb * cut), 0, wb))
    top = int(rng.integers(0, hb - bh + 1)) if bh < hb else 0
    left = int(rng.integers(0, wb - bw + 1)) if bw < wb else 0
    return top * block, left * block, bh * block, bw * block


def block_cutmix(x, y_onehot, block: int, alpha: float = 1.0, rng: np.random.Generator | None = None):
    """CutMix with block-aligned boxes on a torch batch (N, C, H, W); pairs each image with the
    batch flipped. Returns mixed images and soft labels with the exact area ratio."""
    rng = rng or np.random.default_rng()
    lam = float(rng.beta(alpha, alpha))
    h, w = x.shape[-2:]
    top, left, bh, bw = block_box(h, w, block, lam, rng)
    lam_exact = 1.0 - (bh * bw) / float(h * w)
    if bh and bw:
        x = x.clone()
        x[..., top:top + bh, left:left + bw] = x.flip(0)[..., top:top + bh, left:left + bw]
    return x, lam_exact * y_onehot + (1.0 - lam_exact) * y_onehot.flip(0)
