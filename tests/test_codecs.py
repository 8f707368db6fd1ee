import numpy as np
import pytest

from etc_data.codecs import CODECS, CodecError, check_scheme_codec, codec_for_ext, decode_batch, encode_batch, get_codec
from etc_data.schemes import SchemeError, make_scheme

LOSSLESS = ["jpegls", "j2k", "j2k:impl=imagecodecs", "j2k:mct=1,res=3,fmt=j2k", "png", "webp", "jxl", "raw"]


@pytest.mark.parametrize("spec", LOSSLESS)
def test_lossless_codecs_are_bit_exact_on_real_images(spec, cifar_exact, imagenette_batch):
    c = get_codec(spec)
    assert c.lossless
    for imgs in (cifar_exact["x_test"][:40], imagenette_batch[:4]):
        enc = make_scheme("etc", subkey=b"\x05" * 32, block_size=16).encrypt(imgs)
        for batch in (imgs, enc):
            blobs = encode_batch(c, batch, workers=2)
            assert np.array_equal(decode_batch(c, blobs, workers=2), batch)


def test_jpeg_quality_and_subsampling(cifar_exact):
    x = cifar_exact["x_test"][:200]
    sizes = {}
    for spec in ("jpeg:q=50,sub=420", "jpeg:q=95,sub=420", "jpeg:q=95,sub=444"):
        c = get_codec(spec)
        blobs = encode_batch(c, x)
        sizes[spec] = sum(map(len, blobs))
        dec = decode_batch(c, blobs)
        assert dec.shape == x.shape
        err = np.abs(dec.astype(int) - x).mean()
        assert err < (12 if "q=50" in spec else 5), spec
    assert sizes["jpeg:q=50,sub=420"] < sizes["jpeg:q=95,sub=420"] < sizes["jpeg:q=95,sub=444"]
    assert get_codec("jpeg").spec == "jpeg:q=85,sub=420,fastdct=0" and get_codec("jpeg").ext == "jpg"


def test_spec_parsing_errors_list_the_valid_choices():
    with pytest.raises(CodecError, match="unknown codec 'bmp'; valid: jpeg, jpegls, j2k"):
        get_codec("bmp")
    with pytest.raises(CodecError, match="unknown parameter 'quality'; valid: q, sub, fastdct"):
        get_codec("jpeg:quality=80")
    with pytest.raises(CodecError, match="must be one of 420, 422, 444, gray"):
        get_codec("jpeg:sub=411")
    with pytest.raises(CodecError, match="1..100"):
        get_codec("jpeg:q=0")
    assert get_codec("JPEG-LS").name == "jpegls" and get_codec("j2k").params == {"impl": "pillow", "mct": 0, "res": 0, "fmt": "jp2"}
    assert {codec_for_ext(v[0]).name for v in CODECS.values()} == set(CODECS)


def test_corrupt_data_is_a_codec_error():
    c = get_codec("png")
    blob = c.encode(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(CodecError, match="png: cannot decode"):
        c.decode(blob[:20])
    with pytest.raises(CodecError, match="raw"):
        get_codec("raw").decode(b"P6\n8 8\n255\nshort")


def test_etc_jpeg_compatibility_enforced_through_the_core_check():
    check_scheme_codec(make_scheme("etc", subkey=b"k" * 32, block_size=16), "jpeg:sub=420")
    with pytest.raises(SchemeError, match="block size 8.*420"):
        check_scheme_codec(make_scheme("etc", subkey=b"k" * 32, block_size=8), "jpeg:sub=420")
    check_scheme_codec(make_scheme("etc", subkey=b"k" * 32, block_size=8), "jpeg:sub=444")
    check_scheme_codec(make_scheme("etc", subkey=b"k" * 32, block_size=8), "png")  # lossless: any block


def test_etc_keeps_jpeg_size_ele_does_not(cifar_exact):
    """The paper's Table IV in miniature on exact CIFAR pixels: EtC within ~1 %, ELE far larger."""
    x = cifar_exact["x_train"][:500]
    c = get_codec("jpeg:q=85,sub=444")
    size = {s: sum(map(len, encode_batch(c, make_scheme(s, subkey=b"k" * 32).encrypt(x)))) for s in ("plain", "etc", "ele")}
    assert abs(size["etc"] / size["plain"] - 1) < 0.015
    assert size["ele"] / size["plain"] > 1.6


def test_j2k_pillow_and_imagecodecs_defaults_differ_only_by_mct_and_resolutions(cifar_exact):
    """Pillow's defaults (no colour transform, OpenJPEG's 6 resolutions) vs imagecodecs' (colour
    transform, 3 resolutions at 32 px): with those two set alike the codestreams are identical."""
    x = cifar_exact["x_train"][:60]
    pil, ic = encode_batch("j2k", x), encode_batch("j2k:impl=imagecodecs", x)
    assert encode_batch("j2k:mct=1,res=3", x) == ic
    assert encode_batch("j2k:impl=imagecodecs,mct=0", x) == encode_batch("j2k:res=3", x)
    size = lambda blobs: sum(map(len, blobs))  # noqa: E731
    assert size(ic) < 0.85 * size(pil)  # the colour transform is most of the gap
    assert size(encode_batch("j2k:fmt=j2k", x)) < size(pil)  # no JP2 container boxes


def test_decode_into_matches_decode_and_names_size_mismatches(cifar_exact, imagenette_batch):
    for spec in ("jpeg:q=85,sub=420", "png"):
        c = get_codec(spec)
        for x in (cifar_exact["x_test"][:8], imagenette_batch[:3]):
            blobs = c.encode_many(x)
            out = c.decode_into(blobs, np.empty_like(x))
            assert np.array_equal(out, np.stack([c.decode(b) for b in blobs]))
        with pytest.raises(CodecError, match=r"\(16, 16\)"):
            c.decode_into(c.encode_many(cifar_exact["x_test"][:2]), np.empty((2, 16, 16, 3), np.uint8))
