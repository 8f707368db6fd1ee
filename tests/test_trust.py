"""Trust boundaries on real CIFAR shards: tampered manifests are refused by verify, train and the
loader (saying what failed); train and evaluate run with no key anywhere; checkpoints never run code."""

import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest

from etc_data.cli import main
from etc_data.errors import EtcError
from etc_data.keys import load_key, new_key_file
from etc_data.manifest import Manifest, sign_manifest
from etc_data.prepare import PrepareConfig, prepare_dataset
from etc_data.shards import build_tar, iter_tar

TINY = ["--model", "convmixer", "--dim", "16", "--depth", "1", "--kernel", "3", "--patch", "2", "--batch-size", "32",
        "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def owners(tmp_path_factory, cifar_exact):
    """alice's encrypted CIFAR shards (96 train in 3 shards, 32 test), her key and public key file,
    and mallory's key (another owner)."""
    root = tmp_path_factory.mktemp("trust")
    np.savez(root / "c10.npz", x_train=cifar_exact["x_train"][:96], y_train=cifar_exact["y_train"][:96],
             x_test=cifar_exact["x_test"][:32], y_test=cifar_exact["y_test"][:32])
    alice, mallory = root / "alice.key", root / "mallory.key"
    new_key_file(alice, "alice")
    new_key_file(mallory, "mallory")
    (root / "alice.pub").write_text(load_key(alice).public_key + "\n")
    prepare_dataset(PrepareConfig(source=str(root / "c10.npz"), out=str(root / "ds"), dataset="c10",
                                  key_ref=str(alice), scheme="etc", block_size=8, codec="png", shard_size=32))
    return root, alice, mallory


def _copy(owners, tmp_path):
    root = owners[0]
    shutil.copytree(root / "ds", tmp_path / "ds")
    return tmp_path / "ds"


def _doc(ds):
    return json.loads((ds / "train" / "manifest.json").read_text())


def _save(ds, doc):
    (ds / "train" / "manifest.json").write_text(json.dumps(doc, indent=1))


def _relabel_first_shard(ds, doc, label=2):
    """Every sample of the first shard gets class ``label``; the shard's sha256 and size are fixed
    in the manifest (what anyone with write access to the bucket can do)."""
    entry = doc["shards"][0]
    path = ds / "train" / entry["name"]
    samples = []
    for s in iter_tar(path.read_bytes(), entry["name"]):
        meta = json.loads(s["json"])
        samples.append(dict(s, cls=label, json=dict(meta, cls=label)))
    data, _ = build_tar(samples)
    path.write_bytes(data)
    entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def tamper_relabel(ds, owners):
    doc = _doc(ds)
    _relabel_first_shard(ds, doc)
    _save(ds, doc)


def tamper_swap_fingerprint(ds, owners):
    _save(ds, dict(_doc(ds), key_fingerprint=load_key(owners[2]).fingerprint))


def tamper_downgrade_to_plain(ds, owners):
    _save(ds, dict(_doc(ds), scheme="plain", block_size=None, key_fingerprint=None))


def tamper_downgrade_unsigned(ds, owners):
    doc = dict(_doc(ds), scheme="plain", block_size=None, key_fingerprint=None)
    del doc["signature"], doc["public_key"]
    _save(ds, doc)


def tamper_traversal(ds, owners):
    doc = _doc(ds)
    real = ds / "train" / doc["shards"][0]["name"]
    shutil.copy(real, ds.parent / "outside.tar")  # a valid shard waiting outside the split folder
    doc["shards"][0]["name"] = doc["filenames"][0] = "../../outside.tar"
    _save(ds, doc)


def tamper_resigned_by_mallory(ds, owners):
    """mallory relabels a shard and signs the result with her own key: a valid signature, but not alice's."""
    doc = _doc(ds)
    _relabel_first_shard(ds, doc)
    m = Manifest.from_dict(doc, "attacker")
    m.key_fingerprint = load_key(owners[2]).fingerprint
    _save(ds, sign_manifest(m, load_key(owners[2])))


CASES = [(tamper_relabel, [], "bad signature"), (tamper_swap_fingerprint, [], "bad signature"),
         (tamper_downgrade_to_plain, [], "bad signature"), (tamper_downgrade_unsigned, [], "unsigned"),
         (tamper_traversal, [], "bad name"), (tamper_resigned_by_mallory, ["--trust", "alice.pub"], "unknown signer")]


@pytest.mark.parametrize("tamper,trust,what", CASES, ids=[c[0].__name__[7:] for c in CASES])
def test_tampered_manifests_are_refused_by_verify_train_and_the_loader(owners, tmp_path, capsys, monkeypatch,
                                                                        tamper, trust, what):
    from etc_data.loader import make_loader
    from etc_data.trust import TrustPolicy

    monkeypatch.delenv("ETC_DATA_KEY", raising=False)
    ds = _copy(owners, tmp_path)
    tamper(ds, owners)
    trust = [str(owners[0] / t) if t.endswith(".pub") else t for t in trust]
    assert main(["verify", str(ds / "train"), *trust]) == 2
    err = capsys.readouterr().err
    assert what in err and "manifest.json" in err, err
    out = tmp_path / "run"
    assert main(["train", "--shards", str(ds / "train"), "--test-shards", str(ds / "test"), *trust, *TINY,
                 "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert what in err, err
    assert not out.exists()
    policy = TrustPolicy.from_refs([trust[1]] if trust else [])
    with pytest.raises(EtcError, match=what):
        make_loader(str(ds / "train"), 8, train=False, workers=0, trust=policy)


@pytest.mark.filterwarnings("always::etc_data.trust.UnpinnedSignerWarning")
def test_without_trust_a_resigned_split_is_accepted_with_a_warning_naming_its_key(owners, tmp_path, capsys):
    """Trust on first use: the signature is valid, so only pinning the owner (--trust) refuses it,
    and the warning names the key that signed."""
    ds = _copy(owners, tmp_path)
    tamper_resigned_by_mallory(ds, owners)
    assert main(["verify", str(ds / "train")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: trusting signer " + load_key(owners[2]).public_key), err
    assert main(["verify", str(ds / "train"), "--trust", load_key(owners[1]).public_key]) == 2
    assert main(["verify", str(ds / "train"), "--trust", load_key(owners[2]).public_key]) == 0


def test_trust_on_first_use_pins_the_first_signer_for_the_other_splits(owners, tmp_path, capsys):
    """Without --trust, a training run (or verify of a dataset root) accepts the first manifest's
    signer and refuses another one on the second split."""
    ds = _copy(owners, tmp_path)
    path = ds / "test" / "manifest.json"
    m = Manifest.from_dict(json.loads(path.read_text()), "attacker")
    m.key_fingerprint = load_key(owners[2]).fingerprint
    path.write_text(json.dumps(sign_manifest(m, load_key(owners[2]))))
    assert main(["verify", str(ds)]) == 2
    assert "unknown signer" in capsys.readouterr().err
    assert main(["train", "--shards", str(ds / "train"), "--test-shards", str(ds / "test"), *TINY, "--epochs", "1",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"test/manifest.json: unknown signer: signed by key fingerprint {m.key_fingerprint}" in err, err


def test_train_and_evaluate_run_with_no_key_anywhere(owners, tmp_path, capsys, monkeypatch):
    """The model developer holds ciphertexts and the owner's public key only."""
    root, alice, mallory = owners
    monkeypatch.delenv("ETC_DATA_KEY", raising=False)
    assert not any("ETC_DATA" in k and "KEY" in k for k in os.environ)
    out = tmp_path / "run"
    trust = ["--trust", str(root / "alice.pub")]
    assert main(["train", "--shards", str(root / "ds" / "train"), "--test-shards", str(root / "ds" / "test"), *trust,
                 *TINY, "--epochs", "1", "--max-steps", "2", "--out", str(out)]) == 0
    ck = out / "last.pt"
    assert main(["evaluate", "--checkpoint", str(ck), "--shards", str(root / "ds" / "test"), *trust, "--workers", "0",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out.strip().splitlines()[-1])
    assert res["samples"] == 32 and 0 <= res["accuracy"] <= 1
    assert "warning" not in captured.err  # pinned: no trust-on-first-use warning
    secret = json.loads(alice.read_text())["secret"]
    assert all(secret.encode() not in p.read_bytes() for p in out.iterdir())
    # an owner's own key still works and must match; another owner's evaluation shards are refused
    assert main(["evaluate", "--checkpoint", str(ck), "--shards", str(root / "ds" / "test"), "--key", str(alice),
                 "--workers", "0", "--device", "cpu"]) == 0
    other = tmp_path / "other"
    prepare_dataset(PrepareConfig(source=str(root / "c10.npz"), out=str(other), dataset="c10", key_ref=str(mallory),
                                  scheme="etc", block_size=8, codec="png", splits=["test"]))
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(ck), "--shards", str(other / "test"), "--workers", "0",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"made for key fingerprint {load_key(alice).fingerprint}" in err and load_key(mallory).fingerprint in err
    # trusting mallory too, but training with alice's key on mallory's shards: the key is refused by name
    assert main(["train", "--shards", str(other / "test"), "--key", str(alice), "--trust", load_key(mallory).public_key,
                 *TINY, "--epochs", "1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert f"key fingerprint {load_key(alice).fingerprint} does not match the shards' " \
           f"{load_key(mallory).fingerprint}; wrong key" in err
    assert not (tmp_path / "bad").exists()


class _Payload:
    """A pickle that runs a shell command when loaded (what a hostile .pt or CIFAR batch carries)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_checkpoint(path, marker):
    """A complete-looking etc-data checkpoint whose RNG state is the payload."""
    import torch

    from etc_data.checkpoint import CKPT_FORMAT

    torch.save({"format": CKPT_FORMAT, "model": {"w": torch.zeros(2)}, "model_config": {}, "key_fingerprint": None,
                "scheme": {"scheme": "plain"}, "epoch": 0, "rng": _Payload(marker)}, path)
    return path


def test_a_malicious_checkpoint_never_runs_under_evaluate_encrypt_model_or_resume(owners, tmp_path, capsys):
    import torch

    root, alice, _ = owners
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    control = tmp_path / "control"  # the payload is real: an unsafe load runs it
    torch.load(_evil_checkpoint(tmp_path / "control.pt", control), weights_only=False)
    assert control.exists()
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(evil, run / "last.pt")
    commands = [["evaluate", "--checkpoint", str(evil), "--shards", str(root / "ds" / "test"), "--workers", "0",
                 "--device", "cpu"],
                ["encrypt-model", "--key", str(alice), "--dataset", "c10", str(evil), str(tmp_path / "enc.pt")],
                ["train", "--shards", str(root / "ds" / "train"), *TINY, "--epochs", "2", "--resume",
                 "--out", str(run)]]
    for argv in commands:
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert "is not a safe etc-data checkpoint" in err and "posix.system" in err, err
        assert not marker.exists(), argv[0]
    assert not (tmp_path / "enc.pt").exists() and sorted(p.name for p in run.iterdir()) == ["last.pt"]


def test_checkpoints_hold_plain_data_only(owners, tmp_path):
    """What train writes loads with weights_only (RNG states as a tensor, lists and ints)."""
    import io

    import torch

    from etc_data.checkpoint import capture_rng, restore_rng

    aug = np.random.default_rng(5)
    state = capture_rng(aug)
    buf = io.BytesIO()
    torch.save(state, buf)
    back = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    expect = (np.random.random(3), torch.rand(2), aug.random(), random.random())
    restore_rng(back, aug)
    again = (np.random.random(3), torch.rand(2), aug.random(), random.random())
    assert np.array_equal(expect[0], again[0]) and torch.equal(expect[1], again[1]) and expect[2:] == again[2:]


def test_encrypt_model_takes_dataset_and_scheme_from_a_signed_split(owners, tmp_path, capsys):
    import torch

    from etc_data.checkpoint import CKPT_FORMAT, load_checkpoint, save_checkpoint
    from etc_data.models import create_model

    root, alice, mallory = owners
    for owner, name in ((alice, "bw"), (mallory, "other")):
        prepare_dataset(PrepareConfig(source=str(root / "c10.npz"), out=str(tmp_path / name), dataset="c10-bw",
                                      key_ref=str(owner), scheme="blockwise", block_size=2, codec="png",
                                      splits=["test"]))
    cfg = {"arch": "convmixer", "dim": 8, "depth": 1, "kernel": 3, "patch": 2, "num_classes": 10, "img_size": 32}
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "plain.pt", {
        "format": CKPT_FORMAT, "model": create_model(cfg).state_dict(), "model_config": cfg,
        "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3},
        "scheme": {"scheme": "plain", "block_size": None, "pad": "error", "options": {}}, "dataset": "c10",
        "key_fingerprint": None, "classes": [str(i) for i in range(10)], "epoch": 0})
    base = ["encrypt-model", "--key", str(alice)]
    assert main([*base, "--shards", str(tmp_path / "bw" / "test"), str(tmp_path / "plain.pt"),
                 str(tmp_path / "enc.pt")]) == 0
    ck = load_checkpoint(tmp_path / "enc.pt")
    assert ck["dataset"] == "c10-bw" and ck["key_fingerprint"] == load_key(alice).fingerprint
    assert ck["scheme"]["options"] == {"negpos": True, "scramble": False} and ck["scheme"]["block_size"] == 2
    assert main(["evaluate", "--checkpoint", str(tmp_path / "enc.pt"), "--shards", str(tmp_path / "bw" / "test"),
                 "--workers", "0", "--device", "cpu", "--trust", load_key(alice).public_key]) == 0
    capsys.readouterr()
    refusals = [(["--shards", str(tmp_path / "other" / "test")], "unknown signer"),
                (["--trust", load_key(mallory).public_key, "--dataset", "c10-bw"], "--trust pins who signed --shards"),
                (["--shards", str(tmp_path / "bw" / "test"), "--scheme", "blockwise:negpos=0"],
                 "the encrypted model would take {'scheme': 'blockwise'"),
                (["--shards", str(tmp_path / "bw" / "test"), "--dataset", "c10"], "--dataset c10 differs")]
    for args, msg in refusals:
        assert main([*base, *args, str(tmp_path / "plain.pt"), str(tmp_path / "x.pt")]) == 2
        assert msg in capsys.readouterr().err, msg
    assert not (tmp_path / "x.pt").exists()
