"""Owner keys: creation, loading, the owner's public identity, fingerprints and per-dataset subkeys.

An owner key is a 256-bit random secret kept in a small JSON key file created with mode 0600.
Everything that encrypts works from a *subkey* derived with HKDF-SHA256 from the owner secret,
the dataset id, the scheme name and the block size, so one owner secret serves many datasets
and a leaked subkey does not reveal the others. The secret itself never leaves this module:
``OwnerKey`` has no attribute that prints it, and errors never quote it.

The owner's identity is an Ed25519 signing key derived from the same secret with HKDF under its
own label. Its public key (``ed25519:<64 hex>``, one line: ``etc-data keys public``) is what the
owner hands to the cloud and to model developers; manifests are signed with the private half
(``OwnerKey.sign``). The *fingerprint* that manifests and checkpoints carry is a SHA-256 of the
public key: anyone holding the public key can check it, and nothing secret can be derived from it.

A *key reference* (a path or ``env:NAME``) is what travels: in configs, flow parameters and logs.
Errors never echo it either (a user may have passed the secret itself where the reference goes):
they say "the key given with --key". ``check_key_ref`` refuses a reference that looks like key
material (hex, a key file's JSON) before anything stores or logs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import EtcError

KEY_FORMAT = "etc-data-key/1"
SECRET_BYTES = 32
ENV_VAR = "ETC_DATA_KEY"
_FINGERPRINT_LABEL = b"etc-data public key fingerprint v2\0"
_SIGNING_INFO = b"etc-data/owner-signing-key/v1"
_HKDF_SALT = b"etc-data/hkdf-salt/v1"
PUBLIC_KEY_PREFIX = "ed25519:"
FINGERPRINT_HEX = 32  # 128 bits of SHA-256: a second key with the same fingerprint cannot be searched for
KEY_GIVEN = "the key given with --key"  # how errors name a key file reference (never by its text)
_LOOKS_SECRET = re.compile(r"\s*(0x)?[0-9a-fA-F]{32,}\s*\Z|\s*\{|.*\n|.*\"secret\"", re.DOTALL)


class KeyFileError(EtcError):
    """A key could not be created or loaded (the message names the variable, or "the key given with --key")."""


def check_key_ref(ref) -> None:
    """Refuse key material passed where a key reference (a path, env:NAME) is expected, without
    quoting it."""
    if ref is not None and _LOOKS_SECRET.match(str(ref)):
        raise KeyFileError(f"{KEY_GIVEN} looks like key material, not a reference to it: pass the path of a key "
                           f"file (etc-data keys new) or env:NAME; the value was not used, stored or logged")


@dataclass(frozen=True)
class OwnerKey:
    """An owner's secret. ``repr`` shows the owner and fingerprint, never the secret."""

    owner: str
    _secret: bytes = field(repr=False)
    source: str = "memory"

    def __post_init__(self):
        if not isinstance(self._secret, bytes) or len(self._secret) != SECRET_BYTES:
            raise KeyFileError(f"key from {self.source}: secret must be {SECRET_BYTES} bytes")

    @property
    def public_key(self) -> str:
        """The owner's public key, ``ed25519:<64 hex>``: safe to publish."""
        raw = self._signing_key().public_key().public_bytes_raw()
        return PUBLIC_KEY_PREFIX + raw.hex()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def sign(self, message: bytes) -> str:
        """Ed25519 signature of ``message`` with the owner's signing key, as hex."""
        return self._signing_key().sign(message).hex()

    def _signing_key(self) -> Ed25519PrivateKey:
        seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=_SIGNING_INFO).derive(self._secret)
        return Ed25519PrivateKey.from_private_bytes(seed)

    def subkey(self, dataset: str, scheme: str, block_size: int) -> bytes:
        return derive_subkey(self._secret, dataset, scheme, block_size)

    def __reduce__(self):  # never pickle key material into task results or caches
        raise TypeError("OwnerKey cannot be pickled; pass a key reference (path or env:NAME) instead")

    def __str__(self) -> str:
        return f"OwnerKey(owner={self.owner!r}, fingerprint={self.fingerprint})"

    __repr__ = __str__


def fingerprint(public_key: str) -> str:
    """SHA-256 of a fixed label and the raw public key, first 32 hex chars (anyone can recompute it)."""
    raw = _public_key_bytes(public_key, "public key")
    return hashlib.sha256(_FINGERPRINT_LABEL + raw).hexdigest()[:FINGERPRINT_HEX]


def _public_key_bytes(text: str, source: str) -> bytes:
    text = str(text).strip()
    if not text.startswith(PUBLIC_KEY_PREFIX):
        raise KeyFileError(f"{source}: not an etc-data public key (expected {PUBLIC_KEY_PREFIX}<64 hex chars>)")
    try:
        raw = bytes.fromhex(text[len(PUBLIC_KEY_PREFIX):])
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise KeyFileError(f"{source}: not an etc-data public key (expected {PUBLIC_KEY_PREFIX}<64 hex chars>)") \
            from None
    return raw


def parse_public_key(text: str, source: str = "public key") -> str:
    """A public key in its one canonical spelling (lower-case hex); ``source`` names it in errors."""
    return PUBLIC_KEY_PREFIX + _public_key_bytes(text, source).hex()


def load_public_key(ref: str | os.PathLike) -> str:
    """A public key given as itself (``ed25519:...``) or as a file holding one (``keys public --out``)."""
    ref = str(ref).strip()
    if ref.startswith(PUBLIC_KEY_PREFIX):
        return parse_public_key(ref, f"public key {ref[:24]}...")
    path = Path(ref)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"public key {ref}: neither {PUBLIC_KEY_PREFIX}<hex> nor a readable file ({e})") from None
    if '"secret"' in text:
        raise KeyFileError(f"{ref} is a secret key file, not a public key; give its public key "
                           f"(etc-data keys public --key {ref})")
    return parse_public_key(text, f"public key file {ref}")


def verify_signature(public_key: str, message: bytes, signature: str) -> bool:
    """Whether ``signature`` (hex) is the Ed25519 signature of ``message`` by ``public_key``."""
    try:
        sig = bytes.fromhex(str(signature))
        Ed25519PublicKey.from_public_bytes(_public_key_bytes(public_key, "public key")).verify(sig, message)
    except (ValueError, InvalidSignature, KeyFileError):
        return False
    return True


def derive_subkey(secret: bytes, dataset: str, scheme: str, block_size: int) -> bytes:
    """Per-dataset subkey: HKDF-SHA256 with dataset id, scheme and block size in the info string."""
    if not dataset:
        raise KeyFileError("dataset id must be a non-empty string")
    info = f"etc-data/v1|dataset={dataset}|scheme={scheme}|block={int(block_size)}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=info).derive(secret)


def new_key_file(path: str | os.PathLike, owner: str) -> OwnerKey:
    """Create a key file with a fresh 256-bit secret, mode 0600. Never overwrites."""
    path = Path(path)
    if not owner or not owner.strip():
        raise KeyFileError("owner name must not be empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(SECRET_BYTES)
    key = OwnerKey(owner, secret, source=str(path))
    doc = {"format": KEY_FORMAT, "owner": owner, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "fingerprint": key.fingerprint, "public_key": key.public_key, "secret": secret.hex()}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"key file {path} already exists; refusing to overwrite it") from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.chmod(path, 0o600)  # in case the umask or filesystem widened it
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return key


def parse_key_text(text: str, source: str) -> OwnerKey:
    """Parse a key file's content or a bare hex secret; ``source`` names it in errors (e.g.
    "environment variable ETC_DATA_KEY"), which never quote the text."""
    text = text.strip()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        if doc.get("format") != KEY_FORMAT:
            raise KeyFileError(f"{source} is not a valid key file: its format is not {KEY_FORMAT!r}")
        hexs, owner = doc.get("secret", ""), str(doc.get("owner", "unknown"))
    else:  # a bare hex secret, as used in environment variables
        hexs, owner = text, "env"
    try:
        secret = bytes.fromhex(hexs)
    except (ValueError, TypeError):
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise KeyFileError(f"{source} is not a valid key file (a key file from `etc-data keys new`, or "
                           f"{2 * SECRET_BYTES} hex characters)")
    return OwnerKey(owner, secret, source=source)


def load_key_file(path: str | os.PathLike) -> OwnerKey:
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{KEY_GIVEN} does not exist (expected a key file path or env:NAME)") from None
    except OSError as e:
        raise KeyFileError(f"{KEY_GIVEN} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{KEY_GIVEN} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"{KEY_GIVEN} is a key file readable or writable by group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run chmod 600 on it")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        raise KeyFileError(f"{KEY_GIVEN} is not a valid key file (unreadable as text)") from None
    return parse_key_text(text, KEY_GIVEN)


def key_env_var(ref: str | os.PathLike | None) -> str | None:
    """The environment variable a key reference reads (None, "" and ``env:`` mean $ETC_DATA_KEY),
    or None for a file reference."""
    ref = "" if ref is None else str(ref)
    if ref == "":
        return ENV_VAR
    return (ref[4:] or ENV_VAR) if ref.startswith("env:") else None


def load_key(ref: str | os.PathLike | None = None) -> OwnerKey:
    """Load a key from a reference: a file path, ``env:NAME``, or None for $ETC_DATA_KEY.

    The reference is safe to log and to pass as a Prefect parameter; the key is not.
    """
    check_key_ref(ref)
    name = key_env_var(ref)
    if name is not None:
        value = os.environ.get(name)
        if not value:
            raise KeyFileError(f"environment variable {name} is not set (expected a key file's content or a hex secret)")
        return parse_key_text(value, f"environment variable {name}")
    return load_key_file(str(ref))


def optional_key(ref: str | os.PathLike | None) -> OwnerKey | None:
    """The owner key a job was given, or None when it was given none: no reference and the default
    variable ($ETC_DATA_KEY) unset. Training and evaluation run without one."""
    if ref is None and not os.environ.get(ENV_VAR):
        return None
    return load_key(ref)
