"""Learnable image encryption schemes over uint8 RGB batches ``(N, H, W, 3)``.

Every scheme here is, for a fixed key and image size, a *permutation of the image's values*
followed by a *negative-positive mask* over them. The values are the H*W*3 bytes (q -> 255 - q is
q XOR 0xFF), except for ``le``, whose values are the H*W*6 four-bit nibbles (upper and lower half
of every byte; p -> 15 - p is p XOR 0xF). So each scheme only builds a plan ``(idx, mask)`` once per
image size and the batch transform is one gather plus one XOR, vectorised over the whole batch
(``le`` splits the bytes into nibbles before and merges them after):

    encrypt:  y.flat[j] = x.flat[idx[j]] ^ mask[j]
    decrypt:  x.flat[idx[j]] = y.flat[j] ^ mask[j]      (i.e. x = (y ^ mask)[argsort(idx)])

which makes decryption exact by construction. Values are flattened in (row, col, channel) order.

Schemes (the details chosen where the papers leave room are all in this module):

``etc``  Encryption-then-compression (Chuman, Sirichotedumrong & Kiya; used by MaungMaung & Kiya).
         B x B blocks. (1) block scrambling: output block i = input block perm[i]; (2) each block
         gets one of the 8 dihedral transforms (rotation 0/90/180/270 degrees, each with or without
         a horizontal flip). The public reference code draws rotation and flip from one key and so
         reaches only 4 of the 8; we draw all 8; (3) negative-positive per block with probability
         1/2; (4) one of the 6 colour-channel permutations per block. Key space:
         log2(n!) + n*(3 + 1 + log2 6) bits for n blocks. Option ``scramble=0`` drops step (1).
         ``common=1``: steps (2)-(4) use one key shared by every block (the same rotation/flip,
         negative-positive bit and colour order everywhere; 96 choices), so that a patch embedding
         absorbs them (``modelcrypt``); block scrambling stays optional (``scramble``, default on).
         ``common=1,sub=S``: the two-level form of Hamano, Imaizumi & Kiya (Sensors 23(7) 3400,
         2023): every main block (B, the model's patch) is split into S x S sub blocks, which are
         translocated inside the main block and each rotated/flipped, negative-positive transformed
         and colour-shuffled, all with keys shared by every main block (one key per sub-block
         position); then the main blocks are translocated (``scramble``). Both keep JPEG's block
         structure when S (or B) is a multiple of the MCU.
``blockwise`` One common key for all blocks (MaungMaung & Kiya; Iijima & Kiya's model encryption):
         a permutation of the B*B*3 values inside every block (row, col, channel order), an
         optional negative-positive mask over those values (``negpos``, default on), optional block
         scrambling (``scramble``, default off; needed for ViT, impossible to absorb for ConvMixer).
         Not JPEG-friendly: the values of an 8x8 DCT block are shuffled across it and across colours.
``le``   Learnable image encryption (Tanaka 2018): B x B blocks (default 4); every byte is split
         into its upper and lower 4 bits, giving a 6-channel block of B*B*6 nibbles; key-chosen
         nibbles are intensity-reversed (p -> 15 - p) and the nibbles are shuffled inside the block,
         with one key for every block; the 6 channels are merged back into 3 bytes.
``pe``   Pixel-based encryption (Sirichotedumrong et al.): negative-positive of every value with
         probability 1/2 and one of the 6 channel permutations per pixel. Sirichotedumrong et al.
         draw a fresh key per image; here, as for all schemes, one key per owner and dataset.
``ele``  Extended learnable encryption (Madono et al.): small blocks (default 4x4), block
         scrambling, then per block an independent permutation of its B*B*3 values and an
         independent negative-positive mask over them. Not JPEG-friendly by design.
``plain`` The identity (no key), for baselines.

Key material: the per-dataset subkey (see ``keys.derive_subkey``) is expanded with SHAKE-256
under a label per key part (K1..K4) and image size; permutations are the argsort of 64-bit
draws, so plans are identical across processes, platforms and numpy versions.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .errors import EtcError

MIN_KEY_BITS = 128

# The 6 permutations of (R, G, B): output channel c takes input channel CPERMS[k][c].
CPERMS = np.array([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]], dtype=np.int64)

PAD_POLICIES = ("error", "edge", "zero")

JPEG_MCU = {"444": 8, "gray": 8, "422": 16, "420": 16}


class SchemeError(EtcError):
    """Bad scheme name, option, block size or input shape (message names the item)."""


class WeakKeyWarning(UserWarning):
    """The key space of a configuration is below MIN_KEY_BITS."""


# ----------------------------------------------------------------------------- key expansion

def _xof(subkey: bytes, label: str, nbytes: int) -> bytes:
    return hashlib.shake_256(b"etc-data/xof/v1|" + label.encode() + b"|" + subkey).digest(nbytes)


def _u64(subkey: bytes, label: str, n: int) -> np.ndarray:
    return np.frombuffer(_xof(subkey, label, 8 * n), dtype="<u8").astype(np.uint64)


def key_permutation(subkey: bytes, label: str, n: int) -> np.ndarray:
    """A uniformly random permutation of range(n) (argsort of 64-bit draws)."""
    return np.argsort(_u64(subkey, label, n), kind="stable").astype(np.int64)


def key_bits(subkey: bytes, label: str, n: int) -> np.ndarray:
    """n independent fair bits as a bool array."""
    return (_u64(subkey, label, n) & np.uint64(1)).astype(bool)


def key_choice(subkey: bytes, label: str, n: int, k: int) -> np.ndarray:
    """n independent draws from range(k) (bias < 2**-58)."""
    return (_u64(subkey, label, n) % np.uint64(k)).astype(np.int64)


_CHUNK_BYTES = 8 << 20

try:  # the compiled kernel (etc_data/_runs.c); without it every plan runs as a numpy gather
    from . import _runs as _native
except ImportError:  # pragma: no cover - a build without a C compiler
    _native = None
if os.environ.get("ETC_DATA_NATIVE", "1") == "0":  # the numpy path on purpose (benchmarks, debugging)
    _native = None

# A plan runs through the compiled kernel when its runs average at least this many pixels.
MIN_MEAN_RUN = 2.0


def native_available() -> bool:
    """Whether the compiled run kernel was built (``pip install`` compiles it where a C compiler is)."""
    return _native is not None


def plan_runs(idx: np.ndarray, mask: np.ndarray | None, vpp: int) -> np.ndarray | None:
    """The plan ``(idx, mask)`` as runs of whole pixels for the compiled kernel, or None.

    Output pixel p (``vpp`` values) takes the values of one source window starting at s(p),
    reordered by offsets o_c(p) < 256 and XORed with m_c(p). Consecutive output pixels with the
    same offsets and mask whose s advances by a constant step form one run (a block row, a flipped
    row, a column of a rotated block): one table row ``dst, src, step, count, perm, mask``
    (perm and mask packed a byte per value). None when the plan does not move whole pixels or its
    runs are too short to gain (``pe``, ``le``, ``ele``); such plans use the numpy gather. The
    runs are checked to reproduce ``idx`` and ``mask`` exactly before they are returned."""
    m = len(idx)
    if not 1 <= vpp <= 8 or m % vpp or m == 0:
        return None
    P = m // vpp
    v = np.asarray(idx, dtype=np.int64).reshape(P, vpp)
    src = v.min(axis=1)
    off = v - src[:, None]
    if off.max() > 255:
        return None
    shifts = (8 * np.arange(vpp, dtype=np.uint64))
    code = (off.astype(np.uint64) << shifts).sum(axis=1, dtype=np.uint64).view(np.int64)
    if mask is None:
        mk = np.zeros(P, dtype=np.int64)
    else:
        mk = (mask.reshape(P, vpp).astype(np.uint64) << shifts).sum(axis=1, dtype=np.uint64).view(np.int64)
    # same[p]: pixels p and p+1 share offsets and mask; eq[p]: steps p->p+1 and p+1->p+2 agree too
    d = np.diff(src)
    same = (code[1:] == code[:-1]) & (mk[1:] == mk[:-1])
    eq = same[:-1] & same[1:] & (d[:-1] == d[1:])
    start = np.ones(P, dtype=bool)
    if P > 1:
        start[1:] = ~same
    if P > 2:
        start[2:] |= ~eq
        # a pixel left alone at the head of a run (its step differs from the one before) joins the
        # run after it when that run continues with the same step
        cancel = start[:-2] & start[1:-1] & same[:-1] & eq
        start[1:-1] &= ~cancel
    starts = np.flatnonzero(start)
    counts = np.diff(np.append(starts, P))
    if P / len(starts) < MIN_MEAN_RUN:
        return None
    step = np.where(counts > 1, np.append(d, 0)[starts], 0)
    run = np.repeat(np.arange(len(starts)), counts)
    k = np.arange(P) - starts[run]
    if not (np.array_equal(src[starts][run] + k * step[run], src)
            and np.array_equal(code[starts][run], code) and np.array_equal(mk[starts][run], mk)):
        raise AssertionError("plan_runs: runs do not reproduce the plan")  # a bug here, never data
    return np.ascontiguousarray(np.stack([starts * vpp, src[starts], step, counts, code[starts], mk[starts]],
                                         axis=1), dtype=np.int64)


def _gather_xor(flat: np.ndarray, idx: np.ndarray, mask: np.ndarray | None,
                runs: np.ndarray | None = None, vpp: int = 3) -> np.ndarray:
    """out[i, j] = flat[i, idx[j]] ^ mask[j]: through the compiled kernel when ``runs`` (from
    ``plan_runs``) are given and it is built, else with numpy in cache-sized chunks of rows."""
    flat = np.ascontiguousarray(flat)
    n, m = flat.shape
    out = np.empty((n, len(idx)), dtype=np.uint8)
    if runs is not None and _native is not None:
        _native.apply(flat, out, runs, n, vpp)
        return out
    step = max(1, _CHUNK_BYTES // max(1, m))
    for i in range(0, n, step):  # chunks of rows, to stay in cache; not a loop per image
        o = out[i:i + step]
        np.take(flat[i:i + step], idx, axis=1, out=o, mode="wrap")  # in range by construction; wrap is the fastest mode
        if mask is not None:
            np.bitwise_xor(o, mask, out=o)
    return out


def log2_factorial(n: int) -> float:
    return math.lgamma(n + 1) / math.log(2)


# ----------------------------------------------------------------------------- helpers

def ensure_rgb(x: np.ndarray, item: str = "batch") -> np.ndarray:
    """Return ``x`` as a uint8 (N, H, W, 3) batch. Grayscale (N, H, W) or (N, H, W, 1) is
    converted explicitly by repeating the channel; anything else is an error naming ``item``."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise SchemeError(f"{item}: expected uint8 pixels, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise SchemeError(f"{item}: expected a batch (N, H, W, 3) or grayscale (N, H, W), got shape {x.shape}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def blocks_to_image_order(blocks: np.ndarray, hb: int, wb: int) -> np.ndarray:
    """(n, B, B, ...) blocks in raster order -> (hb*B, wb*B, ...) image."""
    B = blocks.shape[1]
    rest = blocks.shape[3:]
    return blocks.reshape(hb, wb, B, B, *rest).swapaxes(1, 2).reshape(hb * B, wb * B, *rest)


def image_to_blocks(img: np.ndarray, B: int) -> np.ndarray:
    """(H, W, ...) image -> (n, B, B, ...) blocks in raster order."""
    h, w = img.shape[:2]
    rest = img.shape[2:]
    return img.reshape(h // B, B, w // B, B, *rest).swapaxes(1, 2).reshape((h // B) * (w // B), B, B, *rest)


def dihedral(blocks: np.ndarray, t: int) -> np.ndarray:
    """Dihedral transform t in 0..7 of (n, B, B, ...) blocks: rotate t%4 quarter turns
    counter-clockwise, then flip left-right when t >= 4."""
    out = np.rot90(blocks, k=t % 4, axes=(1, 2))
    if t >= 4:
        out = out[:, :, ::-1]
    return out


def check_jpeg_compat(scheme: "Scheme | str", block_size: int | None, subsampling: str) -> None:
    """Refuse a block-wise scheme whose blocks do not align with the JPEG MCU.

    The MCU is 16x16 with 4:2:0 chroma subsampling (16 wide with 4:2:2) and 8x8 with 4:4:4 or
    grayscale: the block size (for ``etc:common=1,sub=S`` the sub-block size S, the unit that is
    transformed) must be a multiple of it, else block edges fall inside an MCU and the encryption
    is not compression-friendly (block 16 works with both, block 8 with 4:2:0 does not). Aligned
    blocks are necessary, not sufficient: ``blockwise`` is checked too but shuffles the values of
    every block and so does not compress well anyway. Schemes that are not block-aligned by design
    (``le``, ``pe``, ``ele``) are allowed, since they are compressed only to measure that cost. ``scheme``: a Scheme or a spec string.
    """
    if isinstance(scheme, Scheme):
        cls, sub_bs = type(scheme), scheme.jpeg_unit()
    else:
        name, opts = parse_scheme_spec(str(scheme))
        cls, sub_bs = SCHEMES[name], opts.get("sub")
    sub = str(subsampling)
    if sub not in JPEG_MCU:
        raise SchemeError(f"unknown chroma subsampling {subsampling!r}; valid: {', '.join(JPEG_MCU)}")
    if not cls.jpeg_block_aligned or block_size is None:
        return
    unit = int(sub_bs) if sub_bs else int(block_size)
    what = "sub-block size" if sub_bs and int(sub_bs) != int(block_size) else "block size"
    mcu = JPEG_MCU[sub]
    if unit % mcu:
        fix = f"use {what} {mcu * max(1, -(-unit // mcu))}"
        if unit % JPEG_MCU["444"] == 0:  # only a 4:4:4 or grayscale MCU (8x8) would fit this size
            fix += " or subsampling 444"
        raise SchemeError(f"scheme {cls.name} with {what} {unit} is not JPEG-compliant with {sub} subsampling: "
                          f"the {what} must be a multiple of the {mcu}x{mcu} MCU ({fix})")


# ----------------------------------------------------------------------------- schemes

@dataclass(frozen=True)
class Plan:
    """A scheme's transform for one image size: y.flat = x.flat[idx] ^ mask (over its values)."""

    idx: np.ndarray       # (H*W*C,) source index for every output value (C = values per pixel)
    mask: np.ndarray | None  # (H*W*C,) uint8 0 or the value's all-ones (255, or 15 for nibbles), or None
    inv: np.ndarray       # argsort(idx)
    inv_mask: np.ndarray | None  # mask[inv], so that decrypt is also one gather + one XOR
    runs: np.ndarray | None = None      # plan_runs(idx, mask): the compiled kernel's form, if any
    inv_runs: np.ndarray | None = None  # the same for (inv, inv_mask)


class Scheme:
    """Base class: subclasses implement ``_build(h, w) -> (idx, mask)`` and ``key_space_bits``.

    A plan permutes the ``values_per_pixel`` values of every pixel (3 bytes; ``le``: 6 nibbles,
    made by ``_to_values`` and merged back by ``_from_values``)."""

    name: ClassVar[str] = ""
    keyed: ClassVar[bool] = True
    jpeg_block_aligned: ClassVar[bool] = False
    values_per_pixel: ClassVar[int] = 3
    default_block_size: ClassVar[int | None] = None
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, subkey: bytes | None = None, block_size: int | None = None, pad: str = "error", **options):
        if self.keyed and (not isinstance(subkey, bytes) or len(subkey) < 16):
            raise SchemeError(f"scheme {self.name} needs a key (a subkey of at least 16 bytes)")
        self._subkey = subkey if self.keyed else None
        bs = self.default_block_size if block_size is None else int(block_size)
        if bs is not None and bs < 1:
            raise SchemeError(f"scheme {self.name}: block size must be >= 1, got {block_size}")
        self.block_size = bs
        if pad not in PAD_POLICIES:
            raise SchemeError(f"pad policy {pad!r} unknown; valid: {', '.join(PAD_POLICIES)}")
        self.pad = pad
        unknown = set(options) - set(self.option_names)
        if unknown:
            valid = ", ".join(self.option_names) or "none"
            raise SchemeError(f"scheme {self.name}: unknown option(s) {', '.join(sorted(unknown))}; valid: {valid}")
        self.options = {k: options[k] for k in self.option_names if k in options}
        self._plans: dict[tuple[int, int], Plan] = {}

    def __repr__(self) -> str:  # never shows key material
        return f"{type(self).__name__}(block_size={self.block_size}, pad={self.pad!r}, options={self.options})"

    def __reduce__(self):
        raise TypeError("schemes hold key material and cannot be pickled; rebuild them from a key reference")

    # -- what a manifest records
    def params(self) -> dict:
        return {"scheme": self.name, "block_size": self.block_size, "pad": self.pad, "options": dict(self.options)}

    def key_space_bits(self, h: int, w: int) -> float:
        raise NotImplementedError

    def jpeg_unit(self) -> int | None:
        """The block size JPEG alignment is checked against (``etc:common=1,sub=S``: S)."""
        return self.block_size

    # -- geometry
    def padded_size(self, h: int, w: int, item: str = "batch") -> tuple[int, int]:
        B = self.block_size or 1
        if h % B == 0 and w % B == 0:
            return h, w
        if self.pad == "error":
            raise SchemeError(
                f"{item}: image size {h}x{w} (HxW) is not a multiple of block size {B} for scheme {self.name}; "
                f"resize or crop it, or choose a pad policy ({', '.join(p for p in PAD_POLICIES if p != 'error')})")
        return -(-h // B) * B, -(-w // B) * B

    def plan(self, h: int, w: int) -> Plan:
        key = (h, w)
        if key not in self._plans:
            idx, mask = self._build(h, w)
            idx = np.ascontiguousarray(idx, dtype=np.intp)
            if mask is not None:
                mask = np.ascontiguousarray(mask, dtype=np.uint8)
            inv = np.argsort(idx).astype(np.intp)
            inv_mask = None if mask is None else np.ascontiguousarray(mask[inv])
            vpp = self.values_per_pixel
            runs = inv_runs = None
            if _native is not None:
                runs, inv_runs = plan_runs(idx, mask, vpp), plan_runs(inv, inv_mask, vpp)
            self._plans[key] = Plan(idx, mask, inv, inv_mask, runs, inv_runs)
        return self._plans[key]

    def _build(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    # -- transforms
    def _to_values(self, x: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, H*W*values_per_pixel) values the plan permutes."""
        return x.reshape(len(x), -1)

    def _from_values(self, v: np.ndarray, h: int, w: int) -> np.ndarray:
        return v.reshape(len(v), h, w, 3)

    def encrypt(self, x: np.ndarray, item: str = "batch") -> np.ndarray:
        x = ensure_rgb(x, item)
        n, h, w, _ = x.shape
        ph, pw = self.padded_size(h, w, item)
        if (ph, pw) != (h, w):
            mode = "edge" if self.pad == "edge" else "constant"
            x = np.pad(x, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode=mode)
        p = self.plan(ph, pw)
        return self._from_values(_gather_xor(self._to_values(x), p.idx, p.mask, p.runs, self.values_per_pixel),
                                 ph, pw)

    def decrypt(self, y: np.ndarray, item: str = "batch", size: tuple[int, int] | None = None) -> np.ndarray:
        """Invert ``encrypt``. ``size`` = original (H, W) when a pad policy enlarged the images."""
        y = ensure_rgb(y, item)
        n, h, w, _ = y.shape
        if self.padded_size(h, w, item) != (h, w):
            raise SchemeError(f"{item}: encrypted size {h}x{w} is not a multiple of block size {self.block_size}")
        p = self.plan(h, w)
        x = self._from_values(_gather_xor(self._to_values(y), p.inv, p.inv_mask, p.inv_runs,
                                          self.values_per_pixel), h, w)
        if size is not None:
            x = x[:, : size[0], : size[1]]
        return x

    def warn_if_weak(self, h: int, w: int) -> float:
        bits = self.key_space_bits(h, w)
        if self.keyed and bits < MIN_KEY_BITS:
            warnings.warn(weak_key_message(self.name, bits, h, w, self.block_size), WeakKeyWarning, stacklevel=2)
        return bits


def weak_key_message(name: str, bits: float, h: int, w: int, block_size: int | None) -> str:
    return (f"WARNING: scheme {name} with {h}x{w} images and block size {block_size} has a key space of only "
            f"{bits:.1f} bits (< {MIN_KEY_BITS}): an attacker who knows the algorithm can search it or solve "
            f"it as a puzzle; see the README's threat model")


@dataclass(frozen=True)
class BlockKeys:
    """One transform shared by every B x B block: output value k of a block (its m = B*B*C values in
    (row, col, channel) order) is input value ``inner[k]``, reversed where ``negpos[k]``; with block
    scrambling, output block i is input block ``perm[i]``. What a patch embedding absorbs."""

    inner: np.ndarray          # (m,)
    negpos: np.ndarray | None  # (m,) bool, or None
    perm: np.ndarray | None    # (n blocks,), or None


def _common_block_plan(h: int, w: int, B: int, keys: BlockKeys, channels: int = 3,
                       ones: int = 255) -> tuple[np.ndarray, np.ndarray | None]:
    """The (idx, mask) plan of a transform shared by every block (``BlockKeys``)."""
    m = B * B * channels
    src = image_to_blocks(np.arange(h * w * channels).reshape(h, w, channels), B).reshape(-1, m)
    if keys.perm is not None:
        src = src[keys.perm]
    hb, wb = h // B, w // B
    idx = blocks_to_image_order(src[:, keys.inner].reshape(-1, B, B, channels), hb, wb).reshape(-1)
    if keys.negpos is None:
        return idx, None
    mask = np.broadcast_to(np.where(keys.negpos, ones, 0), src.shape).reshape(-1, B, B, channels)
    return idx, blocks_to_image_order(mask, hb, wb).reshape(-1)


def _transform_blocks(src: np.ndarray, dih: np.ndarray, cperm: np.ndarray,
                      negpos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """EtC steps (2)-(4) on (n, B, B, 3) blocks (of value indices): dihedral ``dih[i]``, colour
    order ``CPERMS[cperm[i]]`` and negative-positive ``negpos[i]`` per block -> (blocks, mask)."""
    out = np.empty_like(src)
    for t in range(8):  # a loop over the 8 transform types, not over blocks
        sel = dih == t
        if sel.any():
            out[sel] = dihedral(src[sel], t)
    out = np.take_along_axis(out, CPERMS[cperm][:, None, None, :], axis=3)
    return out, np.broadcast_to(np.where(negpos, 255, 0)[:, None, None, None], out.shape)


class Plain(Scheme):
    name = "plain"
    keyed = False

    def _build(self, h, w):
        return np.arange(h * w * 3), None

    def encrypt(self, x, item="batch"):  # the identity: no copy
        x = ensure_rgb(x, item)
        self.padded_size(x.shape[1], x.shape[2], item)
        return x

    def decrypt(self, y, item="batch", size=None):
        y = ensure_rgb(y, item)
        return y if size is None else y[:, : size[0], : size[1]]

    def key_space_bits(self, h, w):
        return 0.0


def _bool_option(scheme: str, name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise SchemeError(f"scheme {scheme}: option {name} must be true/false, got {value!r}")


N_BLOCK_TRANSFORMS = 8 * 2 * 6  # EtC's per-block choices: dihedral x negative-positive x colour order


class EtC(Scheme):
    name = "etc"
    jpeg_block_aligned = True
    default_block_size = 16
    option_names = ("common", "scramble", "sub")

    def __init__(self, subkey=None, block_size=None, pad="error", **options):
        super().__init__(subkey, block_size, pad, **options)
        common = _bool_option(self.name, "common", self.options.get("common", False))
        scramble = _bool_option(self.name, "scramble", self.options.get("scramble", True))
        sub = self.options.get("sub")
        if sub is not None:
            try:
                sub = int(sub)
            except (TypeError, ValueError):
                raise SchemeError(f"scheme etc: option sub must be a sub-block size in pixels, got {sub!r}") from None
            if not common:
                raise SchemeError("scheme etc: sub-blocks (sub=S) are the two-level form with keys shared by every "
                                  "main block: give common=1 too")
            if sub < 1 or self.block_size % sub:
                raise SchemeError(f"scheme etc: sub-block size {sub} must divide the block size {self.block_size}")
            sub = None if sub == self.block_size else sub
        self.common, self.scramble, self.sub = common, scramble, sub
        # what a manifest records: nothing for the default (per-block keys, scrambled), as before
        opts = {}
        if common:
            opts = {"common": True, "scramble": scramble}
            if sub is not None:
                opts["sub"] = sub
        elif not scramble:
            opts = {"scramble": False}
        self.options = opts

    def jpeg_unit(self):
        return self.sub or self.block_size

    @dataclass(frozen=True)
    class Keys:
        perm: np.ndarray      # K1: output block i = input block perm[i]
        dihedral: np.ndarray  # K2: transform 0..7 per output block
        negpos: np.ndarray    # K3: bool per output block
        cperm: np.ndarray     # K4: index into CPERMS per output block

    def keys_for(self, h: int, w: int) -> "EtC.Keys":
        """The per-block keys (``common=0``); ``perm`` is the identity with ``scramble=0``."""
        if self.common:
            raise SchemeError("scheme etc:common=1 has one key for every block: use patch_keys(h, w)")
        B = self.block_size
        n = (h // B) * (w // B)
        tag = f"etc/{h}x{w}/B{B}"
        k = self._subkey
        perm = key_permutation(k, tag + "/K1", n) if self.scramble else np.arange(n)
        return EtC.Keys(perm, key_choice(k, tag + "/K2", n, 8), key_bits(k, tag + "/K3", n),
                        key_choice(k, tag + "/K4", n, 6))

    def patch_keys(self, h: int, w: int) -> BlockKeys:
        """``common=1``: the one transform of every B x B block as a value permutation + sign mask.

        Sub-block level (S = sub, or B): the (B/S)^2 sub blocks of a main block are translocated
        (output sub block j = input sub block ``K1[j]``), then output sub block j gets its own
        dihedral (K2), negative-positive (K3) and colour-order (K4) keys; all of it independent of
        the image size and shared by every main block. Main-block scrambling (K5, ``scramble``) is
        per image size, as EtC's.
        """
        if not self.common:
            raise SchemeError("scheme etc uses a different key per block; only etc:common=1 has one per-block "
                              "transform (patch_keys)")
        B, k = self.block_size, self._subkey
        S = self.sub or B
        ns = (B // S) ** 2
        tag = f"etc-common/B{B}/S{S}"
        sub = image_to_blocks(np.arange(B * B * 3).reshape(B, B, 3), S)  # (ns, S, S, 3) value indices
        if ns > 1:
            sub = sub[key_permutation(k, tag + "/K1", ns)]
        out, mask = _transform_blocks(sub, key_choice(k, tag + "/K2", ns, 8), key_choice(k, tag + "/K4", ns, 6),
                                      key_bits(k, tag + "/K3", ns))
        inner = blocks_to_image_order(out, B // S, B // S).reshape(-1)
        negpos = blocks_to_image_order(mask, B // S, B // S).reshape(-1) == 255
        perm = key_permutation(k, f"etc-common/{h}x{w}/B{B}/K5", (h // B) * (w // B)) if self.scramble else None
        return BlockKeys(inner, negpos, perm)

    def _build(self, h, w):
        B = self.block_size
        if self.common:
            return _common_block_plan(h, w, B, self.patch_keys(h, w))
        keys = self.keys_for(h, w)
        src = image_to_blocks(np.arange(h * w * 3).reshape(h, w, 3), B)[keys.perm]  # (n, B, B, 3)
        out, mask = _transform_blocks(src, keys.dihedral, keys.cperm, keys.negpos)
        hb, wb = h // B, w // B
        return blocks_to_image_order(out, hb, wb).reshape(-1), blocks_to_image_order(mask, hb, wb).reshape(-1)

    def sub_blocks(self) -> int:
        """Sub blocks per main block (1 unless ``common=1,sub=S`` with S < B)."""
        return (self.block_size // (self.sub or self.block_size)) ** 2

    def key_space_bits(self, h, w):
        n = (h // self.block_size) * (w // self.block_size)
        order = log2_factorial(n) if self.scramble else 0.0
        if not self.common:
            return order + n * math.log2(N_BLOCK_TRANSFORMS)
        ns = self.sub_blocks()
        return order + log2_factorial(ns) + ns * math.log2(N_BLOCK_TRANSFORMS)


class Blockwise(Scheme):
    name = "blockwise"
    jpeg_block_aligned = True
    default_block_size = 16
    option_names = ("negpos", "scramble")

    def __init__(self, subkey=None, block_size=None, pad="error", **options):
        super().__init__(subkey, block_size, pad, **options)
        self.options = {"negpos": _bool_option(self.name, "negpos", self.options.get("negpos", True)),
                        "scramble": _bool_option(self.name, "scramble", self.options.get("scramble", False))}

    def keys_for(self, h: int, w: int) -> BlockKeys:
        B = self.block_size
        k = self._subkey
        m = B * B * 3
        inner = key_permutation(k, f"blockwise/B{B}/inner", m)  # common to all blocks and image sizes
        neg = key_bits(k, f"blockwise/B{B}/negpos", m) if self.options["negpos"] else None
        perm = None
        if self.options["scramble"]:
            perm = key_permutation(k, f"blockwise/{h}x{w}/B{B}/scramble", (h // B) * (w // B))
        return BlockKeys(inner, neg, perm)

    def patch_keys(self, h: int, w: int) -> BlockKeys:
        return self.keys_for(h, w)

    def _build(self, h, w):
        return _common_block_plan(h, w, self.block_size, self.keys_for(h, w))

    def key_space_bits(self, h, w):
        m = self.block_size ** 2 * 3
        bits = log2_factorial(m) + (m if self.options["negpos"] else 0)
        if self.options["scramble"]:
            bits += log2_factorial((h // self.block_size) * (w // self.block_size))
        return bits


class LE(Scheme):
    """Tanaka's learnable image encryption on the 6-channel nibble image (see the module docstring).

    Tanaka's reference code keeps, per block, the B*B*3 lower nibbles and then the B*B*3 upper ones
    in one vector, derives the reversed positions from the shuffle key (key values above half) and
    reverses them both before and after shuffling; that too is one fixed nibble permutation plus a
    reversal mask. Here the reversal bits are drawn from the key independently of the shuffle (the
    paper's "randomly selected" values), which only adds key space."""

    name = "le"
    default_block_size = 4
    values_per_pixel = 6

    def keys_for(self, h: int = 0, w: int = 0) -> BlockKeys:
        """Shared by every block and every image size: a shuffle of the B*B*6 nibbles (row, col, and
        channel order R, G, B upper halves then R, G, B lower halves) and their reversal bits."""
        B, k = self.block_size, self._subkey
        m = B * B * 6
        return BlockKeys(key_permutation(k, f"le/B{B}/shuffle", m), key_bits(k, f"le/B{B}/reverse", m), None)

    def _to_values(self, x):
        return np.concatenate([x >> 4, x & 0x0F], axis=-1).reshape(len(x), -1)

    def _from_values(self, v, h, w):
        v = v.reshape(len(v), h, w, 6)
        out = v[..., :3] << 4
        out |= v[..., 3:]
        return out

    def _build(self, h, w):
        return _common_block_plan(h, w, self.block_size, self.keys_for(h, w), channels=6, ones=0x0F)

    def key_space_bits(self, h, w):
        m = self.block_size ** 2 * 6
        return log2_factorial(m) + m


class PE(Scheme):
    name = "pe"
    default_block_size = 1

    def _build(self, h, w):
        k = self._subkey
        npx = h * w
        cp = key_choice(k, f"pe/{h}x{w}/channels", npx, 6)
        idx = (np.arange(npx)[:, None] * 3 + CPERMS[cp]).reshape(-1)
        mask = np.where(key_bits(k, f"pe/{h}x{w}/negpos", npx * 3), 255, 0)
        return idx, mask

    def padded_size(self, h, w, item="batch"):
        return h, w

    def key_space_bits(self, h, w):
        return h * w * (3 + math.log2(6))


class ELE(Scheme):
    name = "ele"
    default_block_size = 4

    def _build(self, h, w):
        B, k = self.block_size, self._subkey
        n, m = (h // B) * (w // B), B * B * 3
        tag = f"ele/{h}x{w}/B{B}"
        src = image_to_blocks(np.arange(h * w * 3).reshape(h, w, 3), B).reshape(n, m)
        src = src[key_permutation(k, tag + "/scramble", n)]
        # an independent permutation per block: argsort of per-block 64-bit draws, vectorised
        inner = np.argsort(_u64(k, tag + "/inner", n * m).reshape(n, m), axis=1, kind="stable")
        out = np.take_along_axis(src, inner, axis=1)
        mask = np.where(key_bits(k, tag + "/negpos", n * m), 255, 0).reshape(n, m)
        hb, wb = h // B, w // B
        return (blocks_to_image_order(out.reshape(n, B, B, 3), hb, wb).reshape(-1),
                blocks_to_image_order(mask.reshape(n, B, B, 3), hb, wb).reshape(-1))

    def key_space_bits(self, h, w):
        B = self.block_size
        n, m = (h // B) * (w // B), B * B * 3
        return log2_factorial(n) + n * (log2_factorial(m) + m)


SCHEMES: dict[str, type[Scheme]] = {c.name: c for c in (Plain, EtC, Blockwise, LE, PE, ELE)}


def parse_scheme_spec(spec: str) -> tuple[str, dict]:
    """``"blockwise:scramble=1,negpos=0"`` -> ("blockwise", {"scramble": "1", "negpos": "0"})."""
    spec = str(spec).strip()
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if name not in SCHEMES:
        raise SchemeError(f"unknown scheme {name!r}; valid: {', '.join(SCHEMES)}")
    opts = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        k, eq, v = part.partition("=")
        if not eq:
            raise SchemeError(f"scheme {name}: option {part!r} must look like name=value")
        opts[k.strip()] = v.strip()
    cls = SCHEMES[name]
    bad = set(opts) - set(cls.option_names)
    if bad:
        raise SchemeError(f"scheme {name}: unknown option(s) {', '.join(sorted(bad))}; "
                          f"valid: {', '.join(cls.option_names) or 'none'}")
    return name, opts


def spec_of(name: str, options: dict | None = None) -> str:
    """The spec of a scheme name and its options (as parsed, or ``Scheme.params()["options"]``, a
    manifest's ``scheme_options``; flags as 0/1): ``spec_of("etc", {"common": True})`` -> ``"etc:common=1"``."""
    opts = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in (options or {}).items())
    return f"{name}:{opts}" if opts else name


def spec_label(spec: str) -> str:
    """A spec in one canonical spelling (``" ETC: common=1 "`` -> ``"etc:common=1"``), for reports."""
    return spec_of(*parse_scheme_spec(spec))


def split_scheme_list(values) -> list[str]:
    """Scheme specs from comma-separated text (or a list of such texts): commas separate schemes and
    also one scheme's options, so a part with ``=`` and no ``:`` continues the previous scheme:
    ``"plain,etc:common=1,sub=8,le"`` -> ``["plain", "etc:common=1,sub=8", "le"]``."""
    out: list[str] = []
    for text in ([values] if isinstance(values, str) else values):
        for part in (p.strip() for p in str(text).split(",")):
            if not part:
                continue
            if "=" in part and ":" not in part:
                if not out:
                    raise SchemeError(f"scheme option {part!r} comes before any scheme name")
                out[-1] += ("," if ":" in out[-1] else ":") + part
            else:
                out.append(part)
    for spec in out:
        parse_scheme_spec(spec)
    return out


def make_scheme(spec: str, *, key=None, dataset: str | None = None, block_size: int | None = None,
                pad: str = "error", subkey: bytes | None = None) -> Scheme:
    """Build a scheme from a spec string and an ``OwnerKey`` (or an explicit subkey).

    The subkey is derived from the owner key with the dataset id, the scheme name and the
    block size (``OwnerKey.subkey``), so the same owner key gives unrelated keys per dataset.
    """
    name, opts = parse_scheme_spec(spec)
    cls = SCHEMES[name]
    bs = cls.default_block_size if block_size is None else int(block_size)
    if cls.keyed and subkey is None:
        if key is None:
            raise SchemeError(f"scheme {name} needs a key (--key PATH or $ETC_DATA_KEY); only 'plain' needs none")
        if not dataset:
            raise SchemeError(f"scheme {name} needs a dataset id to derive the per-dataset key")
        subkey = key.subkey(dataset, name, bs if bs is not None else 0)
    return cls(subkey, bs, pad, **opts)


def scheme_from_params(params: dict, *, key=None, dataset: str | None = None) -> Scheme:
    """Rebuild a scheme from what ``Scheme.params()`` wrote (e.g. into a manifest)."""
    try:
        return make_scheme(spec_of(params["scheme"], params.get("options")), key=key, dataset=dataset,
                           block_size=params.get("block_size"), pad=params.get("pad", "error"))
    except KeyError as e:
        raise SchemeError(f"scheme parameters lack field {e}") from None


def key_space(spec: str, image_size: int | tuple[int, int], block_size: int | None = None) -> float:
    """log2 of the key space of a configuration (no key needed)."""
    name, opts = parse_scheme_spec(spec)
    cls = SCHEMES[name]
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    dummy = None if not cls.keyed else b"\0" * 32
    s = cls(dummy, block_size, "edge", **opts)
    ph, pw = s.padded_size(h, w)
    return s.key_space_bits(ph, pw)
