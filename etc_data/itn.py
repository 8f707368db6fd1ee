"""The inverse transformation network (ITN) attack: a learned, key-less attack on learnable encryption.

The attacker knows the algorithm (scheme, options, block size) and the data distribution, but not
the key. They take public images of that distribution (e.g. the CIFAR-10 training copies), encrypt
them with the real scheme under fresh random keys of their own, and train a small image-to-image
network to map ciphertexts back to plain images. No key repeats (a few per batch, thousands per
run), so the network can only learn what does not depend on the key; applied to ciphertexts of
other images under a key it never saw (the audit's ephemeral key), what it recovers is what the
scheme leaks to anyone who knows how it works. This is the ITN attack of the Kiya lab's security
comparison (MaungMaung & Kiya, Fig. 8; public code: Ito, ``learnable_encryption_robustness``).

Network, after that public code (a block embedding, 1x1 layers, a pixel shuffle back to full
resolution), plus two 3x3 layers for context between neighbouring blocks and pixels. Its input is
the ciphertext x in [-1, 1] and |x| (what a negative-positive transform leaves; a fixed first
nonlinearity the attacker chooses because they know the schemes use it, which speeds training):

    conv(6 -> D, kernel = stride = B)  BN ReLU     B = the scheme's block size (1 for PE: per pixel)
    conv(D -> D, 1x1)                  BN ReLU
    conv(D -> D, 3x3)                  BN ReLU     over the block grid
    conv(D -> 16 B^2, 1x1), pixel shuffle (B)  ReLU
    conv(16 -> 16, 3x3)                BN ReLU     at full resolution
    conv(16 -> 3, 1x1), sigmoid

Trained with Adam on the mean squared error against the plain image (the reference: SGD, 50
epochs over 50,000 images); here for a time or step budget, on a GPU when there is one.
Library code: torch is imported inside the functions that need it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .errors import EtcError
from .schemes import make_scheme


class ITNError(EtcError):
    pass


@dataclass
class ITNConfig:
    seconds: float | None = 60.0  # training time budget; ignored when ``steps`` is given
    steps: int | None = None      # exact number of optimiser steps
    batch_size: int = 32
    keys_per_batch: int = 4       # fresh random keys per batch (the batch is split among them)
    lr: float = 2e-3
    device: str = "auto"          # auto: cuda when available, else cpu
    seed: int = 0

    def check(self) -> None:
        if self.steps is None and (self.seconds is None or self.seconds <= 0):
            raise ITNError(f"ITN needs a positive time budget or a step count, got seconds={self.seconds} "
                           f"steps={self.steps}")
        if self.steps is not None and self.steps < 1:
            raise ITNError(f"ITN steps must be >= 1, got {self.steps}")
        if self.batch_size < 1 or not 1 <= self.keys_per_batch <= self.batch_size:
            raise ITNError(f"ITN batch size {self.batch_size} and keys per batch {self.keys_per_batch} must satisfy "
                           f"1 <= keys <= batch")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ITNError(f"ITN device must be auto, cpu or cuda, got {self.device!r}")


def width_for(block_size: int) -> int:
    """Embedding width D: about a block's 3 B^2 values, at least 64 (32 per pixel), at most 256:
    small enough to train for a few minutes on two CPU cores."""
    return 32 if block_size <= 1 else int(min(256, max(64, 3 * block_size * block_size)))


def build_itn(block_size: int):
    import torch
    import torch.nn as nn

    B, D, c = int(block_size), width_for(block_size), 16

    def cbr(i, o, k, s=1, p=0):
        return [nn.Conv2d(i, o, k, s, p), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    class Fold(nn.Module):
        def forward(self, x):
            return torch.cat([x, x.abs()], dim=1)

    return nn.Sequential(Fold(), *cbr(6, D, B, B), *cbr(D, D, 1), *cbr(D, D, 3, 1, 1),
                         nn.Conv2d(D, c * B * B, 1), nn.PixelShuffle(B), nn.ReLU(inplace=True),
                         *cbr(c, c, 3, 1, 1), nn.Conv2d(c, 3, 1), nn.Sigmoid())


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ITNError("ITN device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def _to_tensor(x: np.ndarray, dev):
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1], channels-last in memory (faster convolutions)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)).to(dev).permute(0, 3, 1, 2).float().div_(255)


def encrypt_random_keys(spec: str, block_size: int, x: np.ndarray, n_keys: int, rng) -> np.ndarray:
    """``x`` encrypted in ``n_keys`` groups, each under a fresh random key drawn from ``rng``."""
    out = np.empty_like(x)
    for part in np.array_split(np.arange(len(x)), n_keys):
        if len(part):
            out[part] = make_scheme(spec, subkey=rng.bytes(32), block_size=block_size).encrypt(x[part])
    return out


def train_itn(spec: str, block_size: int, images: np.ndarray, cfg: ITNConfig | None = None, progress=None):
    """Train an ITN for ``spec`` on public uint8 ``images`` (N, H, W, 3) under random keys.

    Returns (network in eval mode, info: steps, keys, seconds, images, device, loss)."""
    import torch

    cfg = cfg or ITNConfig()
    cfg.check()
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ITNError(f"ITN training images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dev = _device(cfg.device)
    net = build_itn(block_size).to(dev, memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    bs = min(cfg.batch_size, len(images))
    t0, step, loss_avg = time.perf_counter(), 0, None
    while (step < cfg.steps) if cfg.steps is not None else (time.perf_counter() - t0 < cfg.seconds):
        x = images[rng.integers(0, len(images), bs)]
        enc = encrypt_random_keys(spec, block_size, x, cfg.keys_per_batch, rng)
        loss = torch.nn.functional.mse_loss(net(_to_tensor(enc, dev) * 2 - 1), _to_tensor(x, dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        lv = float(loss.detach())
        loss_avg = lv if loss_avg is None else 0.95 * loss_avg + 0.05 * lv
        if progress:
            progress(step)
    info = {"steps": step, "keys": step * cfg.keys_per_batch, "seconds": round(time.perf_counter() - t0, 1),
            "images": len(images), "batch_size": bs, "device": str(dev), "loss": loss_avg}
    return net.eval(), info


def itn_restore(net, enc: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Apply a trained ITN to uint8 ciphertexts (N, H, W, 3); returns uint8 restorations."""
    import torch

    dev = next(net.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(enc), batch_size):
            y = net(_to_tensor(enc[i:i + batch_size], dev) * 2 - 1)
            out.append((y.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out) if out else np.empty_like(enc)


__all__ = ["ITNConfig", "ITNError", "build_itn", "encrypt_random_keys", "itn_restore", "train_itn"]
