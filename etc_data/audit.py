"""The audit job: how much do encrypted images leak to a ciphertext-only attacker?

    from etc_data import AuditConfig, audit_schemes
    report = audit_schemes(AuditConfig(source="cifar10-lossless-subset.npz", schemes=["etc"], block_sizes=[16],
                                       sample=100, out="out/audit"))

Measures per (scheme, block size) on a deterministic sample of a source (block sizes: the given
ones, or each scheme's default: etc/blockwise 16, le/ele 4; pe is per pixel, block size 1):

* ``none``: SSIM / PSNR of the encrypted image against the plain one;
* ``jigsaw``: a jigsaw-puzzle solver (Chuman et al.) that reassembles the scrambled blocks by edge
  compatibility, searching every block's 96 variants (8 dihedral x 2 negative-positive x 6 channel
  orders). Edge dissimilarity is prediction based: the step across a boundary minus the mean of the
  gradients just inside both blocks, squared and summed. 2x2-block images are solved exactly
  (exhaustive over placements and variants); larger ones greedily in raster order from a few seeds.
  The whole-image dihedral / negative-positive / channel order is ambiguous for any solver; the
  score is the max SSIM over those 96 global transforms (an upper bound on what the attacker sees).
  Not applicable with block size 1 (PE).
* ``fr``: a feature-reconstruction attack (Chang & Case): per block, the channel-averaged absolute
  differences between neighbouring pixels (invariant to negative-positive and channel shuffling,
  rotated/flipped with the block) rendered as a grayscale edge image; scored by grayscale SSIM vs
  the plain image, max over the two polarities. With block size 1 (PE), where no two pixels share
  a block, the per-pixel fold min(v, 255 - v) averaged over channels (Chang & Case's basic attack).
* ``itn`` (on request, ``attacks=["itn"]``): the inverse transformation network (``etc_data.itn``),
  trained on public images (``itn_train``, default the source's other split) encrypted under fresh
  random keys, within a time budget shared by all configurations (or a step count), then applied
  to the sample's ciphertexts; scored by RGB SSIM.

No key is ever needed: the ciphertexts are made with an ephemeral random subkey, which the ITN's
training never sees either.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EtcError
from .schemes import (CPERMS, MIN_KEY_BITS, SCHEMES, blocks_to_image_order, dihedral, image_to_blocks, key_space,
                      make_scheme, parse_scheme_spec, weak_key_message)

LEARNED_ATTACKS = ("itn",)


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
    """Feature reconstruction: per-block, channel-averaged |neighbour differences| as a gray image.
    Block size 1 (PE) has no pixel pair inside a block: there, Chang & Case's basic per-pixel attack,
    every value folded onto min(v, 255 - v) (what negative-positive leaves) and averaged over the
    channels (what the per-pixel channel shuffle leaves), scaled to 0..254."""
    if B == 1:
        v = enc.astype(np.int16)
        return (2 * np.minimum(v, 255 - v).mean(axis=2)).astype(np.uint8)
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
    block_sizes: list[int] | None = None  # None: each scheme's own (etc/blockwise 16, le/ele 4); pe is always 1
    out: str | None = None        # folder for audit.json, audit.md, ssim_boxplot.png, examples.png
    sample: int = 16
    split: str | None = None
    seed: int = 0
    seeds: int = 2
    attacks: list[str] = field(default_factory=list)  # learned attacks added to jigsaw and fr: "itn"
    itn_train: str | None = None  # public images for the ITN (default: the source's other split, e.g. train)
    itn_images: int = 50000       # at most this many of them (a deterministic sample)
    itn_seconds: float = 300.0    # ITN training time over all (scheme, block size) configurations together
    itn_steps: int | None = None  # instead of the time budget: this many steps per configuration
    itn_device: str = "auto"

    def check(self) -> None:
        if self.sample < 1:
            raise AuditError(f"--sample must be >= 1, got {self.sample}")
        bad = sorted(set(self.attacks) - set(LEARNED_ATTACKS))
        if bad:
            raise AuditError(f"unknown attack(s) {', '.join(bad)}; jigsaw and fr always run, learned attacks to add: "
                             f"{', '.join(LEARNED_ATTACKS)}")
        if self.itn_images < 1:
            raise AuditError(f"--itn-images must be >= 1, got {self.itn_images}")


def _sample(src, split, n, seed):
    items = src.items(split)
    if not items:
        raise AuditError(f"source {src.name}: split {split!r} has no images")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(items), size=min(n, len(items)), replace=False))
    return src.load([items[i] for i in idx])


def _configs(cfg: AuditConfig, h: int, w: int, name: str) -> list[tuple[str, int]]:
    """(spec, block size) pairs: the given block sizes, or each scheme's default; PE is per pixel."""
    out = []
    for spec in cfg.schemes:
        cls = SCHEMES[parse_scheme_spec(spec)[0]]
        sizes = [1] if cls.default_block_size == 1 else (cfg.block_sizes or [cls.default_block_size or 16])
        for B in sizes:
            if B < 1 or h % B or w % B:
                raise AuditError(f"block size {B} does not divide image size {h}x{w} of {name}")
            out.append((spec, B))
    return out


def _itn_images(cfg: AuditConfig, src, split: str, h: int, w: int) -> tuple[np.ndarray, str]:
    """The attacker's public training images: ``cfg.itn_train`` or the audited source's other split."""
    from .sources import open_source

    tsrc, same = src, True
    if cfg.itn_train:
        tsrc, same = open_source(cfg.itn_train), Path(cfg.itn_train).resolve() == Path(cfg.source).resolve()
    others = [s for s in tsrc.splits if not (same and s == split)]  # never the audited images themselves
    if not others:
        raise AuditError(f"ITN: source {tsrc.name} has no split besides the audited {split!r} to train on; give "
                         f"--itn-train with public images of the same size ({h}x{w})")
    tsplit = "train" if "train" in others else others[0]
    batch = _sample(tsrc, tsplit, cfg.itn_images, cfg.seed + 1)
    if batch.images.shape[1:3] != (h, w):
        raise AuditError(f"ITN: training images of {tsrc.name} are {batch.images.shape[1]}x{batch.images.shape[2]}, "
                         f"the audited images {h}x{w}: give --itn-train with images of that size")
    return batch.images, f"{tsrc.name}/{tsplit}"


def _score_fr(plain: np.ndarray, fr: np.ndarray) -> tuple[float, float]:
    g = _gray(plain)
    s1, p1 = ssim_psnr(g, fr.astype(np.float32))
    s2, p2 = ssim_psnr(g, 255 - fr.astype(np.float32))
    return (s1, p1) if s1 >= s2 else (s2, p2)


def _attack_config(plain, enc, B, seeds, label, progress) -> tuple[dict, list]:
    """Scores of the key-less attacks on one configuration, and example rows for the first images."""
    scores = {"none": [], "fr": []} if B < 2 else {"none": [], "jigsaw": [], "fr": []}
    examples = []
    for i in range(len(plain)):
        scores["none"].append(ssim_psnr(plain[i], enc[i]))
        row = {"plain": plain[i], "encrypted": enc[i], "jigsaw": None}
        if "jigsaw" in scores:
            s, p, row["jigsaw"] = best_global(plain[i], jigsaw_attack(enc[i], B, seeds))
            scores["jigsaw"].append((s, p))
        row["fr"] = fr_attack(enc[i], B)
        scores["fr"].append(_score_fr(plain[i], row["fr"]))
        if i < 4:
            examples.append(row)
        if progress:
            progress(label, i + 1, len(plain))
    return scores, examples


def audit_schemes(cfg: AuditConfig, progress=None) -> dict:
    """Encrypt a deterministic sample under an ephemeral key per scheme and block size, run the
    attacks, and write the report to ``cfg.out`` when given; returns the report dict."""
    from .itn import ITNConfig, itn_restore, train_itn
    from .sources import open_source

    cfg.check()
    src = open_source(cfg.source)
    split = cfg.split or ("test" if "test" in src.splits else ("val" if "val" in src.splits else src.splits[0]))
    if split not in src.splits:
        raise AuditError(f"source {src.name}: no split {split!r} (has {', '.join(src.splits)})")
    plain = _sample(src, split, cfg.sample, cfg.seed).images
    h, w = plain.shape[1:3]
    configs = _configs(cfg, h, w, src.name)
    itn = None
    if "itn" in cfg.attacks:
        images, where = _itn_images(cfg, src, split, h, w)
        per = None if cfg.itn_steps else cfg.itn_seconds / len(configs)
        itn_cfg = ITNConfig(seconds=per, steps=cfg.itn_steps, device=cfg.itn_device, seed=cfg.seed)
        itn_cfg.check()  # before the first configuration's jigsaw and FR attacks, not after them
        itn = {"train_source": where, "train_images": len(images), "steps_per_config": cfg.itn_steps,
               "seconds_per_config": per, "configs": {}}
    results, per_image, examples, key_bits, warnings_out = [], {}, {}, {}, []
    for spec, B in configs:
        label = f"{spec}/B{B}"
        scheme = make_scheme(spec, subkey=os.urandom(32), block_size=B)  # ephemeral key
        key_bits[label] = bits = key_space(spec, (h, w), B)
        if bits < MIN_KEY_BITS:
            warnings_out.append(weak_key_message(spec, bits, h, w, B))
        enc = scheme.encrypt(plain, item=src.name)
        scores, examples[label] = _attack_config(plain, enc, B, cfg.seeds, label, progress)
        if itn is not None:
            net, itn["configs"][label] = train_itn(spec, B, images, itn_cfg)
            restored = itn_restore(net, enc)
            scores["itn"] = [ssim_psnr(p, r) for p, r in zip(plain, restored)]
            for row, r in zip(examples[label], restored):
                row["itn"] = r
        for a, vals in scores.items():
            arr = np.array(vals)
            r = {"scheme": spec, "block_size": B, "attack": a, "ssim_mean": float(arr[:, 0].mean()),
                 "psnr_mean": float(arr[:, 1].mean()), "ssim_std": float(arr[:, 0].std()), "n": len(arr)}
            if a == "none":
                r["measure"] = a
            if a == "jigsaw":
                r["recovered_fraction"] = float((arr[:, 0] > 0.99).mean())
            results.append(r)
            per_image[f"{label}/{a}"] = arr[:, 0].tolist()
    report = {"key_bits": key_bits if len(key_bits) > 1 else next(iter(key_bits.values())),
              "key_bits_by_config": key_bits, "min_key_bits": MIN_KEY_BITS, "weak_key_warnings": warnings_out,
              "results": results, "source": src.name, "split": split, "sample": len(plain),
              "image_size": [int(h), int(w)], "attacks": ["none", "jigsaw", "fr"] + list(cfg.attacks),
              "jigsaw_scoring": "max SSIM over the 96 global dihedral/negpos/channel transforms; not applicable "
                                "with block size 1 (nothing to reassemble)",
              "fr_scoring": "grayscale SSIM, max over the two polarities; block size 1: the per-pixel fold "
                            "min(v, 255 - v) averaged over channels",
              "itn": itn, "itn_scoring": "RGB SSIM of the network's output vs the plain image"}
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "audit.json").write_text(json.dumps(report, indent=2))
        _write_md(report, out / "audit.md")
        _boxplot(per_image, out / "ssim_boxplot.png")
        _grid(examples, out / "examples.png")
    return report


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
    lines += ["", f"- jigsaw: {rep['jigsaw_scoring']}", f"- fr: {rep['fr_scoring']}"]
    itn = rep.get("itn")
    if itn:
        lines.append(f"- itn: {rep['itn_scoring']}; trained on {itn['train_images']} images of {itn['train_source']} "
                     f"under fresh random keys (never the audited key):")
        lines += [f"  - {lab}: {i['steps']} steps of {i['batch_size']} images, {i['keys']} keys, {i['seconds']} s on "
                  f"{i['device']}" for lab, i in itn["configs"].items()]
    lines.append("- No provable security: these are the attacks implemented here, not all attacks.")
    path.write_text("\n".join(lines) + "\n")


def _boxplot(per_image: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(per_image)), 4.5))
    ax.boxplot(list(per_image.values()))
    ax.set_xticks(range(1, len(per_image) + 1), list(per_image.keys()), rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("SSIM vs plain")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _grid(examples: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(lab, e) for lab, ex in examples.items() for e in ex]
    cols = list(rows[0][1]) if rows else []
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2 * len(cols), 2 * len(rows)), squeeze=False)
    for r, (lab, imgs) in enumerate(rows):
        for c, title in enumerate(cols):
            ax, im = axes[r, c], imgs.get(title)
            ax.set_axis_off()
            if im is None:
                title += " (n/a)"
            else:
                ax.imshow(im, cmap="gray" if im.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_title(f"{lab} {title}" if c == 0 else title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
