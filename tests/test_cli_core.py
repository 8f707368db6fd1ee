import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
from PIL import Image

from etc_data.cli import main


def run(argv):
    return subprocess.run([sys.executable, "-m", "etc_data.cli", *argv], capture_output=True, text=True)


def test_keys_cli_new_fingerprint_space(tmp_path):
    p = tmp_path / "a.key"
    r = run(["keys", "new", "--owner", "alice", "--out", str(p)])
    assert r.returncode == 0, r.stderr
    secret = json.loads(p.read_text())["secret"]
    assert secret not in r.stdout + r.stderr and str(p) in r.stdout
    fp = run(["keys", "fingerprint", str(p)])
    assert fp.stdout.strip() in r.stdout and len(fp.stdout.strip()) == 32
    pub = run(["keys", "public", "--key", str(p), "--out", str(tmp_path / "a.pub")])
    assert pub.returncode == 0 and pub.stdout.startswith("ed25519:") and len(pub.stdout.splitlines()) == 1
    assert f"public key {pub.stdout.strip()}" in r.stdout and secret not in pub.stdout + pub.stderr
    assert (tmp_path / "a.pub").read_text() == pub.stdout
    again = run(["keys", "new", "--owner", "alice", "--out", str(p)])
    assert again.returncode == 2 and "already exists" in again.stderr
    sp = run(["keys", "space", "--scheme", "etc", "--image-size", "32", "--block-size", "16"])
    assert sp.returncode == 0 and "log2 = 30.9" in sp.stdout and "WARNING" in sp.stderr
    sp = run(["keys", "space", "--scheme", "etc", "--image-size", "224", "--block-size", "16"])
    assert "WARNING" not in sp.stderr


def _png(img):
    b = io.BytesIO()
    Image.fromarray(img).save(b, format="PNG")
    return b.getvalue()


def test_encrypt_decrypt_folder_from_zip_round_trip(tmp_path, key_file, cifar_exact):
    x = cifar_exact["x_test"][:6]
    src = tmp_path / "src.zip"
    with zipfile.ZipFile(src, "w") as z:
        for i, img in enumerate(x):
            z.writestr(f"data/train/c{i % 2}/img.{i}.png", _png(img))
    enc, dec = tmp_path / "enc", tmp_path / "dec"
    assert main(["encrypt", "--key", str(key_file), "--dataset", "t", "--block-size", "8", str(src), str(enc)]) == 0
    outs = sorted(p.relative_to(enc).as_posix() for p in enc.rglob("*.png"))
    assert outs == sorted(f"data/train/c{i % 2}/img.{i}.png" for i in range(6))
    e0 = np.asarray(Image.open(enc / "data/train/c0/img.0.png"))
    assert not np.array_equal(e0, x[0])
    assert main(["decrypt", "--key", str(key_file), "--dataset", "t", "--block-size", "8", str(enc), str(dec)]) == 0
    for i in range(6):
        assert np.array_equal(np.asarray(Image.open(dec / f"data/train/c{i % 2}/img.{i}.png")), x[i])


def test_encrypted_folder_carries_its_parameters_and_refuses_another_key(tmp_path, key_file, cifar_exact, capsys):
    from etc_data.keys import load_key, new_key_file

    x = cifar_exact["x_test"][:4]
    src = tmp_path / "src.zip"
    with zipfile.ZipFile(src, "w") as z:
        for i, img in enumerate(x):
            z.writestr(f"c{i % 2}/img{i}.png", _png(img))
    enc = tmp_path / "enc"
    assert main(["encrypt", "--key", str(key_file), "--dataset", "t", "--scheme", "blockwise:negpos=0",
                 "--block-size", "8", str(src), str(enc)]) == 0
    k = load_key(key_file)
    rec = json.loads((enc / "etc-data-folder.json").read_text())
    assert rec == {"format": "etc-data-folder/1", "dataset": "t", "scheme": "blockwise", "block_size": 8,
                   "pad": "error", "options": {"negpos": False, "scramble": False}, "key_fingerprint": k.fingerprint,
                   "public_key": k.public_key}
    # decrypt needs only the key: the rest comes from the record
    assert main(["decrypt", "--key", str(key_file), str(enc), str(tmp_path / "dec")]) == 0
    for i in range(4):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "dec" / f"c{i % 2}/img{i}.png")), x[i])
    other = tmp_path / "other.key"
    new_key_file(other, "mallory")
    capsys.readouterr()
    refusals = [(["--key", str(other)], f"encrypted under key fingerprint {k.fingerprint}"),
                (["--key", str(key_file), "--block-size", "16"], "block_size: folder has 8, given 16"),
                (["--key", str(key_file), "--scheme", "etc"], "scheme: folder has 'blockwise', given 'etc'"),
                (["--key", str(key_file), "--dataset", "u"], "dataset: folder has 't', given 'u'")]
    for args, msg in refusals:
        assert main(["decrypt", *args, str(enc), str(tmp_path / "bad")]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # another key cannot add images to the folder; a folder without a record is not decrypted
    assert main(["encrypt", "--key", str(other), "--dataset", "t", "--scheme", "blockwise:negpos=0", "--block-size",
                 "8", str(src), str(enc)]) == 2
    assert "already holds images encrypted with other settings (key_fingerprint, public_key)" in capsys.readouterr().err
    assert main(["decrypt", "--key", str(key_file), str(tmp_path / "dec"), str(tmp_path / "bad")]) == 2
    assert "no etc-data-folder.json" in capsys.readouterr().err


def test_encrypt_never_writes_outside_its_destination(tmp_path, key_file, cifar_exact, capsys):
    src = tmp_path / "slip.zip"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("c0/ok.png", _png(cifar_exact["x_test"][0]))
        z.writestr("c0/../../../escaped.png", _png(cifar_exact["x_test"][1]))
    out = tmp_path / "a" / "out"
    assert main(["encrypt", "--key", str(key_file), "--dataset", "t", "--block-size", "8", str(src), str(out)]) == 2
    assert "would be written outside" in capsys.readouterr().err
    assert not list(tmp_path.rglob("escaped*")) and not out.exists()


def test_encrypt_corrupt_image_is_named_and_not_written(tmp_path, key_file, capsys):
    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    (src / "good.png").write_bytes(_png(np.zeros((16, 16, 3), np.uint8)))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    rc = main(["encrypt", "--key", str(key_file), "--dataset", "t", str(tmp_path / "src"), str(out)])
    assert rc == 2
    assert "broken.png" in capsys.readouterr().err
    assert not list(out.rglob("broken*"))


def test_encrypt_size_not_multiple_names_file(tmp_path, key_file, capsys):
    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    (src / "odd.png").write_bytes(_png(np.zeros((20, 16, 3), np.uint8)))
    rc = main(["encrypt", "--key", str(key_file), "--dataset", "t", str(tmp_path / "src"), str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "odd.png" in err and "20x16" in err
    assert main(["encrypt", "--key", str(key_file), "--dataset", "t", "--pad", "edge",
                 str(tmp_path / "src"), str(tmp_path / "o")]) == 0


def test_world_readable_key_refused_by_cli(tmp_path, key_file, capsys):
    os.chmod(key_file, 0o644)
    rc = main(["encrypt", "--key", str(key_file), "--dataset", "t", str(tmp_path), str(tmp_path / "o")])
    assert rc == 2 and "chmod 600" in capsys.readouterr().err
