import json
import os
import stat
import subprocess
import sys

import pytest

from etc_data.keys import (KeyFileError, OwnerKey, derive_subkey, fingerprint, load_key, load_public_key,
                           new_key_file, verify_signature)


def test_new_key_file_is_0600_and_never_overwritten(tmp_path):
    p = tmp_path / "k" / "alice.key"
    k = new_key_file(p, "alice")
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    doc = json.loads(p.read_text())
    assert doc["owner"] == "alice" and len(bytes.fromhex(doc["secret"])) == 32
    assert doc["fingerprint"] == k.fingerprint
    before = p.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        new_key_file(p, "bob")
    assert p.read_bytes() == before


def test_group_or_world_readable_key_is_refused(key_file):
    os.chmod(key_file, 0o644)
    with pytest.raises(KeyFileError, match=r"the key given with --key .*chmod 600") as e:
        load_key(key_file)
    assert str(key_file) not in str(e.value)  # a key reference is never echoed
    os.chmod(key_file, 0o640)
    with pytest.raises(KeyFileError):
        load_key(key_file)
    os.chmod(key_file, 0o600)
    assert load_key(key_file).owner == "alice"


def test_key_never_in_repr_errors_or_pickle(key_file):
    import pickle

    k = load_key(key_file)
    secret_hex = json.loads(key_file.read_text())["secret"]
    assert secret_hex not in repr(k) and secret_hex not in str(k)
    with pytest.raises(TypeError):
        pickle.dumps(k)
    bad = key_file.with_name("bad.key")
    bad.write_text('{"format": "etc-data-key/1", "secret": "zz' + secret_hex[2:] + '"}')
    os.chmod(bad, 0o600)
    with pytest.raises(KeyFileError) as e:
        load_key(bad)
    assert secret_hex[2:] not in str(e.value)


def test_env_key_and_missing_env(monkeypatch, key_file):
    k = load_key(key_file)
    monkeypatch.setenv("MY_KEY", json.loads(key_file.read_text())["secret"])
    assert load_key("env:MY_KEY").fingerprint == k.fingerprint
    monkeypatch.setenv("ETC_DATA_KEY", key_file.read_text())
    assert load_key(None).fingerprint == k.fingerprint
    monkeypatch.delenv("NOPE_KEY", raising=False)
    with pytest.raises(KeyFileError, match="NOPE_KEY"):
        load_key("env:NOPE_KEY")


def test_subkeys_depend_on_dataset_scheme_block_and_are_stable_across_processes():
    s = bytes(range(32))
    a = derive_subkey(s, "cifar10", "etc", 16)
    assert a != derive_subkey(s, "cifar10", "etc", 8)
    assert a != derive_subkey(s, "cifar100", "etc", 16)
    assert a != derive_subkey(s, "cifar10", "blockwise", 16)
    code = ("from etc_data.keys import OwnerKey, derive_subkey; k = OwnerKey('x', bytes(range(32))); "
            "print(derive_subkey(bytes(range(32)), 'cifar10', 'etc', 16).hex(), k.public_key, k.fingerprint)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    k = OwnerKey("x", s)
    assert out == [a.hex(), k.public_key, k.fingerprint]
    assert len(k.fingerprint) == 32


def test_key_env_var_names_the_variable_a_reference_reads(tmp_path):
    from etc_data.keys import ENV_VAR, key_env_var

    assert key_env_var(None) == key_env_var("") == key_env_var("env:") == ENV_VAR
    assert key_env_var("env:OWNER_KEY") == "OWNER_KEY"
    assert key_env_var(str(tmp_path / "owner.key")) is None and key_env_var(tmp_path / "owner.key") is None


def test_public_key_signs_and_its_hash_is_the_fingerprint(key_file, tmp_path):
    """The owner's identity: an Ed25519 key derived from the secret (its own HKDF label); the
    fingerprint is a SHA-256 of the public key, recomputed here from the public key alone."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    k = load_key(key_file)
    doc = json.loads(key_file.read_text())
    assert doc["public_key"] == k.public_key and k.public_key.startswith("ed25519:") and len(k.public_key) == 72
    raw = bytes.fromhex(k.public_key[8:])
    assert hashlib.sha256(b"etc-data public key fingerprint v2\0" + raw).hexdigest()[:32] == k.fingerprint
    assert fingerprint(k.public_key) == k.fingerprint
    # the signing seed is not a subkey nor the secret, and another secret gives another identity
    assert k.public_key != OwnerKey("x", bytes(32)).public_key
    sig = k.sign(b"manifest bytes")
    Ed25519PublicKey.from_public_bytes(raw).verify(bytes.fromhex(sig), b"manifest bytes")  # plain Ed25519
    assert verify_signature(k.public_key, b"manifest bytes", sig)
    assert not verify_signature(k.public_key, b"manifest bytez", sig)
    assert not verify_signature(OwnerKey("x", bytes(32)).public_key, b"manifest bytes", sig)
    assert doc["secret"] not in k.public_key + sig + k.fingerprint


def test_public_keys_load_from_text_or_file_never_from_a_secret_key_file(key_file, tmp_path):
    k = load_key(key_file)
    pub = tmp_path / "alice.pub"
    pub.write_text(k.public_key + "\n")
    assert load_public_key(str(pub)) == load_public_key(k.public_key) == k.public_key
    assert load_public_key(k.public_key.upper().replace("ED25519:", "ed25519:")) == k.public_key
    with pytest.raises(KeyFileError, match="is a secret key file, not a public key") as e:
        load_public_key(str(key_file))
    assert json.loads(key_file.read_text())["secret"] not in str(e.value)
    for bad in ("ed25519:abcd", "ed25519:" + "zz" * 32, str(tmp_path / "missing.pub")):
        with pytest.raises(KeyFileError, match="public key"):
            load_public_key(bad)


def test_key_material_passed_as_a_reference_is_refused_without_quoting_it(key_file):
    """A secret pasted where a key file path goes (``--key 5e3a...``) must not end up in an error,
    a log or Prefect's database: it is refused before it is used, and never quoted."""
    from etc_data.keys import check_key_ref

    doc = json.loads(key_file.read_text())
    for ref in (doc["secret"], doc["secret"].upper(), key_file.read_text(), f" {doc['secret']}\n"):
        with pytest.raises(KeyFileError, match="looks like key material") as e:
            load_key(ref)
        assert doc["secret"] not in str(e.value).lower()
        with pytest.raises(KeyFileError):
            check_key_ref(ref)
    for ok in (str(key_file), "env:OWNER_KEY", None, "prefect-secret:owner", "keys/0123abcd0123abcd.key"):
        check_key_ref(ok)


def test_missing_or_corrupt_key_files_say_what_they_are_without_naming_the_reference(tmp_path, key_file):
    secret = json.loads(key_file.read_text())["secret"]
    with pytest.raises(KeyFileError, match="the key given with --key does not exist") as e:
        load_key(tmp_path / "nope.key")
    assert "nope.key" not in str(e.value)
    for text in ("not a key at all", '{"format": "etc-data-key/1", "secret": "zz"}', secret[:40], "{"):
        bad = tmp_path / "bad.key"
        bad.write_text(text)
        os.chmod(bad, 0o600)
        with pytest.raises(KeyFileError, match="the key given with --key is not a valid key file") as e:
            load_key(bad)
        assert "hex" not in str(e.value).split("(")[0] and "bad.key" not in str(e.value)
