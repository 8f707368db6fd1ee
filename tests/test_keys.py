import json
import os
import stat
import subprocess
import sys

import pytest

from etc_data.keys import KeyFileError, derive_subkey, fingerprint, load_key, new_key_file


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
    with pytest.raises(KeyFileError, match=r"chmod 600") as e:
        load_key(key_file)
    assert str(key_file) in str(e.value)
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
    code = "from etc_data.keys import derive_subkey, fingerprint; print(derive_subkey(bytes(range(32)), 'cifar10', 'etc', 16).hex(), fingerprint(bytes(range(32))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [a.hex(), fingerprint(s)]
    assert len(fingerprint(s)) == 16


def test_key_env_var_names_the_variable_a_reference_reads(tmp_path):
    from etc_data.keys import ENV_VAR, key_env_var

    assert key_env_var(None) == key_env_var("") == key_env_var("env:") == ENV_VAR
    assert key_env_var("env:OWNER_KEY") == "OWNER_KEY"
    assert key_env_var(str(tmp_path / "owner.key")) is None and key_env_var(tmp_path / "owner.key") is None
