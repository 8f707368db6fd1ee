"""The encrypt-model job (Iijima & Kiya; MaungMaung & Kiya): turn a model trained on plain images
into one that gives exactly the same outputs on images encrypted with a scheme that applies one
transform to every block: ``blockwise``, or the JPEG-compressible ``etc:common=1[,sub=S]``.

    from etc_data import ModelCryptConfig, encrypt_model
    encrypt_model(ModelCryptConfig(in_ckpt="runs/plain/best.pt", out_ckpt="runs/enc.pt",
                                   key_ref="owner.key", dataset="cifar10"))
    # or: shards="ROOT/test" instead of dataset: id and scheme from that split's signed manifest

The ``blockwise`` scheme (block size P = the model's patch size) maps every P x P x 3 block ``q``
(values in (row, col, channel) order) to ``e[k] = q[inner[k]]`` or ``255 - q[inner[k]]`` where
``negpos[k]``, and (option ``scramble``) moves block ``perm[i]`` to position ``i``. ``etc:common=1``
(one rotation/flip, negative-positive bit and colour order for every block) and its two-level form
``etc:common=1,sub=S`` (sub blocks translocated and transformed with keys shared by every main block)
are of that same form (``Scheme.patch_keys``): a fixed permutation and sign flip of each patch's
values, so the same weight transform applies. ``etc`` with a key per block is not: refused.

The patch embedding is a linear map of each block. With ``u = q / 255`` and the per-channel model
normalisation ``x = (u - m_c) / s_c``, the plain embedding is ``z = sum_j A[j] u[j] + b0`` with
``A[j] = W[j] / s_c(j)``, ``b0 = b - sum_j A[j] m_c(j)``. On an encrypted block
``u'[k] = u[inner[k]]`` (or ``1 - u[inner[k]]``), so ``A'[k] = sigma_k A[inner[k]]`` (sigma = -1 where
negated) reproduces ``z`` once the bias absorbs the constants:

    W'[k] = sigma_k * W[inner[k]] * s_c(k) / s_c(inner[k])
    b'    = b - sum_j A[j] m_c(j) + sum_k A'[k] m_c(k) - sum_{k negated} A'[k]

With mean = std = 0.5 for every channel this is a pure permutation and sign flip, ``b' = b``. The
arithmetic is done in float64 and cast back, so fp32 outputs agree to rounding.

ViT: the tokens of a scrambled image arrive in the order ``perm``; giving token ``i`` the position
embedding of plain token ``perm[i]`` (prefix/class tokens unchanged) makes the transformer, which is
otherwise permutation-equivariant over tokens, compute the same class token. ConvMixer keeps the
spatial layout in its convolutions, so it cannot absorb block scrambling: refused.

Library code: torch is imported inside the functions that need it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import EtcError
from .schemes import (N_BLOCK_TRANSFORMS, BlockKeys, Blockwise, EtC, Scheme, log2_factorial, make_scheme,
                      parse_scheme_spec, spec_of)


class ModelCryptError(EtcError):
    pass


def _patch_layer(model):
    """(arch, conv) of a timm ConvMixer or VisionTransformer."""
    from timm.models.convmixer import ConvMixer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, ConvMixer):
        return "convmixer", model.stem[0]
    if isinstance(model, VisionTransformer):
        return "vit", model.patch_embed.proj
    raise ModelCryptError(f"model encryption supports timm ConvMixer and VisionTransformer, not {type(model).__name__}")


def transform_patch_weights(weight: np.ndarray, bias: np.ndarray, keys: BlockKeys,
                            mean=(0.5,) * 3, std=(0.5,) * 3) -> tuple[np.ndarray, np.ndarray]:
    """New (weight, bias) of a patch-embedding conv (D, 3, P, P) for input encrypted with one
    per-block transform ``keys`` (``Scheme.patch_keys``)."""
    w = np.asarray(weight, dtype=np.float64)
    D, C, P, P2 = w.shape
    m = P * P * 3
    if C != 3 or P != P2 or len(keys.inner) != m:
        raise ModelCryptError(f"patch embedding weight {tuple(w.shape)} does not fit a per-block key for "
                              f"{len(keys.inner)} values per block (needs (D, 3, P, P) with 3*P*P = that)")
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    if mean.shape != (3,) or std.shape != (3,) or (std <= 0).any():
        raise ModelCryptError(f"normalisation must give 3 means and 3 positive stds, got mean={mean} std={std}")
    ch = np.arange(m) % 3                                  # channel of value k in (row, col, channel) order
    flat = w.transpose(0, 2, 3, 1).reshape(D, m)           # (out, row, col, ch) -> (D, m)
    A = flat / std[ch]                                     # weights on u = q / 255
    sigma = np.ones(m) if keys.negpos is None else np.where(keys.negpos, -1.0, 1.0)
    A2 = A[:, keys.inner] * sigma                          # A'[k] = sigma_k A[inner[k]]
    W2 = A2 * std[ch]
    b = np.zeros(D) if bias is None else np.asarray(bias, dtype=np.float64)
    neg = np.zeros(m, bool) if keys.negpos is None else np.asarray(keys.negpos, bool)
    b2 = b - A @ mean[ch] + A2 @ mean[ch] - A2[:, neg].sum(axis=1)
    return W2.reshape(D, P, P, 3).transpose(0, 3, 1, 2), b2


ABSORBABLE = "blockwise[:negpos=0|1,scramble=0|1] or etc:common=1[,scramble=0|1][,sub=S]"


def absorbable_keys(scheme: Scheme, h: int, w: int) -> BlockKeys:
    """The one transform ``scheme`` applies to every block, or an error saying why there is none."""
    if isinstance(scheme, Blockwise) or (isinstance(scheme, EtC) and scheme.common):
        return scheme.patch_keys(h, w)
    why = ("it uses a different key per block, which no patch embedding absorbs; etc:common=1 shares one"
           if isinstance(scheme, EtC) else "it does not apply one transform of the pixel values to every patch")
    raise ModelCryptError(f"model encryption needs {ABSORBABLE} (one key shared by every block), not "
                          f"{scheme.name}: {why}")


def encrypt_timm_model(model, scheme: Scheme, img_size: tuple[int, int] | int,
                       mean=(0.5,) * 3, std=(0.5,) * 3):
    """Encrypt a timm ConvMixer/ViT in place for ``scheme`` (keyed ``blockwise`` or
    ``etc:common=1[,sub=S]`` with block size = patch size); returns it."""
    import torch

    arch, conv = _patch_layer(model)
    P = conv.kernel_size[0]
    if tuple(conv.kernel_size) != (P, P) or tuple(conv.stride) != (P, P) or conv.in_channels != 3:
        raise ModelCryptError(f"{arch}: patch embedding must be Conv2d(3, D, P, stride P), got {conv}")
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    keys = absorbable_keys(scheme, h, w)
    if scheme.block_size != P:
        raise ModelCryptError(f"{arch}: {scheme.name} block size {scheme.block_size} must equal the model's patch "
                              f"size {P}")
    if h % P or w % P:
        raise ModelCryptError(f"{arch}: image size {h}x{w} is not a multiple of the patch size {P}")
    if keys.perm is not None and arch == "convmixer":
        raise ModelCryptError("convmixer cannot absorb block scrambling (its convolutions see the spatial layout); "
                              f"use {scheme.name} with scramble=0 for ConvMixer")
    W2, b2 = transform_patch_weights(conv.weight.detach().cpu().numpy(),
                                     None if conv.bias is None else conv.bias.detach().cpu().numpy(),
                                     keys, mean, std)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(W2).to(conv.weight.dtype))
        if conv.bias is None:
            if not np.allclose(b2, 0):
                raise ModelCryptError(f"{arch}: the patch embedding has no bias, but this normalisation needs one")
        else:
            conv.bias.copy_(torch.from_numpy(b2).to(conv.bias.dtype))
        if keys.perm is not None:
            pe = model.pos_embed
            if pe is None:
                raise ModelCryptError("vit: the model has no position embedding to scramble")
            n = (h // P) * (w // P)
            start = 0 if model.no_embed_class else model.num_prefix_tokens
            if pe.shape[1] != start + n:
                raise ModelCryptError(f"vit: position embedding has {pe.shape[1]} entries, expected {start + n} "
                                      f"for a {h}x{w} image with patch {P}")
            idx = torch.as_tensor(keys.perm, dtype=torch.long, device=pe.device)
            pe[:, start:] = pe[:, start:][:, idx].clone()
    return model


def _key_space_parts(scheme: Scheme, h: int, w: int) -> list[str]:
    P = scheme.block_size
    if isinstance(scheme, Blockwise):
        m = P * P * 3
        parts = [f"({m})! value orderings = 2^{log2_factorial(m):.1f}"]
        if scheme.options["negpos"]:
            parts.append(f"2^{m} sign masks")
        return parts
    ns = scheme.sub_blocks()
    if ns == 1:
        return [f"{N_BLOCK_TRANSFORMS} block transforms (8 rotations/flips x 2 negative-positive x 6 colour orders, "
                f"one for every block)"]
    S = scheme.sub
    return [f"({ns})! orders of the {S}x{S} sub blocks = 2^{log2_factorial(ns):.1f}",
            f"{N_BLOCK_TRANSFORMS}^{ns} sub-block transforms (8 rotations/flips x 2 negative-positive x 6 colour "
            f"orders per sub-block position) = 2^{ns * np.log2(N_BLOCK_TRANSFORMS):.1f}"]


def key_space_note(scheme: Scheme, h: int, w: int) -> str:
    """Human-readable key space of a configuration model encryption accepts, with a loud warning
    below 128 bits."""
    P = scheme.block_size
    bits = scheme.key_space_bits(h, w)
    parts = _key_space_parts(scheme, h, w)
    if absorbable_keys(scheme, h, w).perm is not None:
        n = (h // P) * (w // P)
        parts.append(f"({n})! block orders = 2^{log2_factorial(n):.1f}")
    s = f"key space: {' x '.join(parts)}; total 2^{bits:.1f}"
    if P == 1 and isinstance(scheme, Blockwise):
        s += (" -- WARNING: a patch of 1 pixel leaves only a channel permutation and 3 signs for the whole image "
              "(48 keys): essentially no protection, use a larger patch size")
    elif bits < 128:
        s += " -- WARNING: below 128 bits"
        if bits < 40:
            s += f" (only {2 ** bits:,.0f} keys: an attacker who knows the scheme can try them all)"
        if isinstance(scheme, EtC) and not scheme.scramble:
            s += "; block scrambling (scramble=1, ViT only) multiplies it by the number of block orders"
    return s


def _img_size(config: dict) -> tuple[int, int]:
    s = config.get("img_size")
    if s is None:
        raise ModelCryptError("model config lacks img_size (needed for the block grid)")
    return (int(s), int(s)) if isinstance(s, (int, float)) else (int(s[0]), int(s[1]))


def encrypt_checkpoint(ck: dict, key, dataset: str, scheme_spec: str = "blockwise") -> tuple[dict, str]:
    """Encrypt a plain checkpoint (``etc-data train`` format) for ``key`` and ``dataset``.

    Returns (new checkpoint, key-space note). The new checkpoint records the scheme parameters
    (``blockwise`` or ``etc:common=1``, block size = patch, options), the key fingerprint and the
    dataset id; optimizer and scheduler state of the plain weights are dropped (they do not fit the
    new weights).
    """
    from .models import create_model, patch_size

    if not isinstance(ck, dict) or "model" not in ck or "model_config" not in ck:
        raise ModelCryptError("not an etc-data checkpoint (no model / model_config)")
    sch = ck.get("scheme") or {}
    if sch.get("scheme", "plain") != "plain" or ck.get("key_fingerprint") is not None:
        raise ModelCryptError(f"checkpoint is already for scheme {sch.get('scheme')} (key fingerprint "
                              f"{ck.get('key_fingerprint')}); encrypt a model trained on plain images")
    name, _ = parse_scheme_spec(scheme_spec)
    if name not in ("blockwise", "etc"):
        raise ModelCryptError(f"--scheme must be {ABSORBABLE}, got {scheme_spec!r}")
    cfg = dict(ck["model_config"])
    P = patch_size(cfg)
    scheme = make_scheme(scheme_spec, key=key, dataset=dataset, block_size=P)
    h, w = _img_size(cfg)
    model = create_model(cfg)
    model.load_state_dict(ck["model"])
    norm = ck.get("normalize") or {"mean": [0.5] * 3, "std": [0.5] * 3}
    encrypt_timm_model(model, scheme, (h, w), norm["mean"], norm["std"])
    out = dict(ck)
    out["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out["scheme"] = scheme.params()
    out["dataset"] = dataset
    out["key_fingerprint"] = key.fingerprint
    out["optimizer"] = None
    out["scheduler"] = None
    out["encrypted_from"] = {"scheme": sch.get("scheme", "plain"), "dataset": ck.get("dataset")}
    return out, key_space_note(scheme, h, w)


@dataclass
class ModelCryptConfig:
    in_ckpt: str                   # a checkpoint trained on plain images (file or URL)
    out_ckpt: str                  # where the encrypted checkpoint goes (never overwritten)
    dataset: str = ""              # the dataset id the shards were prepared with ("" = the shards')
    key_ref: str | None = None     # the owner key the images are encrypted with
    scheme: str | None = None      # ABSORBABLE (block size = patch; scramble=1 only for ViT); None = the shards' or blockwise
    shards: str | None = None      # optional: the split the model is for (its signed manifest is checked)
    trust: list[str] = field(default_factory=list)  # accepted signers of ``shards`` besides the key's owner
    storage_options: dict = field(default_factory=dict)


def _target_split(cfg: ModelCryptConfig, key):
    """The signed manifest of the split the model is made for (``cfg.shards``), or None."""
    from .manifest import read_manifest, split_url_of
    from .train import matching_fingerprint
    from .trust import TrustPolicy

    if not cfg.shards:
        if cfg.trust:
            raise ModelCryptError("--trust pins who signed --shards: give the split the model is for (--shards)")
        if not cfg.dataset:
            raise ModelCryptError("give --dataset (the id the shards were prepared with) or --shards")
        return None
    url = split_url_of(cfg.shards)
    m = read_manifest(url, cfg.storage_options, TrustPolicy.from_refs(cfg.trust, key))
    if not (m.scheme == "blockwise" or (m.scheme == "etc" and (m.scheme_options or {}).get("common"))):
        raise ModelCryptError(f"{url} holds {spec_of(m.scheme, m.scheme_options)} shards; an encrypted model is for {ABSORBABLE} shards")
    matching_fingerprint(m, key, url)
    if cfg.dataset and cfg.dataset != m.dataset:
        raise ModelCryptError(f"--dataset {cfg.dataset} differs from the dataset of {url} ({m.dataset})")
    return m


def encrypt_model(cfg: ModelCryptConfig) -> dict:
    """Encrypt ``cfg.in_ckpt`` into ``cfg.out_ckpt``; returns the new scheme parameters, the key
    fingerprint and a key-space note (no key material). With ``cfg.shards`` the dataset id and
    scheme come from that split's signed manifest, and the result must fit its shards."""
    from .checkpoint import load_checkpoint, save_checkpoint, scheme_matches
    from .keys import load_key
    from .storage import exists

    if exists(cfg.out_ckpt, cfg.storage_options):
        raise ModelCryptError(f"{cfg.out_ckpt} exists; not overwritten")
    key = load_key(cfg.key_ref)
    target = _target_split(cfg, key)
    dataset = cfg.dataset or target.dataset
    spec = cfg.scheme or (spec_of(target.scheme, target.scheme_options) if target is not None else "blockwise")
    ck = load_checkpoint(cfg.in_ckpt, storage_options=cfg.storage_options)
    try:
        out, note = encrypt_checkpoint(ck, key, dataset, spec)
    except ModelCryptError as e:
        raise ModelCryptError(f"{cfg.in_ckpt}: {e}") from None
    if target is not None and not scheme_matches(out["scheme"], target):
        have = {k: out["scheme"][k] for k in ("scheme", "block_size", "options")}
        want = {"scheme": target.scheme, "block_size": target.block_size, "options": target.scheme_options}
        raise ModelCryptError(f"{cfg.in_ckpt}: the encrypted model would take {have}, the shards at "
                              f"{cfg.shards} are {want} (block size = the model's patch size)")
    save_checkpoint(cfg.out_ckpt, out, cfg.storage_options)
    return {"out": cfg.out_ckpt, "scheme": out["scheme"], "dataset": dataset,
            "key_fingerprint": out["key_fingerprint"], "key_space": note}


__all__ = ["ModelCryptConfig", "ModelCryptError", "absorbable_keys", "encrypt_checkpoint", "encrypt_model",
           "encrypt_timm_model", "transform_patch_weights", "key_space_note"]
