import json
import zipfile

import numpy as np
import pytest

from etc_data.cli import main
from etc_data.report import psnr, size_report
from etc_data.sources import SourceError, open_source

from .conftest import make_image_zip


def test_report_cli_outputs_contract(tmp_path, cifar_exact, capsys):
    npz = tmp_path / "cifar10-mini.npz"
    np.savez(npz, x_train=cifar_exact["x_train"][:150], y_train=cifar_exact["y_train"][:150],
             x_test=cifar_exact["x_test"][:50], y_test=cifar_exact["y_test"][:50])
    rc = main(["report", "sizes", "--source", str(npz), "--schemes", "plain,etc,ele,pe", "--codec", "jpeg:q=85,sub=444",
               "--codec", "jpegls", "--codec", "raw", "--out", str(tmp_path / "r")])
    assert rc == 0
    d = json.loads((tmp_path / "r" / "sizes.json").read_text())
    assert d["block_size"] == 16 and len(d["results"]) == 12
    row = {(r["scheme"], r["codec"]): r for r in d["results"]}
    for r in d["results"]:
        assert r["images"] == 200 and r["mean_bytes"] == pytest.approx(r["total_bytes"] / 200)
    assert row[("plain", "raw")]["total_bytes"] == 200 * (32 * 32 * 3 + len(b"P6\n32 32\n255\n"))
    assert row[("etc", "jpegls")]["psnr"] is None
    assert 30 < row[("plain", "jpeg:q=85,sub=444,fastdct=0")]["psnr"] < 45
    assert abs(row[("etc", "jpeg:q=85,sub=444,fastdct=0")]["psnr"] - row[("plain", "jpeg:q=85,sub=444,fastdct=0")]["psnr"]) < 0.5
    assert row[("ele", "jpeg:q=85,sub=444,fastdct=0")]["total_bytes"] > 1.5 * row[("plain", "jpeg:q=85,sub=444,fastdct=0")]["total_bytes"]
    md = (tmp_path / "r" / "sizes.md").read_text()
    assert "| codec | plain | etc | ele | pe |" in md and "cifar10-mini" in md
    assert (tmp_path / "r" / "sizes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ephemeral" in capsys.readouterr().out


def test_report_names_a_corrupt_image(tmp_path, cifar_exact):
    z = make_image_zip(tmp_path / "a.zip", cifar_exact["x_test"][:5], cifar_exact["y_test"][:5], [str(i) for i in range(10)])
    with zipfile.ZipFile(z, "a") as f:
        f.writestr("train/1/broken.png", b"not an image")
    with pytest.raises(SourceError, match="broken.png"):
        size_report(open_source(z), ["plain", "etc"], ["png"], block_size=16)
    rep = size_report(open_source(z), ["plain"], ["png"], on_bad_image="skip")
    assert rep.cells[("plain", "png:level=6")].images == 5 and "broken.png" in rep.skipped[0]


def test_psnr():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] += 1
    assert psnr(a, b)[0] == 100.0 and psnr(a, b)[1] == pytest.approx(48.13, abs=0.01)


def test_psnr_matches_exact_integer_arithmetic_on_real_jpeg_decodes(cifar_exact, imagenette_batch):
    from etc_data.codecs import decode_batch, encode_batch

    for x in (cifar_exact["x_test"][:50], imagenette_batch[:8]):
        y = decode_batch("jpeg:q=30", encode_batch("jpeg:q=30", x))
        mse = ((x.astype(np.int64) - y) ** 2).reshape(len(x), -1).mean(1)
        assert psnr(x, y) == pytest.approx(10 * np.log10(255.0 ** 2 / mse), abs=1e-3)
