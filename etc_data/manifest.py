"""The dataset manifest: what a split holds, how it was made, and the commit point of a write.

Layout of a dataset root written by ``etc-data prepare --out ROOT``::

    ROOT/_info.json                       timm's wds reader format, all splits
    ROOT/<split>/manifest.json            this module's manifest (written last: the commit point)
    ROOT/<split>/samples-<sha16>.json     the sample index: sample keys per shard (for incremental
                                          ingest), named by its content hash so that a run killed
                                          between writing it and the manifest never breaks the
                                          committed manifest's copy
    ROOT/<split>/<split>-NNNNNN.tar       WebDataset shards

A shard that is not listed in ``manifest.json`` does not belong to the dataset (a leftover of a
killed run); readers only ever open the shards the manifest lists.

Every manifest is signed by its owner: ``signature`` is the Ed25519 signature (``keys.OwnerKey``)
of a canonical encoding of every other field of the file (shard names, sizes, sha256 and sample
counts, the sample index's hash, scheme, options, block size, pad, codec, classes, image size,
dataset id, key fingerprint, ``public_key``, ...), and ``public_key`` is the signer's. The fields
stay at the top level, where readers (and timm) find them. ``read_manifest`` checks, before any
shard is opened: the format, that every file name the manifest gives (shards, sample index, the
split) is a plain file name of the split folder, the signature, that the key fingerprint of an
encrypted split is the signer's, and that a ``trust.TrustPolicy`` accepts the signer. A signature
protects integrity and origin; it hides nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import MISSING, asdict, dataclass, field, fields

from . import __version__
from .errors import EtcError
from .storage import StorageError, StorageNotFound, join, list_names, read_bytes, remove, write_bytes

FORMAT = "etc-data-manifest/3"  # 3: signed by the owner
MANIFEST_NAME = "manifest.json"
INFO_NAME = "_info.json"
SAMPLE_INDEX_PREFIX = "samples-"
OPTIONAL_FIELDS = ("sample_order",)  # written (and signed) only when set; older manifests lack them
_SIGNED_CONTEXT = b"etc-data manifest signature v1\0"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*")


class ManifestError(EtcError):
    """A manifest is unparsable or inconsistent (the message names its URL)."""


class ManifestMissing(ManifestError):
    """No manifest at the URL: the split has not been committed (or the URL is not a split)."""


class ManifestSignatureError(ManifestError):
    """A manifest is unsigned, or its signature does not match its content and public key."""


def check_plain_name(name, what: str, where: str) -> str:
    """Refuse a file or split name that could leave the split folder (``/``, ``\\``, ``..``, ...)."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or ".." in name:
        raise ManifestError(f"{where}: bad name: {what} {name!r} is not a plain file name "
                            f"(letters, digits, _ . = + -; no '/', no '..')")
    return name


@dataclass
class Manifest:
    split: str
    dataset: str
    scheme: str
    block_size: int | None
    codec: str
    key_fingerprint: str | None
    classes: list[str]
    image_size: list[int]
    shards: list[dict] = field(default_factory=list)  # {"name", "sha256", "bytes", "samples"}
    scheme_options: dict = field(default_factory=dict)
    pad: str = "error"
    source: str = ""
    resize: dict | None = None
    sample_index_sha256: str | None = None
    sample_index_file: str | None = None
    tool_version: str = __version__
    created: str = ""
    format: str = FORMAT
    sample_order: dict | None = None  # how samples were ordered into shards (prepare.SAMPLE_ORDER); optional
    public_key: str = ""     # the signer's (keys.OwnerKey.public_key)
    signature: str = ""      # Ed25519 over signed_bytes(every other field)

    # timm _info.json fields, derived from the shard list
    @property
    def num_samples(self) -> int:
        return sum(int(s["samples"]) for s in self.shards)

    @property
    def num_bytes(self) -> int:
        """The shards' bytes on storage."""
        return sum(int(s["bytes"]) for s in self.shards)

    @property
    def shard_lengths(self) -> list[int]:
        return [int(s["samples"]) for s in self.shards]

    @property
    def filenames(self) -> list[str]:
        return [s["name"] for s in self.shards]

    def scheme_params(self) -> dict:
        return {"scheme": self.scheme, "block_size": self.block_size, "pad": self.pad,
                "options": dict(self.scheme_options)}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_samples"] = self.num_samples
        d["shard_lengths"] = self.shard_lengths
        d["filenames"] = self.filenames
        order = ["format", "dataset", "split", "num_samples", "shard_lengths", "filenames", "shards", "scheme",
                 "block_size", "scheme_options", "pad", "codec", "key_fingerprint", "classes", "image_size",
                 "source", "resize", "sample_index_file", "sample_index_sha256", "tool_version", "created"]
        tail = ["public_key", "signature"]
        return ({k: d[k] for k in order} | {k: d[k] for k in OPTIONAL_FIELDS if d[k] is not None}
                | {k: d[k] for k in tail})

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Manifest":
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: manifest must be a JSON object")
        if d.get("format") != FORMAT:
            if 0 < _format_version(d.get("format")) < _format_version(FORMAT):
                raise ManifestError(f"{where}: manifest format {d.get('format')!r} was written by an earlier version "
                                    f"of etc-data (this one reads signed manifests, {FORMAT!r}); run etc-data "
                                    f"prepare again (into a new --out, or after removing this split)")
            raise ManifestError(f"{where}: unknown manifest format {d.get('format')!r} (expected {FORMAT!r})")
        if "signature" not in d or "public_key" not in d:
            raise ManifestSignatureError(f"{where}: the manifest is unsigned (no signature or public_key); refused")
        names = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ManifestError(f"{where}: manifest lacks field(s) {', '.join(missing)}")
        m = cls(**{k: v for k, v in d.items() if k in names})
        if not isinstance(m.shards, list):
            raise ManifestError(f"{where}: shards must be a list")
        for i, s in enumerate(m.shards):
            _check_shard_entry(s, i, where)
        check_plain_name(m.split, "split", where)
        if m.sample_index_file is not None:
            check_plain_name(m.sample_index_file, "sample_index_file", where)
        if not (isinstance(m.image_size, list) and len(m.image_size) == 2 and all(_count(v) for v in m.image_size)):
            raise ManifestError(f"{where}: image_size must be [height, width], got {m.image_size!r}")
        if "num_samples" in d and d["num_samples"] != m.num_samples:
            raise ManifestError(f"{where}: num_samples {d['num_samples']} != sum of shard samples {m.num_samples}")
        return m


SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*\.tar\Z")  # no "/", no ".."


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_shard_entry(s, i: int, where: str) -> None:
    """A shard entry is {name: a plain .tar file name, sha256: 64 hex, bytes, samples: counts}."""
    if not isinstance(s, dict) or not {"name", "sha256", "bytes", "samples"} <= set(s):
        raise ManifestError(f"{where}: shards[{i}] must have name, sha256, bytes, samples")
    if not isinstance(s["name"], str) or not SHARD_NAME.match(s["name"]):
        raise ManifestError(f"{where}: bad name: shards[{i}].name {s['name']!r} is not a plain .tar file name")
    if not (isinstance(s["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", s["sha256"])):
        raise ManifestError(f"{where}: shards[{i}].sha256 must be 64 lowercase hex digits")
    for k in ("bytes", "samples"):
        if not _count(s[k]):
            raise ManifestError(f"{where}: shards[{i}].{k} must be a non-negative integer, got {s[k]!r}")


def _format_version(fmt) -> int:
    """The N of ``etc-data-manifest/N`` (0 for anything else)."""
    prefix = FORMAT.rsplit("/", 1)[0] + "/"
    tail = str(fmt)[len(prefix):] if str(fmt).startswith(prefix) else ""
    return int(tail) if tail.isdigit() else 0


def manifest_url(split_url: str) -> str:
    return split_url if str(split_url).endswith(".json") else join(split_url, MANIFEST_NAME)


def split_url_of(url: str) -> str:
    """The split folder of a URL that names either the folder or its manifest.json."""
    url = str(url).rstrip("/")
    return url[: -len(MANIFEST_NAME) - 1] if url.endswith("/" + MANIFEST_NAME) or url.endswith("\\" + MANIFEST_NAME) else url


def signed_bytes(doc: dict) -> bytes:
    """What a manifest's signature covers: every field but ``signature``, in canonical JSON."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return _SIGNED_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def check_signature(doc: dict, m: Manifest, where: str) -> None:
    """The signature matches the file's content and public key, and an encrypted split's key
    fingerprint is the signer's (data under one key is signed by that key's owner)."""
    from .keys import KeyFileError, fingerprint, verify_signature

    try:
        signer = fingerprint(m.public_key)
    except KeyFileError:
        raise ManifestSignatureError(f"{where}: bad signature: public_key {str(m.public_key)[:80]!r} is not an "
                                     f"etc-data public key; refused") from None
    if not verify_signature(m.public_key, signed_bytes(doc), m.signature):
        raise ManifestSignatureError(f"{where}: bad signature: the manifest was changed after its owner (key "
                                     f"fingerprint {signer}) signed it, or the signature is not theirs; refused")
    if (m.scheme == "plain") != (m.key_fingerprint is None) or m.key_fingerprint not in (None, signer):
        raise ManifestSignatureError(f"{where}: scheme {m.scheme} with key fingerprint {m.key_fingerprint}, signed by "
                                     f"key fingerprint {signer}: an encrypted split is signed by its key's owner; "
                                     f"refused")


def read_manifest(url: str, storage_options: dict | None = None, trust=None) -> Manifest:
    """Read ``URL/manifest.json`` (or the manifest URL itself), check its names and signature, and
    that ``trust`` (a ``trust.TrustPolicy``; None: trust on first use) accepts its signer. A clear
    error, naming the URL and what failed, if it is absent, broken, tampered with or untrusted."""
    from .trust import TrustPolicy

    murl = manifest_url(url)
    try:
        raw = read_bytes(murl, storage_options)
    except StorageNotFound as e:
        raise ManifestMissing(f"no readable manifest at {murl} ({e}); is this a split folder written by "
                              f"etc-data prepare, e.g. ROOT/train?") from None
    except StorageError as e:  # credentials, connection: not a question of which folder
        raise ManifestError(f"cannot read the manifest: {e}") from None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{murl}: not valid JSON ({e})") from None
    try:
        m = Manifest.from_dict(doc, murl)
    except TypeError as e:
        raise ManifestError(f"{murl}: {e}") from None
    check_signature(doc, m, murl)
    (trust or TrustPolicy()).check(m.public_key, murl)
    return m


def read_sample_index(split_url: str, manifest: Manifest, storage_options: dict | None = None) -> dict[str, list[str]]:
    """Sample keys per shard name, checked against the manifest's recorded hash."""
    if not manifest.sample_index_file:
        raise ManifestError(f"{manifest_url(split_url)}: the manifest names no sample index")
    url = join(split_url_of(split_url), manifest.sample_index_file)
    try:
        raw = read_bytes(url, storage_options)
    except StorageError as e:
        raise ManifestError(f"{url}: the sample index the manifest refers to is unreadable ({e})") from None
    if manifest.sample_index_sha256 and hashlib.sha256(raw).hexdigest() != manifest.sample_index_sha256:
        raise ManifestError(f"{url}: sha256 does not match the manifest (file changed after commit)")
    try:
        keys = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{url}: not valid JSON ({e})") from None
    if not isinstance(keys, dict) or set(keys) != set(manifest.filenames):
        raise ManifestError(f"{url}: does not list the manifest's shards")
    return keys


def _dumps(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def sign_manifest(manifest: Manifest, key) -> dict:
    """The manifest's JSON document, signed with the owner key ``key`` (its public key added)."""
    where = f"manifest of split {manifest.split}"
    if manifest.scheme != "plain" and manifest.key_fingerprint != key.fingerprint:
        raise ManifestError(f"{where}: refusing to sign data encrypted under key fingerprint "
                            f"{manifest.key_fingerprint} with another owner key ({key.fingerprint})")
    if manifest.scheme == "plain" and manifest.key_fingerprint is not None:
        raise ManifestError(f"{where}: a plain split carries no key fingerprint")
    manifest.public_key, manifest.signature = key.public_key, ""
    doc = manifest.to_dict()
    manifest.signature = doc["signature"] = key.sign(signed_bytes(doc))
    return doc


def write_manifest(split_url: str, manifest: Manifest, sample_index: dict[str, list[str]] | None = None,
                   storage_options: dict | None = None, *, key) -> None:
    """Commit a split: the sample index, then manifest.json (the commit point, signed with the owner
    key ``key``), then the root _info.json.

    The sample index is content-addressed (``samples-<sha16>.json``): a run killed after writing it
    and before the manifest leaves the committed manifest's own index intact. Older indexes are
    removed after the commit.
    """
    split_url = split_url_of(split_url)
    if sample_index is not None:
        missing = [n for n in manifest.filenames if n not in sample_index]
        extra = sorted(set(sample_index) - set(manifest.filenames))
        if missing or extra:
            raise ManifestError(f"{manifest_url(split_url)}: the sample index must list exactly the manifest's "
                                f"shards (missing {missing[:3]}, extra {extra[:3]})")
        raw = json.dumps(sample_index, separators=(",", ":"), sort_keys=True).encode()
        manifest.sample_index_sha256 = hashlib.sha256(raw).hexdigest()
        manifest.sample_index_file = f"{SAMPLE_INDEX_PREFIX}{manifest.sample_index_sha256[:16]}.json"
        write_bytes(join(split_url, manifest.sample_index_file), raw, storage_options)
    manifest.created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_bytes(manifest_url(split_url), _dumps(sign_manifest(manifest, key)), storage_options)
    update_info(split_url, manifest, storage_options)
    try:
        for name in list_names(split_url, storage_options):
            if name != manifest.sample_index_file and name.startswith(SAMPLE_INDEX_PREFIX) and name.endswith(".json"):
                remove(join(split_url, name), storage_options)
    except StorageError:
        pass  # a stale index is harmless: only the one the manifest names is ever read


def info_entry(manifest: Manifest, split_dir: str) -> dict:
    """A split's entry in ``_info.json``: what timm reads, derived from the manifest alone."""
    return {"name": manifest.split, "num_samples": manifest.num_samples,
            "filenames": [f"{split_dir}/{n}" for n in manifest.filenames], "shard_lengths": manifest.shard_lengths}


def read_info(url: str, storage_options: dict | None = None) -> dict | None:
    """A dataset root's ``_info.json`` as a dict, or None when ``url`` has none (a split folder)."""
    try:
        info = json.loads(read_bytes(join(url, INFO_NAME), storage_options))
    except (StorageError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def update_info(split_url: str, manifest: Manifest, storage_options: dict | None = None) -> None:
    """Write/merge timm's ``_info.json`` at the dataset root (the split folder's parent)."""
    root, _, split_dir = split_url_of(split_url).rstrip("/").replace("\\", "/").rpartition("/")
    root = split_url_of(split_url)[: len(root)] if root else "."
    info = read_info(root, storage_options) or {}  # a broken one is rewritten from the manifests
    info.setdefault("name", manifest.dataset)
    if not isinstance(info.get("splits"), dict):
        info["splits"] = {}
    info["splits"][manifest.split] = info_entry(manifest, split_dir)
    info["classes"] = manifest.classes
    write_bytes(join(root, INFO_NAME), _dumps(info), storage_options)
