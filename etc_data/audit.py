"""The audit job: how much do encrypted images leak to a ciphertext-only attacker?

    from etc_data import AuditConfig, audit_schemes
    report = audit_schemes(AuditConfig(source="cifar10-lossless-subset.npz", schemes=["etc"], block_sizes=[16],
                                       sample=100, out="out/audit"))

Measures per (scheme, block size) on a deterministic sample of a source:

* ``none``: SSIM / PSNR of the encrypted image against the plain one;
* ``jigsaw``: a jigsaw-puzzle solver (Chuman et al.) that reassembles the scrambled blocks by edge
  compatibility, searching every block's 96 variants (8 dihedral x 2 negative-positive x 6 channel
  orders). Edge dissimilarity is prediction based: the step across a boundary minus the mean of the
  gradients just inside both blocks, squared and summed. 2x2-block images are solved exactly
  (exhaustive over placements and variants); larger ones greedily in raster order from a few seeds.
  The whole-image dihedral / negative-positive / channel order is ambiguous for any solver; the
  score is the max SSIM over those 96 global transforms (an upper bound on what the attacker sees).
* ``fr``: a feature-reconstruction attack (Chang & Case): per block, the channel-averaged absolute
  differences between neighbouring pixels (invariant to negative-positive and channel shuffling,
  rotated/flipped with the block) rendered as a grayscale edge image; scored by grayscale SSIM vs
  the plain image, max over the two polarities.

No key is ever needed: the ciphertexts are made with an ephemeral random subkey.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EtcError
from .schemes import (CPERMS, MIN_KEY_BITS, blocks_to_image_order, dihedral, image_to_blocks, key_space,
                      make_scheme, weak_key_message)

ATTACKS = ("none", "jigsaw", "fr")


class AuditError(EtcError):
    pass


# ---------------------------------------------------------------- helpers

def _variants(blocks: np.ndarray) -> np.ndarray:
    """(n, B, B, 3) -> (n, 96, B, B, 3) float32: every dihedral x negpos x channel order."""
    out = []
    for t in range(8):
        d = dihedral(blocks, t)
        for neg in (False, True):
            dn = 255 - d if neg else d
            for cp in CPERMS:
                out.append(dn[..., cp])
    return np.stack(out, axis=1).astype(np.float32)


def _global_variants(img: np.ndarray):
    """The 96 whole-image transforms (dihedral on square images only)."""
    ts = range(8) if img.shape[0] == img.shape[1] else (0, 2, 4, 6)
    for t in ts:
        d = dihedral(img[None], t)[0]
        for neg in (False, True):
            dn = 255 - d if neg else d
            for cp in CPERMS:
                yield dn[..., cp]


def _h_cost(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Prediction-based dissimilarity of left|right, arrays (..., B, B, 3) broadcastable."""
    a1, a0 = left[..., :, -1, :], left[..., :, -2, :]
    b0, b1 = right[..., :, 0, :], right[..., :, 1, :]
    r = (b0 - a1) - 0.5 * ((a1 - a0) + (b1 - b0))
    return (r * r).sum(axis=(-1, -2))


def _v_cost(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    return _h_cost(np.swapaxes(top, -2, -3), np.swapaxes(bottom, -2, -3))


def _edge_tables(V: np.ndarray):
    """Pairwise costs H[i,vi,j,vj], Vt[i,vi,j,vj] (only for few blocks)."""
    n = V.shape[0]
    A = V.reshape(n * 96, *V.shape[2:])
    H = _h_cost(A[:, None], A[None, :]).reshape(n, 96, n, 96)
    Vt = _v_cost(A[:, None], A[None, :]).reshape(n, 96, n, 96)
    return H, Vt


def solve_2x2(V: np.ndarray) -> np.ndarray:
    """Exact minimum-cost 2x2 assembly; block 0 fixed to variant 0 (all else is a global transform)."""
    H, Vt = _edge_tables(V)
    best, best_cfg = np.inf, None
    for pos0 in range(4):
        for others in itertools.permutations(range(1, 4)):
            order = list(others)
            order.insert(pos0, 0)
            a, b, c, d = order  # a b / c d
            # cost over variants (va, vb, vc, vd) with block 0's variant fixed to 0
            va = np.arange(96) if a != 0 else np.array([0])
            vb = np.arange(96) if b != 0 else np.array([0])
            vc = np.arange(96) if c != 0 else np.array([0])
            vd = np.arange(96) if d != 0 else np.array([0])
            cost = (H[a][va][:, b][:, vb][:, :, None, None]
                    + Vt[a][va][:, c][:, vc][:, None, :, None]
                    + H[c][vc][:, d][:, vd][None, None, :, :]
                    + Vt[b][vb][:, d][:, vd][None, :, None, :])
            k = int(np.argmin(cost))
            if cost.flat[k] < best:
                i = np.unravel_index(k, cost.shape)
                best = cost.flat[k]
                best_cfg = [(a, va[i[0]]), (b, vb[i[1]]), (c, vc[i[2]]), (d, vd[i[3]])]
    return np.stack([V[blk, v] for blk, v in best_cfg])


def solve_greedy(V: np.ndarray, hb: int, wb: int, seeds: int = 2) -> np.ndarray:
    """Greedy raster-order assembly from a few seed blocks (x 8 orientations); lowest total cost wins."""
    n = V.shape[0]
    best, best_out = np.inf, None
    for s in range(min(seeds, n)):
        for t in range(8):
            used = np.zeros(n, bool)
            used[s] = True
            placed = np.empty((hb * wb,) + V.shape[2:], np.float32)
            placed[0] = V[s, t * 12]
            total = 0.0
            for p in range(1, hb * wb):
                r, c = divmod(p, wb)
                rem = np.flatnonzero(~used)
                cand = V[rem]  # (m, 96, B, B, 3)
                cost = np.zeros(cand.shape[:2], np.float32)
                if c > 0:
                    cost += _h_cost(placed[p - 1][None, None], cand)
                if r > 0:
                    cost += _v_cost(placed[p - wb][None, None], cand)
                k = int(np.argmin(cost))
                i, v = divmod(k, 96)
                total += float(cost.flat[k])
                used[rem[i]] = True
                placed[p] = cand[i, v]
            if total < best:
                best, best_out = total, placed
    return best_out


def jigsaw_attack(enc: np.ndarray, B: int, seeds: int = 2) -> np.ndarray:
    """Reassemble one encrypted (H, W, 3) uint8 image; returns uint8 image (up to a global transform)."""
    h, w = enc.shape[:2]
    hb, wb = h // B, w // B
    V = _variants(image_to_blocks(enc, B))
    out = solve_2x2(V) if (hb, wb) == (2, 2) else solve_greedy(V, hb, wb, seeds)
    return np.clip(blocks_to_image_order(out, hb, wb), 0, 255).astype(np.uint8)


def fr_attack(enc: np.ndarray, B: int) -> np.ndarray:
    """Feature reconstruction: per-block, channel-averaged |neighbour differences| as a gray image."""
    x = enc.astype(np.float32)
    h, w = x.shape[:2]
    gx = np.zeros((h, w), np.float32)
    gy = np.zeros((h, w), np.float32)
    gx[:, :-1] = np.abs(np.diff(x, axis=1)).mean(axis=2)
    gy[:-1, :] = np.abs(np.diff(x, axis=0)).mean(axis=2)
    if B:  # differences across block boundaries are meaningless after scrambling: drop them
        gx[:, B - 1::B] = 0
        gy[B - 1::B, :] = 0
    mag = np.sqrt(gx * gx + gy * gy)
    mag = mag / (mag.max() + 1e-6)
    return (255 * (1 - mag)).astype(np.uint8)  # dark edges on white, like a line drawing


def _gray(img: np.ndarray) -> np.ndarray:
    return img if img.ndim == 2 else (img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))


def ssim_psnr(ref: np.ndarray, img: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    if ref.ndim == 3 and img.ndim == 3:
        s = structural_similarity(ref, img, channel_axis=2, data_range=255)
    else:
        s = structural_similarity(_gray(ref), _gray(img), data_range=255)
        ref, img = _gray(ref), _gray(img)
    with np.errstate(divide="ignore"):
        p = peak_signal_noise_ratio(ref.astype(np.float64), img.astype(np.float64), data_range=255)
    return float(s), float(min(p, 100.0))


def best_global(ref: np.ndarray, img: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Max SSIM over the 96 global transforms the attack cannot tell apart."""
    best = (-2.0, 0.0, img)
    for g in _global_variants(img):
        s, p = ssim_psnr(ref, g)
        if s > best[0]:
            best = (s, p, g)
    return best


# ---------------------------------------------------------------- the audit

@dataclass
class AuditConfig:
    source: str
    schemes: list[str] = field(default_factory=lambda: ["etc"])
    block_sizes: list[int] = field(default_factory=lambda: [16])
    out: str | None = None        # folder for audit.json, audit.md, ssim_boxplot.png, examples.png
    sample: int = 16
    split: str | None = None
    seed: int = 0
    seeds: int = 2
    lpips_weights: str | None = None


def _sample(src, split, n, seed):
    items = src.items(split)
    if not items:
        raise AuditError(f"source {src.name}: split {split!r} has no images")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(items), size=min(n, len(items)), replace=False))
    return src.load([items[i] for i in idx])


def audit_schemes(cfg: AuditConfig, progress=None) -> dict:
    """Encrypt a deterministic sample under an ephemeral key per scheme and block size, run the
    attacks, and write the report to ``cfg.out`` when given; returns the report dict."""
    from .sources import open_source
    if cfg.sample < 1:
        raise AuditError(f"--sample must be >= 1, got {cfg.sample}")
    src = open_source(cfg.source)
    split = cfg.split or ("test" if "test" in src.splits else ("val" if "val" in src.splits else src.splits[0]))
    if split not in src.splits:
        raise AuditError(f"source {src.name}: no split {split!r} (has {', '.join(src.splits)})")
    batch = _sample(src, split, cfg.sample, cfg.seed)
    plain = batch.images
    h, w = plain.shape[1:3]
    lpips_note = _lpips_note(cfg.lpips_weights)
    results, per_image, examples, key_bits, warnings_out = [], {}, {}, {}, []
    for spec in cfg.schemes:
        for B in cfg.block_sizes:
            if h % B or w % B:
                raise AuditError(f"block size {B} does not divide image size {h}x{w} of {src.name}")
            label = f"{spec}/B{B}"
            scheme = make_scheme(spec, subkey=os.urandom(32), block_size=B)  # ephemeral key
            bits = key_space(spec, (h, w), B)
            key_bits[label] = bits
            if bits < MIN_KEY_BITS:
                warnings_out.append(weak_key_message(spec, bits, h, w, B))
            enc = scheme.encrypt(plain, item=src.name)
            scores = {a: [] for a in ATTACKS}
            ex = None
            for i in range(len(plain)):
                s, p = ssim_psnr(plain[i], enc[i])
                scores["none"].append((s, p))
                jig = jigsaw_attack(enc[i], B, cfg.seeds)
                s, p, jig_best = best_global(plain[i], jig)
                scores["jigsaw"].append((s, p))
                fr = fr_attack(enc[i], B)
                g = _gray(plain[i])
                s1, p1 = ssim_psnr(g, fr.astype(np.float32))
                s2, p2 = ssim_psnr(g, 255 - fr.astype(np.float32))
                scores["fr"].append((s1, p1) if s1 >= s2 else (s2, p2))
                if i < 4:
                    ex = ex or []
                    ex.append((plain[i], enc[i], jig_best, fr))
                if progress:
                    progress(label, i + 1, len(plain))
            examples[label] = ex
            for a in ATTACKS:
                arr = np.array(scores[a])
                r = {"scheme": spec, "block_size": B, "ssim_mean": float(arr[:, 0].mean()),
                     "psnr_mean": float(arr[:, 1].mean()), "ssim_std": float(arr[:, 0].std()),
                     "n": len(arr)}
                r["measure" if a == "none" else "attack"] = a
                r["attack"] = a
                if a == "jigsaw":
                    r["recovered_fraction"] = float((arr[:, 0] > 0.99).mean())
                results.append(r)
                per_image[f"{label}/{a}"] = arr[:, 0].tolist()
    report = {"key_bits": key_bits if len(key_bits) > 1 else next(iter(key_bits.values())),
              "key_bits_by_config": key_bits, "min_key_bits": MIN_KEY_BITS, "weak_key_warnings": warnings_out,
              "results": results, "source": src.name, "split": split, "sample": len(plain),
              "image_size": [int(h), int(w)], "lpips": lpips_note,
              "jigsaw_scoring": "max SSIM over the 96 global dihedral/negpos/channel transforms",
              "fr_scoring": "grayscale SSIM, max over the two polarities"}
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "audit.json").write_text(json.dumps(report, indent=2))
        _write_md(report, out / "audit.md")
        _boxplot(per_image, out / "ssim_boxplot.png")
        _grid(examples, out / "examples.png")
    return report


def _lpips_note(weights: str | None) -> str:
    if not weights:
        return "LPIPS skipped: no local weights"
    if not Path(weights).is_file():
        raise AuditError(f"--lpips-weights {weights}: no such file")
    try:
        import lpips  # noqa: F401
    except ImportError:
        return "LPIPS skipped: the lpips package is not installed"
    return "LPIPS skipped: not implemented in this version"


def _write_md(rep: dict, path: Path) -> None:
    lines = [f"# etc-data audit: {rep['source']} ({rep['split']}, {rep['sample']} images, "
             f"{rep['image_size'][0]}x{rep['image_size'][1]})", "",
             "| scheme | block | attack | SSIM mean | SSIM std | PSNR mean | jigsaw recovered |",
             "|---|---|---|---|---|---|---|"]
    for r in rep["results"]:
        rec = f"{r['recovered_fraction']:.0%}" if "recovered_fraction" in r else ""
        lines.append(f"| {r['scheme']} | {r['block_size']} | {r['attack']} | {r['ssim_mean']:.3f} | "
                     f"{r['ssim_std']:.3f} | {r['psnr_mean']:.2f} | {rec} |")
    lines += ["", "Key space (log2):"] + [f"- {k}: {v:.1f} bits" for k, v in rep["key_bits_by_config"].items()]
    lines += [f"- WARNING: {w}" for w in rep["weak_key_warnings"]]
    lines += ["", f"- {rep['lpips']}", f"- jigsaw: {rep['jigsaw_scoring']}", f"- fr: {rep['fr_scoring']}",
              "- No provable security: these are the attacks implemented here, not all attacks."]
    path.write_text("\n".join(lines) + "\n")


def _boxplot(per_image: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(per_image)), 4))
    ax.boxplot(list(per_image.values()))
    ax.set_xticks(range(1, len(per_image) + 1), list(per_image.keys()), rotation=45, ha="right")
    ax.set_ylabel("SSIM vs plain")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _grid(examples: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(lab, e) for lab, ex in examples.items() for e in ex]
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2 * len(rows)), squeeze=False)
    for r, (lab, imgs) in enumerate(rows):
        for c, (im, title) in enumerate(zip(imgs, ("plain", "encrypted", "jigsaw", "fr"))):
            axes[r, c].imshow(im, cmap="gray" if im.ndim == 2 else None, vmin=0, vmax=255)
            axes[r, c].set_axis_off()
            axes[r, c].set_title(f"{lab} {title}" if c == 0 else title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
