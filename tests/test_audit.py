"""Security audit: the attacks on real CIFAR-10 pixels, the measures, the CLI output contract."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from etc_data.audit import (AuditConfig, AuditError, best_global, fr_attack, jigsaw_attack, audit_schemes,
                            ssim_psnr)
from etc_data.cli import main
from etc_data.schemes import make_scheme

from tests.conftest import needs_shared

pytestmark = needs_shared


def _enc(x, B, spec="etc", key_seed=0):
    # a fixed subkey keeps the test deterministic; the attack never sees it (key independence is tested below)
    subkey = hashlib.sha256(b"audit-test-%d" % key_seed).digest()
    return make_scheme(spec, subkey=subkey, block_size=B).encrypt(x)


def test_jigsaw_solves_4_block_cifar_exactly(cifar_exact):
    x = cifar_exact["x_test"][:6]
    enc = _enc(x, 16)
    ok, solved, cipher = 0, [], []
    for i in range(len(x)):
        sol = jigsaw_attack(enc[i], 16)
        s, _, g = best_global(x[i], sol)
        solved.append(s)
        cipher.append(ssim_psnr(x[i], enc[i])[0])
        ok += bool(np.array_equal(g, x[i]))
    # the exact 2x2 solver restores most images pixel for pixel (up to the global transform); a single
    # ciphertext can by chance score a higher SSIM than a wrong solution, so compare the means
    assert ok >= 4
    assert np.mean(solved) > np.mean(cipher) + 0.4


def test_jigsaw_solution_does_not_depend_on_the_key(cifar_exact):
    x = cifar_exact["x_test"][:2]
    sols = [[jigsaw_attack(e, 16) for e in _enc(x, 16, key_seed=k)] for k in (1, 2)]
    for a, b, ref in zip(*sols, x):
        assert best_global(ref, a)[0] == pytest.approx(best_global(ref, b)[0])


def test_jigsaw_is_key_independent_and_beats_ciphertext_on_small_blocks(cifar_exact):
    x = cifar_exact["x_test"][:3]
    enc = _enc(x, 8)
    for i in range(len(x)):
        sol = jigsaw_attack(enc[i], 8, seeds=1)
        assert sol.shape == x[i].shape and sol.dtype == np.uint8
        # the output is a rearrangement of the ciphertext's blocks: same multiset of |x-127.5|
        assert np.array_equal(np.sort(np.abs(sol.astype(int) * 2 - 255).ravel()),
                              np.sort(np.abs(enc[i].astype(int) * 2 - 255).ravel()))


def test_fr_attack_invariant_to_negpos_and_channel_order(cifar_exact):
    x = cifar_exact["x_test"][:1]
    # inverting or permuting the channels of a ciphertext leaves the FR features unchanged
    enc = _enc(x, 8)[0]
    a = fr_attack(enc, 8)
    assert np.array_equal(a, fr_attack(255 - enc, 8))
    assert np.array_equal(a, fr_attack(enc[..., [2, 0, 1]], 8))
    # and it is not the identity: the block-boundary differences (meaningless after scrambling) are dropped
    assert not np.array_equal(a, fr_attack(enc, 0))
    assert a[7, 7] == 255  # a block corner has no within-block neighbour to the right or below


def test_audit_cli_contract(cifar_exact, shared_dir, tmp_path):
    out = tmp_path / "aud"
    rc = main(["audit", "--source", str(shared_dir / "cifar10-lossless-subset.npz"), "--scheme", "etc",
               "--block-size", "16,8", "--sample", "3", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "audit.json").read_text())
    assert rep["key_bits"]["etc/B16"] == pytest.approx(30.92, abs=0.01)
    assert rep["weak_key_warnings"] and "30.9" in rep["weak_key_warnings"][0]
    got = {(r["block_size"], r["attack"]): r for r in rep["results"]}
    assert set(got) == {(b, a) for b in (16, 8) for a in ("none", "jigsaw", "fr")}
    for r in rep["results"]:
        assert {"scheme", "block_size", "ssim_mean", "psnr_mean"} <= set(r) and r["scheme"] == "etc"
        assert -1 <= r["ssim_mean"] <= 1
    assert got[(16, "none")]["measure"] == "none"
    assert got[(16, "jigsaw")]["ssim_mean"] > got[(16, "none")]["ssim_mean"] + 0.3
    assert rep["itn"] is None and "lpips" not in rep
    for f in ("audit.md", "ssim_boxplot.png", "examples.png"):
        assert (out / f).stat().st_size > 100
    assert "LPIPS" not in (out / "audit.md").read_text()


def test_audit_bad_inputs(shared_dir, tmp_path, capsys):
    src = str(shared_dir / "cifar10-lossless-subset.npz")
    assert main(["audit", "--source", src, "--block-size", "12", "--sample", "1", "--out", str(tmp_path)]) == 2
    assert "block size 12" in capsys.readouterr().err
    assert main(["audit", "--source", src, "--sample", "0", "--out", str(tmp_path)]) == 2
    assert main(["audit", "--source", src, "--split", "nope", "--sample", "1", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    # LPIPS was validated and then never computed: the option is gone (no backbone weights can be had here)
    assert main(["audit", "--source", src, "--sample", "1", "--lpips-weights", "w.pth", "--out", str(tmp_path)]) == 2
    assert "no such option" in capsys.readouterr().err.lower()
    with pytest.raises(AuditError, match="unknown attack.*gan"):
        audit_schemes(AuditConfig(src, ["etc"], [16], out=str(tmp_path), sample=1, attacks=["gan"]))
    # the ITN never trains on the audited images: a source with only the audited split needs --itn-train
    one = tmp_path / "test-only.npz"
    np.savez(one, x_test=np.load(src)["x_test"][:4], y_test=np.load(src)["y_test"][:4])
    assert main(["audit", "--source", str(one), "--sample", "2", "--attack", "itn", "--itn-steps", "1",
                 "--out", str(tmp_path / "a")]) == 2
    assert "no split besides the audited 'test'" in capsys.readouterr().err
    assert main(["audit", "--source", str(one), "--sample", "2", "--attack", "itn", "--itn-steps", "1",
                 "--itn-train", str(shared_dir / "imagenette-224-subset.zip"), "--out", str(tmp_path / "b")]) == 2
    assert "224x224, the audited images 32x32" in capsys.readouterr().err


def test_fr_on_pe_is_the_per_pixel_fold_not_a_blank_image(cifar_exact):
    """Block size 1 has no pixel pair inside a block: the FR attack used to return a blank image for PE."""
    from etc_data.audit import _score_fr

    x = cifar_exact["x_test"][:20]
    enc = _enc(x, None, "pe")
    frs = [fr_attack(e, 1) for e in enc]
    assert all(len(np.unique(f)) > 20 for f in frs)
    # invariant to what PE's key decides: negative-positive and the channel order of every pixel
    assert np.array_equal(frs[0], fr_attack(255 - enc[0], 1)) and np.array_equal(frs[0], fr_attack(enc[0][..., ::-1], 1))
    fr_ssim = np.mean([_score_fr(p, f)[0] for p, f in zip(x, frs)])
    blank = np.mean([_score_fr(p, np.full(p.shape[:2], 255, np.uint8))[0] for p in x])
    cipher = np.mean([ssim_psnr(p, e)[0] for p, e in zip(x, enc)])
    assert fr_ssim > blank + 0.15 and fr_ssim > cipher + 0.2, (fr_ssim, blank, cipher)
