"""The ITN attack: trained on public CIFAR-10 JPEG copies under random keys, applied to exact test images
under a key it never saw; and `etc-data audit --attack itn` at a tiny budget (the CI run)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from etc_data.audit import ssim_psnr
from etc_data.cli import main
from etc_data.itn import ITNConfig, ITNError, encrypt_random_keys, itn_restore, train_itn
from etc_data.schemes import make_scheme

from tests.conftest import needs_shared

pytestmark = needs_shared


@pytest.fixture(scope="module")
def public_images(shared_dir):
    from etc_data.sources import open_source

    src = open_source(shared_dir / "cifar10-train-jpeg.zip")
    return src.load(src.items("train")[::25]).images  # 2,000 public training images


def test_random_keys_differ_per_group_and_from_each_run(cifar_exact):
    x = np.repeat(cifar_exact["x_test"][:1], 8, axis=0)
    rng = np.random.default_rng(0)
    enc = encrypt_random_keys("le", 4, x, 4, rng)
    groups = [enc[i].tobytes() for i in (0, 2, 4, 6)]
    assert len(set(groups)) == 4 and np.array_equal(enc[0], enc[1])   # one key per group of two
    assert not np.array_equal(encrypt_random_keys("le", 4, x, 4, rng), enc)  # the next batch: new keys


def test_itn_restores_pe_ciphertexts_under_an_unseen_key(public_images, cifar_exact):
    """A few dozen CPU steps already recover structure from PE (the paper's Fig. 8: ITN breaks PE)."""
    net, info = train_itn("pe", 1, public_images, ITNConfig(steps=20, seed=0))
    assert info["steps"] == 20 and info["keys"] == 80 and info["device"] == "cpu"
    x = cifar_exact["x_test"][:32]
    enc = make_scheme("pe", subkey=os.urandom(32)).encrypt(x)  # a key the network never saw
    out = itn_restore(net, enc)
    assert out.shape == x.shape and out.dtype == np.uint8
    itn = np.mean([ssim_psnr(a, b)[0] for a, b in zip(x, out)])
    cipher = np.mean([ssim_psnr(a, b)[0] for a, b in zip(x, enc)])
    assert itn > cipher + 0.05, (itn, cipher)


def test_itn_config_errors():
    with pytest.raises(ITNError, match="time budget or a step count"):
        ITNConfig(seconds=0).check()
    with pytest.raises(ITNError, match="keys per batch"):
        ITNConfig(batch_size=4, keys_per_batch=8).check()


def test_audit_cli_with_itn_at_a_tiny_budget(shared_dir, tmp_path, capsys):
    out = tmp_path / "aud"
    rc = main(["audit", "--source", str(shared_dir / "cifar10-lossless-subset.npz"), "--scheme", "pe,le,etc:common=1",
               "--sample", "2", "--attack", "itn", "--itn-train", str(shared_dir / "cifar10-train-jpeg.zip"),
               "--itn-images", "300", "--itn-steps", "2", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "audit.json").read_text())
    got = {(r["scheme"], r["block_size"], r["attack"]) for r in rep["results"]}
    # default block sizes: pe per pixel (no jigsaw there), le 4, etc 16; itn next to jigsaw and fr
    assert got == {("pe", 1, "none"), ("pe", 1, "fr"), ("pe", 1, "itn"),
                   *((s, b, a) for s, b in (("le", 4), ("etc:common=1", 16)) for a in ("none", "jigsaw", "fr", "itn"))}
    assert rep["itn"]["train_source"].endswith("/train") and rep["itn"]["train_images"] == 300
    assert {c["steps"] for c in rep["itn"]["configs"].values()} == {2}
    assert rep["key_bits_by_config"]["etc:common=1/B16"] == pytest.approx(np.log2(24 * 96))
    md = (out / "audit.md").read_text()
    assert "| le | 4 | itn |" in md and "under fresh random keys" in md
    assert (out / "examples.png").stat().st_size > 1000 and (out / "ssim_boxplot.png").stat().st_size > 1000
    assert "itn: trained on 300 images" in capsys.readouterr().out


@needs_shared
def test_bad_itn_settings_are_refused_before_any_attack_runs(shared_dir, tmp_path, monkeypatch, capsys):
    import etc_data.audit as audit

    def no_attack(*a, **k):
        raise AssertionError("an attack ran before the ITN settings were checked")

    monkeypatch.setattr(audit, "_attack_config", no_attack)
    base = ["audit", "--source", str(shared_dir / "cifar10-lossless-subset.npz"), "--scheme", "pe", "--sample", "2",
            "--attack", "itn", "--itn-train", str(shared_dir / "cifar10-train-jpeg.zip"), "--itn-images", "50",
            "--out", str(tmp_path / "a")]
    for extra, msg in [(["--itn-device", "tpu"], "ITN device must be auto, cpu or cuda, got 'tpu'"),
                       (["--itn-steps", "0"], "ITN steps must be >= 1, got 0"),
                       (["--itn-seconds", "0"], "ITN needs a positive time budget")]:
        assert main(base + extra) == 2
        assert msg in capsys.readouterr().err, extra
