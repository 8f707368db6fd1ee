import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etc_data.schemes import (
    CPERMS, SCHEMES, SchemeError, WeakKeyWarning, blocks_to_image_order, check_jpeg_compat, dihedral,
    image_to_blocks, key_space, log2_factorial, make_scheme, parse_scheme_spec, scheme_from_params,
    split_scheme_list,
)

K1, K2 = b"\x01" * 32, b"\x02" * 32
SPECS = [("etc", 16), ("etc", 8), ("etc", 4), ("blockwise", 4), ("blockwise:scramble=1", 8),
         ("blockwise:negpos=0", 2), ("pe", None), ("ele", 4), ("plain", None), ("le", 4), ("le", 2),
         ("etc:common=1", 16), ("etc:common=1,scramble=0", 8), ("etc:common=1,sub=8", 16),
         ("etc:common=1,sub=4,scramble=0", 16), ("etc:scramble=0", 8)]


@pytest.mark.parametrize("spec,bs", SPECS)
def test_round_trip_on_exact_cifar(cifar_exact, spec, bs):
    x = cifar_exact["x_test"][:500]
    s = make_scheme(spec, subkey=K1, block_size=bs)
    y = s.encrypt(x)
    assert y.shape == x.shape and y.dtype == np.uint8
    assert np.array_equal(s.decrypt(y), x)
    if spec != "plain":
        assert (y != x).mean() > 0.5  # it really changed the images


@pytest.mark.parametrize("spec,bs", [("etc", 16), ("blockwise", 16), ("ele", 4), ("pe", None), ("le", 4),
                                     ("le", 16), ("etc:common=1", 16), ("etc:common=1,sub=8", 16)])
def test_round_trip_on_imagenette_224(imagenette_batch, spec, bs):
    s = make_scheme(spec, subkey=K1, block_size=bs)
    assert np.array_equal(s.decrypt(s.encrypt(imagenette_batch)), imagenette_batch)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(SCHEMES)), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5),
       st.sampled_from([1, 2, 3, 4, 8]), st.binary(min_size=16, max_size=32), st.integers(0, 2**31 - 1))
def test_round_trip_hypothesis(name, n, hb, wb, bs, key, seed):
    cls = SCHEMES[name]
    bs_eff = bs if cls.default_block_size not in (None, 1) else cls.default_block_size
    h, w = hb * (bs_eff or 1), wb * (bs_eff or 1)
    x = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    s = cls(key if cls.keyed else None, bs_eff)
    assert np.array_equal(s.decrypt(s.encrypt(x)), x)


def test_etc_structure_each_block_is_a_transformed_copy_of_one_plain_block(cifar_exact):
    x = cifar_exact["x_train"][:50]
    s = make_scheme("etc", subkey=K1, block_size=8)
    keys = s.keys_for(32, 32)
    y = s.encrypt(x)
    assert sorted(keys.perm) == list(range(16))
    assert len(set(keys.dihedral.tolist())) > 1
    for img, enc in zip(x, y):
        pb, eb = image_to_blocks(img, 8), image_to_blocks(enc, 8)
        for i in range(16):
            b = dihedral(pb[keys.perm[i]][None], int(keys.dihedral[i]))[0][..., CPERMS[keys.cperm[i]]]
            if keys.negpos[i]:
                b = 255 - b
            assert np.array_equal(b, eb[i])


def _le_reference(img, B, perm, rev):
    """Tanaka's LE written block by block, as the paper describes it: split every byte of a block into
    its upper and lower 4 bits (a 6-channel block), reverse the chosen nibbles, shuffle, merge."""
    out = np.empty_like(img)
    for r in range(0, img.shape[0], B):
        for c in range(0, img.shape[1], B):
            blk = img[r:r + B, c:c + B].astype(np.int64)
            nib = np.concatenate([blk >> 4, blk & 15], axis=-1).reshape(-1)  # (row, col, [R,G,B hi, R,G,B lo])
            nib = np.where(rev, 15 - nib, nib)[perm].reshape(B, B, 6)
            out[r:r + B, c:c + B] = (nib[..., :3] << 4) | nib[..., 3:]
    return out


def test_le_matches_a_block_by_block_reference(cifar_exact, imagenette_batch):
    for x, B in ((cifar_exact["x_test"][:20], 4), (np.asarray(imagenette_batch)[:2], 16)):
        s = make_scheme("le", subkey=K1, block_size=B)
        k = s.keys_for()
        # reversal then shuffle of the nibbles = shuffle then reversal at the shuffled positions
        y = s.encrypt(x)
        for img, enc in zip(x, y):
            assert np.array_equal(_le_reference(img, B, k.inner, k.negpos[np.argsort(k.inner)]), enc)
        assert 0.3 < k.negpos.mean() < 0.7 and sorted(k.inner) == list(range(B * B * 6))
    # one key for every block: two blocks with equal content encrypt equally, wherever they are
    z = np.zeros((1, 8, 8, 3), np.uint8) + 77
    e = make_scheme("le", subkey=K1, block_size=4).encrypt(z)[0]
    assert np.array_equal(e[:4, :4], e[4:, 4:]) and not np.array_equal(e[:4, :4], z[0, :4, :4])
    assert key_space("le", 32, 4) == pytest.approx(log2_factorial(96) + 96)


def _etc_common_reference(img, B, S, sub_perm, dih, neg, cp, perm):
    """Hamano, Imaizumi & Kiya's two-level EtC step by step (keys shared by every main block)."""
    n = B // S
    mains = image_to_blocks(img, B)
    enc = []
    for m in mains:
        subs = image_to_blocks(m, S)[sub_perm]                                 # i-2 translocate sub blocks
        subs = np.stack([dihedral(sb[None], int(t))[0] for sb, t in zip(subs, dih)])  # i-3 rotate / flip
        subs = np.stack([255 - sb if ng else sb for sb, ng in zip(subs, neg)])   # i-4 negative-positive
        subs = np.stack([sb[..., CPERMS[c]] for sb, c in zip(subs, cp)])          # i-6 colour shuffle
        enc.append(blocks_to_image_order(subs, n, n))
    enc = np.stack(enc)[perm]                                                   # i-7 translocate main blocks
    return blocks_to_image_order(enc, img.shape[0] // B, img.shape[1] // B)     # i-8 integrate


@pytest.mark.parametrize("spec,B,S", [("etc:common=1", 16, 16), ("etc:common=1,sub=8", 16, 8),
                                      ("etc:common=1,sub=4,scramble=0", 16, 4), ("etc:common=1,sub=8", 32, 8)])
def test_etc_common_matches_the_step_by_step_definition(cifar_exact, imagenette_batch, spec, B, S):
    from etc_data.schemes import key_bits, key_choice, key_permutation

    x = np.asarray(imagenette_batch)[:2] if B == 32 else cifar_exact["x_test"][:10]
    h = x.shape[1]
    s = make_scheme(spec, subkey=K2, block_size=B)
    ns = (B // S) ** 2
    tag = f"etc-common/B{B}/S{S}"
    sub_perm = key_permutation(K2, tag + "/K1", ns) if ns > 1 else np.arange(1)
    dih, neg, cp = key_choice(K2, tag + "/K2", ns, 8), key_bits(K2, tag + "/K3", ns), key_choice(K2, tag + "/K4", ns, 6)
    perm = s.patch_keys(h, h).perm
    perm = np.arange((h // B) ** 2) if perm is None else perm
    assert ("scramble=0" in spec) == (s.patch_keys(h, h).perm is None)
    for img, enc in zip(x, s.encrypt(x)):
        assert np.array_equal(_etc_common_reference(img, B, S, sub_perm, dih, neg, cp, perm), enc)


def _assert_rebuilt_from_params(s, size):
    """A scheme rebuilt from its params() (what a manifest records) encrypts the same."""
    class FakeKey:
        def subkey(self, dataset, scheme, bs):
            return K1
    r = scheme_from_params(s.params(), key=FakeKey(), dataset="d")
    x = np.random.default_rng(2).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    assert np.array_equal(r.encrypt(x), s.encrypt(x))


def test_etc_common_key_space_and_options(key_file):
    n = 196
    assert key_space("etc:common=1", 224, 16) == pytest.approx(log2_factorial(n) + np.log2(96))   # 196! x 96
    assert key_space("etc:common=1,scramble=0", 224, 16) == pytest.approx(np.log2(96))            # 96 keys
    assert key_space("etc:common=1,sub=8", 224, 16) == pytest.approx(log2_factorial(n) + np.log2(24) + 4 * np.log2(96))
    assert key_space("etc:scramble=0", 32, 8) == pytest.approx(16 * np.log2(96))
    s = make_scheme("etc:common=1,sub=8", subkey=K1, block_size=16)
    assert s.params()["options"] == {"common": True, "scramble": True, "sub": 8}
    assert make_scheme("etc", subkey=K1).params()["options"] == {}  # manifests of plain EtC unchanged
    _assert_rebuilt_from_params(s, 32)
    with pytest.raises(SchemeError, match="give common=1 too"):
        make_scheme("etc:sub=8", subkey=K1)
    with pytest.raises(SchemeError, match="sub-block size 6 must divide the block size 16"):
        make_scheme("etc:common=1,sub=6", subkey=K1)
    with pytest.raises(SchemeError, match="valid: common, scramble, sub"):
        parse_scheme_spec("etc:foo=1")
    assert split_scheme_list("plain,etc:common=1,sub=8,le, etc:common=1,scramble=0") == \
        ["plain", "etc:common=1,sub=8", "le", "etc:common=1,scramble=0"]
    assert split_scheme_list(["etc", "pe,ele"]) == ["etc", "pe", "ele"]
    with pytest.raises(SchemeError, match="before any scheme"):
        split_scheme_list("sub=8,etc")


def test_etc_uses_all_8_dihedral_transforms():
    s = make_scheme("etc", subkey=K1, block_size=4)
    k = s.keys_for(64, 64)  # 256 blocks
    assert set(k.dihedral.tolist()) == set(range(8))
    assert set(k.cperm.tolist()) == set(range(6))
    blk = np.arange(16 * 3, dtype=np.uint8).reshape(1, 4, 4, 3)
    assert len({dihedral(blk, t).tobytes() for t in range(8)}) == 8


def test_key_sensitivity_and_wrong_key(cifar_exact):
    x = cifar_exact["x_test"][:100]
    for spec in ("etc", "blockwise", "pe", "ele", "le", "etc:common=1,sub=8"):
        a, b = make_scheme(spec, subkey=K1), make_scheme(spec, subkey=K2)
        ya, yb = a.encrypt(x), b.encrypt(x)
        assert (ya != yb).mean() > 0.3, spec
        assert (b.decrypt(ya) != x).mean() > 0.3, spec


def test_owner_key_and_dataset_select_subkey(key_file):
    from etc_data.keys import load_key

    k = load_key(key_file)
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    a = make_scheme("etc", key=k, dataset="cifar10", block_size=8).encrypt(x)
    b = make_scheme("etc", key=k, dataset="cifar10", block_size=8).encrypt(x)
    c = make_scheme("etc", key=k, dataset="other", block_size=8).encrypt(x)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_determinism_across_processes():
    code = ("import numpy as np, hashlib; from etc_data.schemes import make_scheme;"
            "x=np.arange(2*32*32*3,dtype=np.uint64).astype(np.uint8).reshape(2,32,32,3);"
            "print(hashlib.sha256(b''.join(make_scheme(s, subkey=b'\\x01'*32).encrypt(x).tobytes() for s in "
            "['etc','blockwise:scramble=1','pe','ele','le','etc:common=1,sub=8'])).hexdigest())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(outs) == 1


def test_bad_sizes_and_pad_policy():
    x = np.zeros((2, 30, 32, 3), np.uint8) + 7
    s = make_scheme("etc", subkey=K1, block_size=16)
    with pytest.raises(SchemeError, match=r"img_3\.png.*30x32.*block size 16"):
        s.encrypt(x, item="img_3.png")
    p = make_scheme("etc", subkey=K1, block_size=16, pad="edge")
    y = p.encrypt(x)
    assert y.shape == (2, 32, 32, 3)
    assert p.params()["pad"] == "edge"
    assert np.array_equal(p.decrypt(y, size=(30, 32)), x)


def test_grayscale_is_converted_to_rgb():
    g = np.random.default_rng(1).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    s = make_scheme("etc", subkey=K1, block_size=8)
    y = s.encrypt(g)
    assert y.shape == (3, 16, 16, 3)
    assert np.array_equal(s.decrypt(y), np.repeat(g[..., None], 3, -1))
    with pytest.raises(SchemeError, match="uint8"):
        s.encrypt(g.astype(np.float32))


def test_jpeg_compliance_check():
    check_jpeg_compat("etc", 16, "420")
    check_jpeg_compat("etc", 16, "444")
    check_jpeg_compat("etc", 8, "444")
    with pytest.raises(SchemeError, match=r"block size 8.*420.*16x16"):
        check_jpeg_compat("etc", 8, "420")
    with pytest.raises(SchemeError) as e:
        check_jpeg_compat("blockwise", 4, "444")
    # 4:4:4 is already in use: the message must not suggest it (it used to say "or subsampling 444")
    assert "use block size 8)" in str(e.value) and "subsampling 444" not in str(e.value)
    with pytest.raises(SchemeError, match=r"block size 4.*420.*use block size 16\)$"):
        check_jpeg_compat("etc", 4, "420")
    check_jpeg_compat("ele", 4, "420")  # not block-aligned by design: compressed only to measure the cost
    check_jpeg_compat("le", 4, "444")
    # the two-level form transforms 8x8 sub blocks: aligned with 4:4:4, not with 4:2:0's 16x16 MCU
    check_jpeg_compat(make_scheme("etc:common=1,sub=8", subkey=K1, block_size=16), 16, "444")
    with pytest.raises(SchemeError, match="sub-block size 8 .*420.*use sub-block size 16 or subsampling 444"):
        check_jpeg_compat("etc:common=1,sub=8", 16, "420")
    with pytest.raises(SchemeError, match="subsampling"):
        check_jpeg_compat("etc", 16, "411")


def test_key_space_and_weak_warning():
    assert key_space("etc", 32, 16) == pytest.approx(30.9, abs=0.1)  # the paper's CIFAR setting: 4 blocks
    assert key_space("etc", 224, 16) > 128
    assert key_space("blockwise", 32, 4) == pytest.approx(np.log2(float(np.prod(np.arange(1, 49, dtype=float)))) + 48)
    s = make_scheme("etc", subkey=K1, block_size=16)
    with pytest.warns(WeakKeyWarning, match="30.9 bits"):
        s.warn_if_weak(32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_scheme("etc", subkey=K1, block_size=16).warn_if_weak(224, 224)


def test_spec_parsing_and_params_round_trip():
    assert parse_scheme_spec("blockwise:scramble=1") == ("blockwise", {"scramble": "1"})
    with pytest.raises(SchemeError, match="valid: plain, etc"):
        parse_scheme_spec("nope")
    with pytest.raises(SchemeError, match="unknown option.*valid: negpos, scramble"):
        parse_scheme_spec("blockwise:foo=1")
    s = make_scheme("blockwise:scramble=1", subkey=K1, block_size=4)
    assert s.params() == {"scheme": "blockwise", "block_size": 4, "pad": "error",
                          "options": {"negpos": True, "scramble": True}}
    _assert_rebuilt_from_params(s, 8)
    with pytest.raises(SchemeError, match="needs a key"):
        make_scheme("etc")
    assert "01010101" not in repr(s)


# ----------------------------------------------------------------------------- the compiled run kernel

from etc_data import schemes as _schemes  # noqa: E402

RUN_SPECS = [("etc", 16), ("etc", 8), ("etc", 4), ("etc:common=1", 16), ("etc:common=1,sub=8", 16),
             ("etc:scramble=0", 16), ("blockwise", 16), ("pe", None), ("ele", 4), ("le", 4)]


def test_the_compiled_kernel_is_built_in_ci():
    # the install compiles it where a C compiler is; CI must not pass on the slow fallback unnoticed
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        assert _schemes.native_available(), "etc_data._runs was not compiled (see setup.py)"


@pytest.mark.parametrize("spec,bs", RUN_SPECS)
def test_compiled_runs_give_the_numpy_gather_bit_for_bit(imagenette_batch, cifar_exact, spec, bs):
    if not _schemes.native_available():
        pytest.skip("etc_data._runs is not compiled here")
    for x in (imagenette_batch[:8], cifar_exact["x_test"][:64]):
        s = make_scheme(spec, subkey=K2, block_size=bs)
        h, w = x.shape[1:3]
        if bs and (h % bs or w % bs):
            continue
        p = s.plan(h, w)
        vals = s._to_values(x)
        want = _schemes._gather_xor(vals, p.idx, p.mask)  # numpy
        if p.runs is None:  # pe, le, ele: runs too short, the numpy gather serves them
            assert spec.split(":")[0] in ("pe", "le", "ele", "blockwise")
            continue
        assert np.array_equal(_schemes._gather_xor(vals, p.idx, p.mask, p.runs, s.values_per_pixel), want)
        assert np.array_equal(s.encrypt(x), s._from_values(want, h, w))
        assert np.array_equal(s.decrypt(s.encrypt(x)), x)


def test_the_kernel_moves_any_runs_like_their_definition(cifar_exact):
    # random runs (rows, flipped rows, columns, odd steps; lengths 1-21; colour shuffles and other
    # offsets; any masks), many ending at the very end of a row, against the definition in numpy:
    # the vector path (whole groups, an overlapping last group, bytes written past a run) and its
    # scalar fallback must both give exactly out[dst + 3k + c] = in[src + k*step + o_c] ^ m_c
    if not _schemes.native_available():
        pytest.skip("etc_data._runs is not compiled here")
    from etc_data import _runs

    rng = np.random.default_rng(7)
    w = 32
    src = np.ascontiguousarray(cifar_exact["x_test"][:6].reshape(6, -1))
    m = src.shape[1]
    for trial in range(300):
        rows, pos = [], 0
        while pos < m:
            count = int(min(rng.integers(1, 22), (m - pos) // 3))
            step = int(rng.choice([3, -3, 3 * w, -3 * w, 3 * w + 3, -3 * w - 3, 6, 0]))
            offs = rng.permutation(3) if rng.random() < 0.8 else rng.integers(0, 6, 3)
            span = abs(step) * (count - 1) + int(offs.max()) + 1
            if span > m:
                step, span = 3, 3 * (count - 1) + int(offs.max()) + 1
            lo = int(rng.integers(0, m - span + 1)) if rng.random() < 0.7 else m - span  # often at the row's end
            start = lo if step >= 0 else lo + abs(step) * (count - 1)
            mask = rng.integers(0, 256, 3) if rng.random() < 0.5 else np.zeros(3, np.int64)
            perm = int(offs[0]) | int(offs[1]) << 8 | int(offs[2]) << 16
            rows.append([pos, start, step, count, perm, int(mask[0]) | int(mask[1]) << 8 | int(mask[2]) << 16])
            want_idx = start + np.arange(count)[:, None] * step + offs[None, :]
            rows[-1].append((want_idx.reshape(-1), np.tile(mask, count)))
            pos += 3 * count
        table = np.array([r[:6] for r in rows], np.int64)
        want = np.empty_like(src)
        for r in rows:
            idx, mk = r[6]
            want[:, r[0]:r[0] + len(idx)] = src[:, idx] ^ mk.astype(np.uint8)
        got = np.full_like(src, 0xAA)
        _runs.apply(src, got, table, len(src), 3)
        assert np.array_equal(got, want), trial


def test_etc_plans_become_one_run_per_block_row():
    s = make_scheme("etc", subkey=K1, block_size=16)
    idx, mask = s._build(224, 224)
    runs = _schemes.plan_runs(np.asarray(idx), np.asarray(mask, dtype=np.uint8), 3)
    assert runs is not None and len(runs) == 14 * 14 * 16  # blocks x rows: every block row is one run
    assert set(np.abs(runs[:, 2]).tolist()) <= {3, 224 * 3}  # a row, a flipped row, or a column of a rotated block
    assert (runs[:, 3] == 16).all()
    # a pixel-wise scheme has no runs worth a call
    p = make_scheme("pe", subkey=K1)
    assert _schemes.plan_runs(*p._build(32, 32), 3) is None


def test_the_kernel_refuses_runs_outside_its_buffers():
    if not _schemes.native_available():
        pytest.skip("etc_data._runs is not compiled here")
    from etc_data import _runs

    src, out = np.zeros((2, 48), np.uint8), np.zeros((2, 48), np.uint8)
    good = np.array([[0, 0, 3, 16, 0x020100, 0]], np.int64)
    _runs.apply(src, out, good, 2, 3)
    for bad in ([0, 0, 3, 17, 0x020100, 0],      # writes one pixel past the row
                [0, 3, 3, 16, 0x020100, 0],      # reads one pixel past the row
                [0, 0, -3, 2, 0x020100, 0],      # reads before the row
                [0, 0, 3, 16, 0x030100, 0],      # a value offset past the pixel read
                [0, 0, 3, 0, 0x020100, 0]):      # an empty run
        with pytest.raises(ValueError, match="run 0"):
            _runs.apply(src, out, np.array([bad], np.int64), 2, 3)
    for bad in ([[0, 0, 3, 8, 0x020100, 0]],                              # leaves half the row unwritten
                [[24, 0, 3, 8, 0x020100, 0], [0, 0, 3, 8, 0x020100, 0]]):  # out of order
        with pytest.raises(ValueError, match="runs fill|not where the run before"):
            _runs.apply(src, out, np.array(bad, np.int64), 2, 3)
    with pytest.raises(ValueError):
        _runs.apply(src, out, np.zeros(5, np.int64), 2, 3)  # not a 6-column table
    with pytest.raises(ValueError):
        _runs.apply(src, np.zeros((2, 47), np.uint8), good, 2, 3)  # rows of other length than claimed
