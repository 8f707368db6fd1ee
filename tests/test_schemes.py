import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etc_data.schemes import (
    CPERMS, SCHEMES, SchemeError, WeakKeyWarning, check_jpeg_compat, dihedral, image_to_blocks,
    key_space, make_scheme, parse_scheme_spec, scheme_from_params,
)

K1, K2 = b"\x01" * 32, b"\x02" * 32
SPECS = [("etc", 16), ("etc", 8), ("etc", 4), ("blockwise", 4), ("blockwise:scramble=1", 8),
         ("blockwise:negpos=0", 2), ("pe", None), ("ele", 4), ("plain", None)]


@pytest.mark.parametrize("spec,bs", SPECS)
def test_round_trip_on_exact_cifar(cifar_exact, spec, bs):
    x = cifar_exact["x_test"][:500]
    s = make_scheme(spec, subkey=K1, block_size=bs)
    y = s.encrypt(x)
    assert y.shape == x.shape and y.dtype == np.uint8
    assert np.array_equal(s.decrypt(y), x)
    if spec != "plain":
        assert (y != x).mean() > 0.5  # it really changed the images


@pytest.mark.parametrize("spec,bs", [("etc", 16), ("blockwise", 16), ("ele", 4), ("pe", None)])
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


def test_etc_uses_all_8_dihedral_transforms():
    s = make_scheme("etc", subkey=K1, block_size=4)
    k = s.keys_for(64, 64)  # 256 blocks
    assert set(k.dihedral.tolist()) == set(range(8))
    assert set(k.cperm.tolist()) == set(range(6))
    blk = np.arange(16 * 3, dtype=np.uint8).reshape(1, 4, 4, 3)
    assert len({dihedral(blk, t).tobytes() for t in range(8)}) == 8


def test_key_sensitivity_and_wrong_key(cifar_exact):
    x = cifar_exact["x_test"][:100]
    for spec in ("etc", "blockwise", "pe", "ele"):
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
            "['etc','blockwise:scramble=1','pe','ele'])).hexdigest())")
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
    with pytest.raises(SchemeError):
        check_jpeg_compat("blockwise", 4, "444")
    check_jpeg_compat("ele", 4, "420")  # not block-aligned by design: compressed only to measure the cost
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

    class FakeKey:
        def subkey(self, dataset, scheme, bs):
            return K1
    r = scheme_from_params(s.params(), key=FakeKey(), dataset="d")
    x = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(r.encrypt(x), s.encrypt(x))
    with pytest.raises(SchemeError, match="needs a key"):
        make_scheme("etc")
    assert "01010101" not in repr(s)
