"""One model from two owners' encrypted CIFAR shards (different keys, disjoint images), trained with
no key anywhere: a stem per owner, one shared body, one ordinary checkpoint per owner that evaluates
on its owner's shards only; a new owner joins later by training its stem alone (--freeze-body)."""

import json
import os

import numpy as np
import pytest
import torch

from etc_data.checkpoint import load_checkpoint
from etc_data.cli import main
from etc_data.keys import load_key, new_key_file
from etc_data.prepare import PrepareConfig, prepare_dataset
from etc_data.stems import OwnerStems, is_stem

TINY = ["--model", "convmixer", "--dim", "16", "--depth", "1", "--kernel", "3", "--patch", "2", "--batch-size", "32",
        "--workers", "0", "--device", "cpu", "--mixup", "0", "--cutmix", "0"]


@pytest.fixture(scope="module")
def owners(tmp_path_factory, cifar_exact):
    """alice and bob each encrypt their own disjoint CIFAR images (96 / 64 train, 32 test each) under
    their own key with EtC block 8; carol holds 64 more; ``other`` is a dataset with other class names."""
    root = tmp_path_factory.mktemp("owners")
    x, y, xt, yt = (cifar_exact[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    parts = {"alice": (slice(0, 96), slice(0, 32)), "bob": (slice(96, 160), slice(32, 64)),
             "carol": (slice(160, 224), slice(64, 96))}
    for name, (tr, te) in parts.items():
        npz = root / f"cifar10-{name}.npz"
        np.savez(npz, x_train=x[tr], y_train=y[tr], x_test=xt[te], y_test=yt[te])
        new_key_file(root / f"{name}.key", name)
        (root / f"{name}.pub").write_text(load_key(root / f"{name}.key").public_key + "\n")
        prepare_dataset(PrepareConfig(source=str(npz), out=str(root / name), dataset="c10", scheme="etc", block_size=8,
                                      key_ref=str(root / f"{name}.key"), codec="png", shard_size=32))
    np.savez(root / "digits.npz", x_train=x[:64], y_train=y[:64])  # classes "0".."9", not CIFAR's names
    prepare_dataset(PrepareConfig(source=str(root / "digits.npz"), out=str(root / "other"), dataset="c10",
                                  scheme="etc", block_size=8, key_ref=str(root / "carol.key"), codec="png"))
    return root


def _joint_args(root, *extra):
    return ["train", "--shards", str(root / "alice" / "train"), "--shards", str(root / "bob" / "train"),
            "--test-shards", str(root / "alice" / "test"), "--test-shards", str(root / "bob" / "test"),
            "--trust", str(root / "alice.pub"), "--trust", str(root / "bob.pub"), *TINY, *extra]


@pytest.fixture(scope="module")
def joint_run(owners, tmp_path_factory):
    """A joint run with no key anywhere: ETC_DATA_KEY unset and no --key (the model developer's view)."""
    out = tmp_path_factory.mktemp("joint") / "run"
    saved = os.environ.pop("ETC_DATA_KEY", None)
    try:
        secrets = [json.loads((owners / f"{n}.key").read_text())["secret"] for n in ("alice", "bob")]
        assert not any(s in v for s in secrets for v in os.environ.values())
        assert main(_joint_args(owners, "--epochs", "2", "--max-steps", "2", "--out", str(out))) == 0
    finally:
        if saved is not None:
            os.environ["ETC_DATA_KEY"] = saved
    return out


def test_both_stems_get_gradients_and_the_body_is_shared(owners, cifar_exact):
    """A mixed batch: each owner's images go through that owner's stem only, the body gets both."""
    from etc_data.models import create_model

    cfg = {"arch": "convmixer", "dim": 16, "depth": 1, "kernel": 3, "patch": 2, "num_classes": 10}
    model = OwnerStems(create_model(cfg), "convmixer", [0, 1])
    xa = torch.from_numpy(cifar_exact["x_train"][:6]).permute(0, 3, 1, 2).float() / 127.5 - 1
    xb = torch.from_numpy(cifar_exact["x_train"][6:10]).permute(0, 3, 1, 2).float() / 127.5 - 1
    model([xa, xb]).logsumexp(1).sum().backward()
    for k in (0, 1):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.stems[k].parameters())
    assert all(p.grad is not None for p in model.body.parameters())
    assert not any(is_stem(n, "convmixer") for n, _ in model.body.named_parameters())
    # owner 1's stem never sees owner 0's batch: its gradient comes from xb alone
    model.zero_grad()
    model(xa, owner=0).sum().backward()
    assert all(p.grad is None for p in model.stems[1].parameters())


def test_each_owner_checkpoint_evaluates_on_its_own_shards_and_is_refused_on_the_others(owners, joint_run, capsys):
    out = joint_run
    ck = [load_checkpoint(out / f"owner-{k}" / "best.pt") for k in (0, 1)]
    for k, name in enumerate(("alice", "bob")):
        assert ck[k]["key_fingerprint"] == load_key(owners / f"{name}.key").fingerprint
        assert "owner_stems" not in ck[k]["model_config"] and ck[k]["optimizer"] is None
    stems = [n for n in ck[0]["model"] if is_stem(n, "convmixer")]
    assert stems and all(not torch.equal(ck[0]["model"][n], ck[1]["model"][n]) for n in stems if "weight" in n)
    last = [load_checkpoint(out / f"owner-{k}" / "last.pt") for k in (0, 1)]
    body = [n for n in last[0]["model"] if not is_stem(n, "convmixer")]
    assert body and all(torch.equal(last[0]["model"][n], last[1]["model"][n]) for n in body)
    capsys.readouterr()
    for k, (mine, theirs) in enumerate((("alice", "bob"), ("bob", "alice"))):
        ckpt = str(out / f"owner-{k}" / "best.pt")
        common = ["--workers", "0", "--device", "cpu", "--trust", str(owners / "alice.pub"), "--trust",
                  str(owners / "bob.pub")]
        assert main(["evaluate", "--checkpoint", ckpt, "--shards", str(owners / mine / "test"), *common]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["samples"] == 32 and 0 <= res["accuracy"] <= 1
        assert main(["evaluate", "--checkpoint", ckpt, "--shards", str(owners / theirs / "test"), *common]) == 2
        err = capsys.readouterr().err
        assert f"made for key fingerprint {load_key(owners / f'{mine}.key').fingerprint}" in err, err
    # the joint state is for --resume only
    assert main(["evaluate", "--checkpoint", str(out / "last.pt"), "--shards", str(owners / "alice" / "test"),
                 "--workers", "0", "--device", "cpu"]) == 2
    assert "joint training state of 2 owners" in capsys.readouterr().err


def test_metrics_and_curves_are_per_owner_and_no_secret_is_written(owners, joint_run):
    rows = [json.loads(line) for line in (joint_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert [o["owner"] for o in r["owners"]] == [0, 1]
        assert [o["test_samples"] for o in r["owners"]] == [32, 32] and r["test_samples"] == 64
        accs = [o["test_acc"] for o in r["owners"]]
        assert r["test_acc"] == pytest.approx(sum(accs) / 2)
        assert all(o["train_loss"] > 0 for o in r["owners"])
    assert (joint_run / "curves.png").stat().st_size > 1000
    joint = load_checkpoint(joint_run / "last.pt", joint=True)
    assert [o["key_fingerprint"] for o in joint["owners"]] == [load_key(owners / f"{n}.key").fingerprint
                                                                for n in ("alice", "bob")]
    secrets = [json.loads((owners / f"{n}.key").read_text())["secret"].encode() for n in ("alice", "bob")]
    files = [p for p in joint_run.rglob("*") if p.is_file()]
    assert len(files) == 7 and all(s not in p.read_bytes() for s in secrets for p in files)


def test_batches_hold_each_owner_in_proportion_to_its_size(owners):
    from etc_data.train import TrainConfig, batch_shares, read_splits

    cfg = TrainConfig(shards=[str(owners / "alice" / "train"), str(owners / "bob" / "train")], out="unused",
                      trust=[str(owners / "alice.pub"), str(owners / "bob.pub")], batch_size=32)
    splits = read_splits(cfg)
    assert batch_shares(cfg, splits, 1, 1) == [19, 13]   # 96 : 64 of 32 is 19.2 : 12.8
    assert batch_shares(cfg, splits, 1, 2) == [20, 12]   # in pairs (timm's Mixup needs even batches)
    cfg.owner_weights = [1, 3]
    assert batch_shares(cfg, splits, 1, 1) == [8, 24]


def test_owners_with_other_class_names_are_refused_naming_the_classes(owners, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--shards", str(owners / "alice" / "train"), "--shards", str(owners / "other" / "train"), *TINY,
            "--epochs", "1", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "0: '0' vs 'airplane'" in err and "same class names" in err, err
    assert not out.exists()


def test_a_split_signed_by_an_untrusted_owner_is_refused(owners, tmp_path, capsys):
    argv = ["train", "--shards", str(owners / "alice" / "train"), "--shards", str(owners / "carol" / "train"),
            "--trust", str(owners / "alice.pub"), *TINY, "--epochs", "1", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert f"unknown signer: signed by key fingerprint {load_key(owners / 'carol.key').fingerprint}" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_new_owner_trains_only_its_stem_with_freeze_body(owners, joint_run, tmp_path, capsys):
    init = joint_run / "owner-0" / "best.pt"
    out = tmp_path / "carol"
    assert main(["train", "--init", str(init), "--shards", str(owners / "carol" / "train"), "--test-shards",
                 str(owners / "carol" / "test"), "--trust", str(owners / "carol.pub"), "--freeze-body", *TINY,
                 "--epochs", "1", "--max-steps", "2", "--out", str(out)]) == 0
    before, after = load_checkpoint(init)["model"], load_checkpoint(out / "last.pt")
    assert after["key_fingerprint"] == load_key(owners / "carol.key").fingerprint
    assert after["train_config"]["init"] == str(init)
    body = [n for n in before if not is_stem(n, "convmixer")]
    assert body and all(torch.equal(before[n], after["model"][n]) for n in body)  # BatchNorm statistics too
    assert any(not torch.equal(before[n], after["model"][n]) for n in before if is_stem(n, "convmixer"))
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "last.pt"), "--shards", str(owners / "carol" / "test"),
                 "--trust", str(owners / "carol.pub"), "--workers", "0", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 32
    # a body for other class names is refused, naming them
    assert main(["train", "--init", str(init), "--shards", str(owners / "other" / "train"), "--freeze-body", *TINY,
                 "--epochs", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "'0' vs 'airplane'" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_joint_run_resumes_where_it_stopped(owners, tmp_path):
    from etc_data.train import TrainConfig, train_model

    def cfg(out, **kw):
        return TrainConfig(shards=[str(owners / n / "train") for n in ("alice", "bob")],
                           test_shards=[str(owners / n / "test") for n in ("alice", "bob")], out=str(out),
                           trust=[str(owners / "alice.pub"), str(owners / "bob.pub")],
                           model={"arch": "convmixer", "dim": 16, "depth": 1, "kernel": 3, "patch": 2}, epochs=2,
                           batch_size=32, workers=0, device="cpu", max_steps=2, **kw)

    full = train_model(cfg(tmp_path / "full"), progress=False)
    train_model(cfg(tmp_path / "cut", stop_after=1), progress=False)
    resumed = train_model(cfg(tmp_path / "cut", resume=True), progress=False)
    assert [m["epoch"] for m in resumed] == [0, 1]
    for a, b in zip(resumed[1]["owners"], full[1]["owners"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


@pytest.mark.parametrize("cfg", [{"arch": "convmixer", "dim": 16, "depth": 1, "kernel": 3, "patch": 2},
                                 {"arch": "vit", "variant": "custom", "dim": 32, "depth": 1, "heads": 2, "patch": 8}],
                         ids=["convmixer", "vit"])
def test_an_exported_owner_model_is_the_plain_timm_model_of_that_owner(cfg, cifar_exact):
    """owner_state_dict(k) loads into an ordinary timm model that computes what owner k's view does."""
    from etc_data.models import create_model
    from etc_data.stems import OwnerView

    cfg = dict(cfg, num_classes=10, img_size=32)
    torch.manual_seed(0)
    joint = OwnerStems(create_model(cfg), cfg["arch"], [0, 1]).eval()
    with torch.no_grad():
        for p in joint.stems[1].parameters():
            p.add_(torch.randn_like(p))  # the two owners' stems differ
    x = torch.from_numpy(cifar_exact["x_test"][:4]).permute(0, 3, 1, 2).float() / 127.5 - 1
    outs = []
    for k in (0, 1):
        plain = create_model(cfg).eval()
        plain.load_state_dict(joint.owner_state_dict(k))  # strict: exactly the timm model's entries
        with torch.no_grad():
            assert torch.allclose(plain(x), OwnerView(joint, k)(x), atol=1e-5)
            outs.append(plain(x))
    assert not torch.allclose(outs[0], outs[1])
    with torch.no_grad():  # a mixed batch gives each owner's rows what that owner's model gives
        assert torch.allclose(joint([x[:2], x[2:]]), torch.cat([outs[0][:2], outs[1][2:]]), atol=1e-5)


@pytest.mark.parametrize("extra,what", [
    (["--key", "alice.key"], "several owners' shards take --trust only"),
    (["--test-shards", "alice/test"], "test-shards: give one per --shards (2), got 1"),
    (["--shards", "alice/train"], "a train split is given twice"),
    (["--owner-weight", "1"], "owner weights must be 2 positive numbers"),
], ids=["key", "test-count", "twice", "weights"])
def test_bad_multi_owner_arguments_are_refused_naming_the_item(owners, tmp_path, capsys, extra, what):
    extra = [str(owners / e) if "/" in e or e.endswith(".key") else e for e in extra]
    argv = ["train", "--shards", str(owners / "alice" / "train"), "--shards", str(owners / "bob" / "train"), *extra,
            *TINY, "--epochs", "1", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert what in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
