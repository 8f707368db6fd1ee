"""The verify job: is a written dataset what its manifests say?

    from etc_data import VerifyConfig, verify_dataset
    result = verify_dataset(VerifyConfig(url="s3://bucket/cifar10-etc", deep=True))
    print("\n".join(result.lines())); assert result.ok

``url`` is a dataset root (every split its ``_info.json`` lists) or one split folder. Each split's
manifest is read first: its names, its owner's signature and the signer (``trust``: public keys or
files holding one; none pinned = trust on first use, with a warning) are checked before a shard
is read; a tampered or untrusted manifest raises an error naming what failed. For every
shard a manifest lists: it exists, its size and sha256 match, its samples each have one image and
a ``cls`` field, the sample count matches, and the first sample (every sample with ``deep``)
decodes to the manifest's image size. Shards in the folder that no manifest lists are reported.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from .codecs import codec_for_ext
from .manifest import INFO_NAME, check_plain_name, read_manifest, split_url_of
from .shards import SAMPLE_EXTS, ShardError, read_shard, sample_offsets
from .storage import StorageError, join, list_names, read_bytes


@dataclass
class VerifyConfig:
    url: str                          # a dataset root or a split folder (ROOT/<split>)
    deep: bool = False                # decode every sample, not only the first of each shard
    splits: list[str] | None = None   # with a root: only these splits (default: all it lists)
    storage_options: dict = field(default_factory=dict)
    trust: list[str] = field(default_factory=list)  # accepted signers: public keys or files; [] = trust on first use


@dataclass
class VerifyReport:
    """What verification found in one split."""

    url: str
    split: str = ""
    signer: str = ""                  # the key fingerprint whose signature was checked
    signer_key: str = ""              # and its public key
    checked: int = 0
    samples: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)  # "name: reason"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.corrupt)

    def lines(self) -> list[str]:
        out = [f"{self.url}: {self.checked} shards, {self.samples} samples checked, signed by key fingerprint "
               f"{self.signer}"]
        out += [f"MISSING {n}" for n in self.missing]
        out += [f"EXTRA {n} (not in the manifest)" for n in self.extra]
        out += [f"CORRUPT {n}" for n in self.corrupt]
        out.append("OK" if self.ok else "FAILED")
        return out


@dataclass
class DatasetVerification:
    """The reports of every split verified."""

    url: str
    reports: list[VerifyReport]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.reports)

    def lines(self) -> list[str]:
        return [line for r in self.reports for line in r.lines()]


def _check_shard(split_url: str, entry: dict, image_size, deep: bool, storage_options) -> tuple[str | None, int]:
    """(problem or None, samples) for one listed shard."""
    name = entry["name"]
    try:
        data = read_shard(split_url, name, storage_options)
    except ShardError as err:
        return f"{name}: {err}", 0
    if len(data) != entry["bytes"]:
        return f"{name}: {len(data)} bytes, manifest says {entry['bytes']}", 0
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return f"{name}: sha256 mismatch", 0
    n = 0
    try:
        for key, files in sample_offsets(data, name):  # payloads are only sliced to be decoded
            exts = [x for x in files if x in SAMPLE_EXTS]
            if len(exts) != 1 or "cls" not in files:
                raise ShardError(f"sample {key} lacks an image or cls field")
            if deep or n == 0:
                off, size = files[exts[0]]
                try:
                    img = codec_for_ext(exts[0]).decode(data[off:off + size])
                except Exception as err:  # noqa: BLE001 - any decoder failure is corruption
                    raise ShardError(f"sample {key} does not decode: {err}") from None
                if list(img.shape[:2]) != list(image_size):
                    raise ShardError(f"sample {key} is {img.shape[0]}x{img.shape[1]}, "
                                     f"manifest says {image_size[0]}x{image_size[1]}")
            n += 1
    except ShardError as err:
        return f"{name}: {err}", 0
    if n != entry["samples"]:
        return f"{name}: {n} samples, manifest says {entry['samples']}", 0
    return None, n


def verify_split(split_url: str, deep: bool = False, storage_options: dict | None = None,
                 trust=None) -> VerifyReport:
    """Check the manifest's signature (signer accepted by ``trust``, a ``trust.TrustPolicy``; None:
    trust on first use), every shard it lists, and report shards it does not list."""
    from concurrent.futures import ThreadPoolExecutor

    from .keys import fingerprint

    split_url = split_url_of(split_url)
    m = read_manifest(split_url, storage_options, trust)
    rep = VerifyReport(split_url, m.split, fingerprint(m.public_key), m.public_key)
    present = set(list_names(split_url, storage_options))
    listed = {e["name"] for e in m.shards}
    rep.extra = sorted(n for n in present if n.endswith(".tar") and n not in listed)
    todo = [e for e in m.shards if e["name"] in present]
    rep.missing = [e["name"] for e in m.shards if e["name"] not in present]
    rep.checked = len(todo)
    # a few shards at a time (reads, sha256 and decoding release the GIL), reported in order
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(todo)))) as ex:
        for problem, n in ex.map(lambda e: _check_shard(split_url, e, m.image_size, deep, storage_options), todo):
            if problem:
                rep.corrupt.append(problem)
            rep.samples += n
    return rep


def dataset_splits(url: str, storage_options: dict | None = None) -> list[str] | None:
    """The split names a dataset root's ``_info.json`` lists, or None when ``url`` has none (a split folder)."""
    try:
        info = json.loads(read_bytes(join(url, INFO_NAME), storage_options))
    except (StorageError, ValueError):
        return None
    splits = info.get("splits") if isinstance(info, dict) else None
    return list(splits) if isinstance(splits, dict) and splits else None


def verify_dataset(cfg: VerifyConfig) -> DatasetVerification:
    """Verify a dataset root (its splits) or a single split folder."""
    from .trust import TrustPolicy

    url = split_url_of(cfg.url)
    trust = TrustPolicy.from_refs(cfg.trust)
    splits = dataset_splits(url, cfg.storage_options)
    if splits is None:
        return DatasetVerification(url, [verify_split(url, cfg.deep, cfg.storage_options, trust)])
    if cfg.splits:
        splits = [s for s in splits if s in cfg.splits] or list(cfg.splits)
    reports = []
    for s in splits:
        split_url = join(url, check_plain_name(s, "split", join(url, INFO_NAME)))
        reports.append(verify_split(split_url, cfg.deep, cfg.storage_options, trust))
        trust = trust.after_first_use(reports[-1].signer_key)
    return DatasetVerification(url, reports)
