"""Model encryption: the encrypted model on encrypted real images (blockwise, and the JPEG-compressible
etc:common=1[,sub=8]) reproduces the plain model on plain images (fp32 logits within 1e-4), for
ConvMixer and ViT, both normalisations; the checkpoint records scheme/key; the CLI end to end with the
project's trainer and evaluate."""

import json

import numpy as np
import pytest
import torch

from etc_data.checkpoint import CKPT_FORMAT
from etc_data.cli import main
from etc_data.keys import load_key, new_key_file
from etc_data.modelcrypt import ModelCryptError, encrypt_checkpoint, encrypt_timm_model, key_space_note
from etc_data.schemes import make_scheme

HALF = ((0.5,) * 3, (0.5,) * 3)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _x(u, mean, std):
    t = torch.from_numpy(np.ascontiguousarray(u)).permute(0, 3, 1, 2).float() / 255
    return (t - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _check(model, scheme, images, norm):
    mean, std = norm
    model.eval()
    with torch.no_grad():
        plain = model(_x(images, mean, std))
        encrypt_timm_model(model, scheme, images.shape[1:3], mean, std)
        enc = model(_x(scheme.encrypt(images), mean, std))
        wrong = model(_x(images, mean, std))       # encrypted model, plain images
    assert plain.dtype == torch.float32
    diff = float((plain - enc).abs().max())
    assert diff <= 1e-4, diff
    # the encrypted model is not the plain one: plain images now give other logits
    assert float((plain - wrong).abs().max()) > 100 * max(diff, 1e-6)
    return diff


@pytest.fixture(scope="module")
def key():
    """A fixed owner key: with patch 1 a blockwise key is one of only 3! * 2**3 = 48 transforms, and a
    fresh random key drew the identity about once in 48 runs (then "wrong" equals "plain")."""
    from etc_data.keys import parse_key_text

    return parse_key_text("5e" * 16 + "a7" * 16, "test key")


@pytest.mark.parametrize("norm", [HALF, IMAGENET], ids=["half", "imagenet"])
@pytest.mark.parametrize("patch", [1, 2, 4, 7])
def test_convmixer_exact(cifar_exact, key, patch, norm):
    from timm.models.convmixer import ConvMixer

    torch.manual_seed(patch)
    size = 28 if patch == 7 else 32
    images = cifar_exact["x_test"][:16, :size, :size]
    m = ConvMixer(dim=48, depth=2, kernel_size=5, patch_size=patch, num_classes=10)
    _check(m, make_scheme("blockwise", key=key, dataset="c10", block_size=patch), images, norm)


@pytest.mark.parametrize("norm", [HALF, IMAGENET], ids=["half", "imagenet"])
@pytest.mark.parametrize("scramble", [0, 1])
def test_small_vit_exact(cifar_exact, key, norm, scramble):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    v = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    pe_before = v.pos_embed.detach().clone()
    s = make_scheme(f"blockwise:scramble={scramble}", key=key, dataset="c10", block_size=4)
    _check(v, s, cifar_exact["x_test"][:16], norm)
    assert torch.equal(v.pos_embed[:, 0], pe_before[:, 0])       # class token unchanged
    moved = not torch.equal(v.pos_embed, pe_before)
    assert moved == bool(scramble)
    if scramble:
        perm = torch.as_tensor(s.keys_for(32, 32).perm)
        assert torch.equal(v.pos_embed[0, 1:], pe_before[0, 1:][perm])


@pytest.mark.parametrize("spec", ["blockwise:scramble=1", "etc:common=1", "etc:common=1,sub=8"])
def test_vit_patch16_224_exact(imagenette_batch, key, spec):
    """ViT with patch 16 at 224 px (ImageNet normalisation) on real Imagenette images; etc:common=1 is the
    compressible case: the same rotation/flip, negative-positive and colour order in every 16x16 block
    (or in every 8x8 sub-block position), blocks scrambled through the position embeddings."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(2)
    v = VisionTransformer(img_size=224, patch_size=16, embed_dim=96, depth=2, num_heads=3, num_classes=10)
    s = make_scheme(spec, key=key, dataset="inet", block_size=16)
    pe_before = v.pos_embed.detach().clone()
    _check(v, s, np.asarray(imagenette_batch)[:8], IMAGENET)
    assert torch.equal(v.pos_embed[0, 1:], pe_before[0, 1:][torch.as_tensor(s.patch_keys(224, 224).perm)])


@pytest.mark.parametrize("norm", [HALF, IMAGENET], ids=["half", "imagenet"])
@pytest.mark.parametrize("spec,patch", [("etc:common=1,scramble=0", 8), ("etc:common=1,scramble=0,sub=4", 8),
                                        ("etc:common=1,scramble=0", 16)])
def test_convmixer_exact_etc_common(cifar_exact, key, spec, patch, norm):
    """ConvMixer absorbs etc:common=1 without scrambling (patch 8 or 16: JPEG-aligned blocks)."""
    from timm.models.convmixer import ConvMixer

    torch.manual_seed(patch)
    m = ConvMixer(dim=48, depth=2, kernel_size=3, patch_size=patch, num_classes=10)
    _check(m, make_scheme(spec, key=key, dataset="c10", block_size=patch), cifar_exact["x_test"][:16], norm)


def test_refusals(key):
    from timm.models.convmixer import ConvMixer

    m = ConvMixer(dim=16, depth=1, kernel_size=3, patch_size=4, num_classes=10)
    with pytest.raises(ModelCryptError, match="scrambling"):
        encrypt_timm_model(m, make_scheme("blockwise:scramble=1", key=key, dataset="d", block_size=4), 32)
    with pytest.raises(ModelCryptError, match="block size 2 must equal the model's patch size 4"):
        encrypt_timm_model(m, make_scheme("blockwise", key=key, dataset="d", block_size=2), 32)
    with pytest.raises(ModelCryptError, match="not etc: it uses a different key per block"):
        encrypt_timm_model(m, make_scheme("etc", key=key, dataset="d", block_size=4), 32)
    with pytest.raises(ModelCryptError, match="not le"):
        encrypt_timm_model(m, make_scheme("le", key=key, dataset="d", block_size=4), 32)
    with pytest.raises(ModelCryptError, match="use etc with scramble=0 for ConvMixer"):
        encrypt_timm_model(m, make_scheme("etc:common=1", key=key, dataset="d", block_size=4), 32)
    with pytest.raises(ModelCryptError, match="30x30 is not a multiple of the patch size 4"):
        encrypt_timm_model(m, make_scheme("blockwise", key=key, dataset="d", block_size=4), 30)


def test_key_space_note(key):
    n1 = key_space_note(make_scheme("blockwise", key=key, dataset="d", block_size=1), 32, 32)
    assert "(3)!" in n1 and "essentially no protection" in n1
    n4 = key_space_note(make_scheme("blockwise", key=key, dataset="d", block_size=4), 32, 32)
    assert "(48)!" in n4 and "WARNING" not in n4
    # etc:common=1: 96 per-block transforms; the ViT-B/16 headline case at 224 px: 196! block orders x 96
    vit = key_space_note(make_scheme("etc:common=1", key=key, dataset="d", block_size=16), 224, 224)
    assert "96 block transforms" in vit and "(196)! block orders = 2^1214.8" in vit and "total 2^1221.4" in vit
    assert "WARNING" not in vit
    weak = key_space_note(make_scheme("etc:common=1,scramble=0", key=key, dataset="d", block_size=16), 224, 224)
    assert "WARNING: below 128 bits (only 96 keys" in weak
    two = key_space_note(make_scheme("etc:common=1,sub=8,scramble=0", key=key, dataset="d", block_size=16), 224, 224)
    assert "(4)! orders of the 8x8 sub blocks" in two and "96^4" in two and "total 2^30.9" in two and "WARNING" in two


def _plain_ckpt(config, norm=HALF):
    from etc_data.models import create_model

    torch.manual_seed(0)
    m = create_model(config)
    return {"format": CKPT_FORMAT, "model": m.state_dict(), "model_config": config,
            "normalize": {"mean": list(norm[0]), "std": list(norm[1])},
            "scheme": {"scheme": "plain", "block_size": None, "pad": "error", "options": {}},
            "dataset": "c10", "key_fingerprint": None, "classes": [str(i) for i in range(10)], "epoch": 0,
            "optimizer": {"state": {}}, "scheduler": None, "rng": None, "metrics": {}}


def test_checkpoint_records_scheme_and_key(tmp_path, key, cifar_exact):
    from etc_data.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint

    cfg = {"arch": "vit", "variant": "custom", "dim": 32, "depth": 1, "heads": 2, "patch": 4, "img_size": 32,
           "num_classes": 10}
    ck = _plain_ckpt(cfg, IMAGENET)
    out, note = encrypt_checkpoint(ck, key, "c10", "blockwise:scramble=1")
    assert out["scheme"] == {"scheme": "blockwise", "block_size": 4, "pad": "error",
                             "options": {"negpos": True, "scramble": True}}
    assert out["key_fingerprint"] == key.fingerprint and out["dataset"] == "c10" and out["optimizer"] is None
    assert "(48)!" in note and "(64)!" in note
    save_checkpoint(tmp_path / "enc.pt", out)
    other = tmp_path / "other.key"
    new_key_file(other, "bob")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "enc.pt", key=load_key(str(other)))
    back = load_checkpoint(tmp_path / "enc.pt", key=key)
    x = cifar_exact["x_test"][:8]
    s = make_scheme("blockwise:scramble=1", key=key, dataset="c10", block_size=4)
    with torch.no_grad():
        a = model_from_checkpoint(ck).eval()(_x(x, *IMAGENET))
        b = model_from_checkpoint(back).eval()(_x(s.encrypt(x), *IMAGENET))
    assert float((a - b).abs().max()) <= 1e-4
    with pytest.raises(ModelCryptError, match="already for scheme blockwise"):
        encrypt_checkpoint(out, key, "c10")
    with pytest.raises(ModelCryptError, match="convmixer cannot absorb"):
        encrypt_checkpoint(_plain_ckpt({"arch": "convmixer", "dim": 8, "depth": 1, "kernel": 3, "patch": 2,
                                   "num_classes": 10, "img_size": 32}), key, "c10", "blockwise:scramble=1")


def test_end_to_end_trainer_encrypt_model_evaluate(tmp_path, cifar_exact):
    """Train a tiny ConvMixer (patch 2) on plain real CIFAR shards, encrypt it with the CLI for blockwise and
    for etc:common=1,scramble=0, evaluate on shards prepared with each."""
    from etc_data.prepare import PrepareConfig, prepare_dataset
    from etc_data.checkpoint import load_checkpoint, model_from_checkpoint
    from etc_data.evaluate import evaluate_model
    from etc_data.loader import make_loader
    from etc_data.train import TrainConfig, train_model

    npz = tmp_path / "c10.npz"
    np.savez(npz, x_train=cifar_exact["x_train"][:1000], y_train=cifar_exact["y_train"][:1000],
             x_test=cifar_exact["x_test"][:300], y_test=cifar_exact["y_test"][:300])
    ka, kb = tmp_path / "a.key", tmp_path / "b.key"
    new_key_file(ka, "alice")
    new_key_file(kb, "bob")
    common = "etc:common=1,scramble=0"
    for name, scheme, k, splits in [("plain", "plain", ka, None), ("enc", "blockwise", ka, ["test"]),
                                    ("other", "blockwise", kb, ["test"]), ("common", common, ka, ["test"]),
                                    ("etc", "etc", ka, ["test"])]:
        prepare_dataset(PrepareConfig(source=str(npz), out=str(tmp_path / name), dataset="c10", scheme=scheme, block_size=2,
                         key_ref=str(k), codec="png", shard_size=400, splits=splits))
    cfg = TrainConfig(shards=str(tmp_path / "plain" / "train"), test_shards=None, out=str(tmp_path / "run"),
                      key_ref=None, model={"arch": "convmixer", "dim": 32, "depth": 2, "kernel": 5, "patch": 2},
                      epochs=5, batch_size=64, lr=0.01, workers=0, device="cpu", mixup=0.0, cutmix=0.0)
    train_model(cfg, progress=False)
    plain_ck = tmp_path / "run" / "last.pt"
    enc_ck = tmp_path / "enc.pt"
    rc = main(["encrypt-model", "--key", str(ka), "--dataset", "c10", str(plain_ck), str(enc_ck)])
    assert rc == 0
    common_ck = tmp_path / "common.pt"
    assert main(["encrypt-model", "--key", str(ka), "--dataset", "c10", "--scheme", common, str(plain_ck),
                 str(common_ck)]) == 0

    def ev(ck, name, key=None):
        rc = main(["evaluate", "--checkpoint", str(ck), "--shards", str(tmp_path / name / "test"), "--device", "cpu",
                        "--workers", "0"] + (["--key", str(key)] if key else []))
        assert rc == 0
        return rc

    import contextlib
    import io

    def ev_json(*a, **k):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ev(*a, **k)
        return json.loads(buf.getvalue().strip().splitlines()[-1])

    plain = ev_json(plain_ck, "plain")
    enc = ev_json(enc_ck, "enc", ka)
    assert ev_json(common_ck, "common", ka) == plain
    # a checkpoint for etc:common=1 does not fit EtC shards with a key per block (same key, same block size)
    assert main(["evaluate", "--checkpoint", str(common_ck), "--shards", str(tmp_path / "etc" / "test"),
                 "--key", str(ka), "--device", "cpu", "--workers", "0"]) == 2
    # evaluate refuses the encrypted model with another key's shards
    assert main(["evaluate", "--checkpoint", str(enc_ck), "--shards", str(tmp_path / "other" / "test"),
                 "--key", str(kb), "--device", "cpu", "--workers", "0"]) == 2
    # the encrypted model forced onto plain images / images under another key (bypassing the checks)
    model = model_from_checkpoint(load_checkpoint(enc_ck)).eval()
    dev = torch.device("cpu")
    on_plain = evaluate_model(model, make_loader(str(tmp_path / "plain" / "test"), 256, train=False, workers=0)[0], dev)
    on_other = evaluate_model(model, make_loader(str(tmp_path / "other" / "test"), 256, train=False, workers=0)[0], dev)
    print(f"\nplain model/plain images {plain}, encrypted model/encrypted images {enc}, "
          f"encrypted model/plain images {on_plain}, encrypted model/other key {on_other}")
    assert plain["samples"] == enc["samples"] == 300
    assert enc["accuracy"] == plain["accuracy"] > 0.25
    assert on_plain["accuracy"] < plain["accuracy"] - 0.08
    assert on_other["accuracy"] < plain["accuracy"] - 0.08


def test_cli_prints_key_space_and_refuses_bad_inputs(tmp_path, capsys):
    from etc_data.checkpoint import load_checkpoint, save_checkpoint

    kp = tmp_path / "owner.key"
    new_key_file(kp, "alice")
    cfg = {"arch": "convmixer", "dim": 8, "depth": 1, "kernel": 3, "patch": 1, "num_classes": 10, "img_size": 32}
    save_checkpoint(tmp_path / "plain.pt", _plain_ckpt(cfg))
    assert main(["encrypt-model", "--key", str(kp), "--dataset", "c10", str(tmp_path / "plain.pt"),
                 str(tmp_path / "enc.pt")]) == 0
    out = capsys.readouterr()
    assert "essentially no protection" in out.out and "block 1" in out.out
    secret = json.loads(kp.read_text())["secret"]
    assert secret not in out.out + out.err
    assert load_checkpoint(tmp_path / "enc.pt")["key_fingerprint"] == load_key(str(kp)).fingerprint
    # existing output, already-encrypted input, wrong scheme, scrambling on ConvMixer: exit 2 naming the item
    cases = [([str(tmp_path / "plain.pt"), str(tmp_path / "enc.pt")], "enc.pt exists"),
             ([str(tmp_path / "enc.pt"), str(tmp_path / "x.pt")], "already for scheme blockwise"),
             (["--scheme", "pe", str(tmp_path / "plain.pt"), str(tmp_path / "y.pt")], "must be blockwise"),
             (["--scheme", "etc", str(tmp_path / "plain.pt"), str(tmp_path / "y.pt")], "different key per block"),
             (["--scheme", "blockwise:scramble=1", str(tmp_path / "plain.pt"), str(tmp_path / "z.pt")],
              "plain.pt: convmixer cannot absorb block scrambling")]
    for args, msg in cases:
        assert main(["encrypt-model", "--key", str(kp), "--dataset", "c10", *args]) == 2
        err = capsys.readouterr().err
        assert msg in err and secret not in err, err
    assert not any((tmp_path / n).exists() for n in ("x.pt", "y.pt", "z.pt"))
