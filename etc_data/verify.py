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
decodes to the manifest's image size. For a root, ``_info.json`` (what timm reads) must agree with
every split's manifest, and a split folder with a manifest that ``_info.json`` does not list is
verified and reported (a run killed between the two writes leaves them disagreeing; rerunning
prepare rewrites ``_info.json``).

Shards in the folder that the manifest does not list (EXTRA: left by a run killed before its
commit) are not part of the dataset, so they are a warning, not a failure: the dataset the manifest
describes is intact. They still matter: a reader that globs ``*.tar`` (Hugging Face
``load_dataset("webdataset", data_files=".../*.tar")``, a shell loop) counts them. ``strict``
makes them a failure; ``clean`` removes them and the ``.part`` temporaries of interrupted
writes, and nothing the manifest lists (``remove_leftovers``, which ``prepare`` also runs after
each commit).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

from .codecs import codec_for_ext
from .manifest import (INFO_NAME, MANIFEST_NAME, Manifest, check_plain_name, info_entry, read_info, read_manifest,
                       split_url_of)
from .shards import SAMPLE_EXTS, ShardError, open_shard, stream_samples
from .storage import StorageError, exists, join, list_names, remove, size


@dataclass
class VerifyConfig:
    url: str                          # a dataset root or a split folder (ROOT/<split>)
    deep: bool = False                # decode every sample, not only the first of each shard
    splits: list[str] | None = None   # with a root: only these splits (default: all it lists)
    storage_options: dict = field(default_factory=dict)
    trust: list[str] = field(default_factory=list)  # accepted signers: public keys or files; [] = trust on first use
    strict: bool = False              # shards the manifest does not list fail the check (default: a warning)
    clean: bool = False               # remove those shards and .part temporaries (never a listed shard)
    # shards the caller wrote, then read back and checked whole (``check_shard``) before listing
    # them (prepare does, per chunk): {split: [manifest entries]}. A listed shard with the same
    # entry is only checked for its size here, not read a second time.
    read_back: dict[str, list[dict]] = field(default_factory=dict)


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
    extra: list[str] = field(default_factory=list)    # shards the manifest does not list
    corrupt: list[str] = field(default_factory=list)  # "name: reason"
    removed: list[str] = field(default_factory=list)  # leftovers removed (clean)
    strict: bool = False
    manifest: Manifest | None = field(default=None, repr=False)  # the signed manifest that was checked

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or (self.strict and self.extra))

    def lines(self) -> list[str]:
        out = [f"{self.url}: {self.checked} shards, {self.samples} samples checked, signed by key fingerprint "
               f"{self.signer}"]
        out += [f"MISSING {n}" for n in self.missing]
        left = [n for n in self.extra if n not in self.removed]
        out += [f"EXTRA {n} (not in the manifest: left by an interrupted run; readers that glob *.tar count it)"
                for n in left]
        out += [f"REMOVED {n} (not in the manifest)" for n in self.removed]
        out += [f"CORRUPT {n}" for n in self.corrupt]
        if self.ok and left:
            out.append(f"OK, with {len(left)} shard(s) not in the manifest: remove them with `etc-data verify "
                       f"--clean` (or the next prepare run does)")
        else:
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


class _Digest:
    """sha256 and byte count of what a shard stream read."""

    def __init__(self):
        self.sha, self.bytes = hashlib.sha256(), 0

    def update(self, b: bytes) -> None:
        self.sha.update(b)
        self.bytes += len(b)


def check_shard(split_url: str, entry: dict, image_size, deep: bool = False,
                storage_options: dict | None = None, whole: bool = True) -> tuple[str | None, int]:
    """(problem or None, samples) for one listed shard, streamed in 1 MB windows (memory does
    not grow with the shard). A size or sha256 mismatch is reported before what the parse found.

    ``whole=False`` (prepare reading back a shard it has just written): every byte is read and
    hashed, but only the first sample is parsed and decoded; the bytes being the ones written
    (size and sha256) is what the read-back is for, and the writer's tar structure and count are
    its own (parsing every member again costs ~5 us per sample, as much as a 32 px image's codecs)."""
    name = entry["name"]
    digest, n, problem = _Digest(), 0, None
    try:
        with open_shard(split_url, name, storage_options) as f:
            try:
                for key, files in stream_samples(f, name, hasher=digest):
                    exts = [x for x in files if x in SAMPLE_EXTS]
                    if len(exts) != 1 or "cls" not in files:
                        raise ShardError(f"sample {key} lacks an image or cls field")
                    if deep or n == 0:
                        try:
                            img = codec_for_ext(exts[0]).decode(files[exts[0]])
                        except Exception as err:  # noqa: BLE001 - any decoder failure is corruption
                            raise ShardError(f"sample {key} does not decode: {err}") from None
                        if list(img.shape[:2]) != list(image_size):
                            raise ShardError(f"sample {key} is {img.shape[0]}x{img.shape[1]}, "
                                             f"manifest says {image_size[0]}x{image_size[1]}")
                    n += 1
                    if not whole:
                        break
            except ShardError as err:
                problem = f"{name}: {err}"
            while chunk := f.read(1 << 20):  # the rest (after a failed or partial parse), for the size and hash
                digest.update(chunk)
    except ShardError as err:
        return f"{name}: {err}", 0
    if digest.bytes != entry["bytes"]:
        return f"{name}: {digest.bytes} bytes, manifest says {entry['bytes']}", 0
    if digest.sha.hexdigest() != entry["sha256"]:
        return f"{name}: sha256 mismatch", 0
    if problem:
        return problem, 0
    if whole and n != entry["samples"]:
        return f"{name}: {n} samples, manifest says {entry['samples']}", 0
    return None, n if whole else entry["samples"]


def is_leftover(name: str, listed: set[str]) -> bool:
    """A file of a split folder that no committed dataset counts: a shard the manifest does not
    list, or the ``.part`` temporary of an interrupted write."""
    return (name.endswith(".tar") and name not in listed) or name.endswith(".part")


def remove_leftovers(split_url: str, listed: set[str], storage_options: dict | None = None,
                     leftover: Callable[[str, set[str]], bool] = is_leftover) -> list[str]:
    """Remove the leftovers (``leftover(name, listed)``, default ``is_leftover``) of a split folder
    whose manifest lists ``listed``; returns their names. A file that cannot be removed is kept
    (verify reports it)."""
    removed = []
    for name in list_names(split_url, storage_options):
        if leftover(name, listed):
            try:
                remove(join(split_url, name), storage_options)
                removed.append(name)
            except StorageError:
                pass
    return removed


_ENTRY_FIELDS = ("name", "sha256", "bytes", "samples")


def _read_back(entry: dict, seen: dict[str, dict]) -> bool:
    """Whether ``entry`` is, field for field, a shard the caller already read back and checked."""
    checked = seen.get(entry["name"])
    return checked is not None and all(checked.get(k) == entry.get(k) for k in _ENTRY_FIELDS)


def _check_size(split_url: str, entry: dict, storage_options: dict | None) -> tuple[str | None, int]:
    """A read-back shard: still there with its size (a stat, not a read)."""
    try:
        got = size(join(split_url, entry["name"]), storage_options)
    except StorageError as e:
        return f"{entry['name']}: {e}", 0
    if got != entry["bytes"]:
        return f"{entry['name']}: {got} bytes, manifest says {entry['bytes']}", 0
    return None, entry["samples"]


def verify_split(split_url: str, deep: bool = False, storage_options: dict | None = None, strict: bool = False,
                 clean: bool = False, trust=None, read_back: dict[str, list[dict]] | None = None) -> VerifyReport:
    """Check the manifest's signature (signer accepted by ``trust``, a ``trust.TrustPolicy``; None:
    trust on first use), every shard it lists, and report (``clean``: remove) what it does not list.
    ``read_back``: {split: [entries]} of shards already checked whole by the caller (see
    ``VerifyConfig.read_back``)."""
    from concurrent.futures import ThreadPoolExecutor

    from .keys import fingerprint

    split_url = split_url_of(split_url)
    m = read_manifest(split_url, storage_options, trust)
    rep = VerifyReport(split_url, m.split, fingerprint(m.public_key), m.public_key, strict=strict, manifest=m)
    present = set(list_names(split_url, storage_options))
    listed = {e["name"] for e in m.shards}
    rep.extra = sorted(n for n in present if n.endswith(".tar") and n not in listed)
    if clean:
        rep.removed = remove_leftovers(split_url, listed, storage_options)
    todo = [e for e in m.shards if e["name"] in present]
    rep.missing = [e["name"] for e in m.shards if e["name"] not in present]
    rep.checked = len(todo)
    # a few shards at a time (reads, sha256 and decoding release the GIL), reported in order
    seen = {e["name"]: e for e in (read_back or {}).get(m.split, [])}

    def check(e: dict) -> tuple[str | None, int]:
        if not deep and _read_back(e, seen):
            return _check_size(split_url, e, storage_options)
        return check_shard(split_url, e, m.image_size, deep, storage_options)

    with ThreadPoolExecutor(max_workers=max(1, min(4, len(todo)))) as ex:
        for problem, n in ex.map(check, todo):
            if problem:
                rep.corrupt.append(problem)
            rep.samples += n
    return rep


def dataset_splits(info: dict | None) -> list[str] | None:
    """The split names a dataset root's ``_info.json`` (``read_info``) lists, or None without one (a split folder)."""
    splits = info.get("splits") if info else None
    return list(splits) if isinstance(splits, dict) and splits else None


def info_problems(info: dict, split: str, m: Manifest) -> list[str]:
    """How ``_info.json`` disagrees with ``m``, the manifest of split folder ``split`` ([] when it agrees)."""
    have = (info.get("splits") or {}).get(m.split) if isinstance(info.get("splits"), dict) else None
    fix = "; run etc-data prepare again to rewrite it"
    if have is None:
        return [f"{INFO_NAME}: does not list split {m.split}, which has a manifest{fix}"]
    want = info_entry(m, split)
    diff = [k for k in want if have.get(k) != want[k]] + (["classes"] if info.get("classes") != m.classes else [])
    return [f"{INFO_NAME}: {', '.join(diff)} of split {m.split} disagree with {split}/{MANIFEST_NAME}{fix}"] if diff else []


def _unlisted_splits(url: str, listed: list[str], storage_options: dict | None) -> list[str]:
    """Folders under a root that hold a manifest but are missing from ``_info.json``."""
    return [n for n in list_names(url, storage_options) if n not in listed and not n.startswith((".", "_"))
            and exists(join(url, n, MANIFEST_NAME), storage_options)]


def verify_dataset(cfg: VerifyConfig) -> DatasetVerification:
    """Verify a dataset root (its splits, and its ``_info.json`` against them) or a single split folder."""
    from .trust import TrustPolicy

    url = split_url_of(cfg.url)
    trust = TrustPolicy.from_refs(cfg.trust)
    info = read_info(url, cfg.storage_options)
    splits = dataset_splits(info)
    opts = (cfg.deep, cfg.storage_options, cfg.strict, cfg.clean)
    if splits is None:
        return DatasetVerification(url, [verify_split(url, *opts, trust, cfg.read_back)])
    if cfg.splits:
        splits = [s for s in splits if s in cfg.splits] or list(cfg.splits)
    else:
        splits += _unlisted_splits(url, splits, cfg.storage_options)
    reports = []
    for s in splits:
        split_url = join(url, check_plain_name(s, "split", join(url, INFO_NAME)))
        rep = verify_split(split_url, *opts, trust, cfg.read_back)
        trust = trust.after_first_use(rep.signer_key)
        rep.corrupt += info_problems(info, s, rep.manifest)
        reports.append(rep)
    return DatasetVerification(url, reports)
