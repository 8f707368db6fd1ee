"""The two facts behind augmentation in the encrypted domain, on real CIFAR images."""

import numpy as np
import pytest
import torch

from etc_data.augment import block_box, block_cutmix, encrypt_float
from etc_data.schemes import make_scheme


def test_mixup_commutes_with_etc(cifar_exact):
    s = make_scheme("etc", subkey=b"\x07" * 32, block_size=8)
    a, b = cifar_exact["x_test"][:50].astype(np.float64), cifar_exact["x_test"][50:100].astype(np.float64)
    for lam in (0.0, 0.3, 0.77, 1.0):
        mixed_plain = lam * a + (1 - lam) * b
        lhs = encrypt_float(s, mixed_plain)
        rhs = lam * encrypt_float(s, a) + (1 - lam) * encrypt_float(s, b)
        assert np.allclose(lhs, rhs, atol=1e-9)
    # and encrypt_float agrees with the uint8 scheme on integer images
    assert np.array_equal(encrypt_float(s, a).astype(np.uint8), s.encrypt(cifar_exact["x_test"][:50]))


def test_mixup_does_not_commute_with_a_per_image_key(cifar_exact):
    """Control: with a different key per image (PE's original setting) the fact fails."""
    s1, s2 = make_scheme("etc", subkey=b"\x01" * 32, block_size=8), make_scheme("etc", subkey=b"\x02" * 32, block_size=8)
    a, b = cifar_exact["x_test"][:20].astype(np.float64), cifar_exact["x_test"][20:40].astype(np.float64)
    assert not np.allclose(encrypt_float(s1, 0.5 * a + 0.5 * b), 0.5 * encrypt_float(s1, a) + 0.5 * encrypt_float(s2, b))


def test_block_cutmix_has_an_exact_plain_counterpart(cifar_exact):
    B = 8
    s = make_scheme("etc", subkey=b"\x07" * 32, block_size=B)
    keys = s.keys_for(32, 32)
    a, b = cifar_exact["x_train"][:30], cifar_exact["x_train"][30:60]
    ea, eb = s.encrypt(a), s.encrypt(b)
    rng = np.random.default_rng(0)
    for _ in range(10):
        top, left, bh, bw = block_box(32, 32, B, float(rng.uniform(0.1, 0.9)), rng)
        mixed_enc = ea.copy()
        mixed_enc[:, top:top + bh, left:left + bw] = eb[:, top:top + bh, left:left + bw]
        # the encrypted blocks in the box came from plain blocks perm[i]
        sel = [(r // B) * 4 + (c // B) for r in range(top, top + bh, B) for c in range(left, left + bw, B)]
        mixed_plain = a.copy()
        for i in sel:
            j = keys.perm[i]
            r, c = (j // 4) * B, (j % 4) * B
            mixed_plain[:, r:r + B, c:c + B] = b[:, r:r + B, c:c + B]
        assert np.array_equal(s.encrypt(mixed_plain), mixed_enc)
        lam = 1 - bh * bw / 1024
        assert lam == pytest.approx(1 - len(sel) * B * B / 1024)


def test_a_box_cutting_through_blocks_has_no_plain_counterpart(cifar_exact):
    s = make_scheme("etc", subkey=b"\x07" * 32, block_size=16)
    a, b = cifar_exact["x_train"][:5], cifar_exact["x_train"][5:10]
    mixed_enc = s.encrypt(a)
    mixed_enc[:, 4:20, 4:20] = s.encrypt(b)[:, 4:20, 4:20]  # straddles all 4 blocks
    dec = s.decrypt(mixed_enc)
    # decrypting gives neither image on any whole block: pieces land rotated/flipped/inverted
    for img in range(5):
        assert not np.array_equal(dec[img], a[img])


def test_block_cutmix_torch_boxes_are_aligned_and_labels_exact():
    x = torch.arange(4 * 3 * 32 * 32, dtype=torch.float32).reshape(4, 3, 32, 32)
    y = torch.eye(4)
    rng = np.random.default_rng(1)
    for _ in range(20):
        xm, ym = block_cutmix(x, y, 8, 1.0, rng)
        changed = (xm != x).any(1).any(0)
        rows, cols = torch.nonzero(changed, as_tuple=True)
        if len(rows):
            assert rows.min() % 8 == 0 and (rows.max() + 1) % 8 == 0 and cols.min() % 8 == 0
            frac = changed.float().mean().item()
            assert ym[0, 0].item() == pytest.approx(1 - frac)
        assert torch.allclose(ym.sum(1), torch.ones(4))
