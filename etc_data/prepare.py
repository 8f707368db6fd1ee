"""The prepare pipeline (no Prefect here): source -> chunks -> encrypt -> encode -> shards -> manifest.

``plan_split`` decides, per split, which source items still need sharding (incremental ingest:
items whose stable sample key is already in the committed dataset are skipped) and cuts them
into chunks, one shard each. ``run_chunk`` does one chunk end to end (load, encrypt with the
owner's key, encode, write the shard atomically) and returns only public metadata.
``commit_split`` writes the manifest last; it is the commit point, after which shards that the
manifest does not list (leftovers of a killed run) are removed.

A chunk receives a *key reference* (a path or ``env:NAME``), never the key: the key is loaded
where the encryption happens, so no key material travels through task parameters or results.
The same input, key and arguments always give byte-identical shards (deterministic plans, tar
layout and codecs), which is what makes a rerun after SIGKILL end with the same manifest.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

from . import __version__
from .codecs import check_scheme_codec, encode_batch, get_codec
from .errors import EtcError
from .manifest import Manifest, ManifestError, read_keys, read_manifest, write_manifest
from .schemes import WeakKeyWarning, make_scheme, parse_scheme_spec
from .shards import write_chunk
from .sources import Source, open_source
from .storage import StorageError, join, list_names, remove

DEFAULT_SHARD_SIZE = 10000


class PrepareError(EtcError):
    """The prepare step cannot proceed (message names the split, shard or setting)."""


@dataclass
class Settings:
    """Everything that defines a prepared dataset. Public: safe for logs and Prefect parameters."""

    source: str | list[str]
    out: str
    dataset: str
    scheme: str = "etc"
    block_size: int | None = None
    codec: str = "jpeg:q=85,sub=420"
    key_ref: str | None = None
    owner: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    max_shard_bytes: int | None = None
    limit: int | None = None
    splits: list[str] | None = None
    resize: int | None = None
    pad: str = "error"
    on_bad_image: str = "stop"
    storage_options: dict = field(default_factory=dict)

    def open_source(self) -> Source:
        return open_source(self.source, resize=self.resize)

    def scheme_name(self) -> str:
        return parse_scheme_spec(self.scheme)[0]


@dataclass
class ChunkSpec:
    split: str
    index: int           # shard index of the chunk
    items: list[int]     # positions in the split's sorted item list
    token: str = ""      # the split's Source.split_token when planned ("" = not checked)
    fingerprint: str | None = None  # the planner's key fingerprint (public; None = plain or not checked)


@dataclass
class ChunkResult:
    split: str
    index: int
    shards: list[dict]   # ShardInfo entries + "keys"
    skipped: list[str]   # names of unreadable images skipped (on_bad_image="skip")
    image_size: list[int]
    payload_bytes: int


@dataclass
class SplitPlan:
    split: str
    total_items: int
    chunks: list[ChunkSpec]
    existing: Manifest | None
    existing_keys: dict[str, list[str]]


def load_owner_key(key_ref: str | None):
    from .keys import load_key

    return load_key(key_ref)


def build_scheme(s: Settings, key=None, key_loader=None):
    name = s.scheme_name()
    if name != "plain" and key is None:
        key = (key_loader or load_owner_key)(s.key_ref)
    return make_scheme(s.scheme, key=key, dataset=s.dataset, block_size=s.block_size, pad=s.pad), key


def dataset_id(source: Source, given: str | None) -> str:
    ds = given or re.sub(r"[^A-Za-z0-9_.\-]", "_", source.name)
    if not ds:
        raise PrepareError("dataset id is empty: pass --dataset")
    return ds


def _item_positions(source: Source, split: str, limit: int | None, done: set[str]) -> tuple[int, list[int]]:
    items = source.items(split)
    if limit is not None:
        items = items[:limit]
    return len(items), [i for i, it in enumerate(items) if it.key not in done]


def _next_index(m: Manifest | None) -> int:
    if not m or not m.shards:
        return 0
    return max(int(re.match(r".*-(\d{6})(?:-\d+)?\.tar$", e["name"]).group(1)) for e in m.shards) + 1


def check_compatible(m: Manifest, s: Settings, fingerprint: str | None, codec_spec: str, where: str) -> None:
    """An append must use the dataset's own settings; anything else would mix two datasets."""
    name = s.scheme_name()
    scheme = make_scheme(s.scheme, subkey=b"\0" * 32, block_size=s.block_size, pad=s.pad) if name != "plain" \
        else make_scheme("plain")
    want = {"scheme": name, "block_size": scheme.block_size, "codec": codec_spec, "key_fingerprint": fingerprint,
            "dataset": s.dataset, "scheme_options": scheme.params()["options"]}
    have = {"scheme": m.scheme, "block_size": m.block_size, "codec": m.codec, "key_fingerprint": m.key_fingerprint,
            "dataset": m.dataset, "scheme_options": m.scheme_options}
    diff = [k for k in want if want[k] != have[k]]
    if diff:
        shown = ", ".join(f"{k}: dataset has {have[k]!r}, this run {want[k]!r}" for k in diff)
        raise PrepareError(f"{where} already holds a dataset made with other settings ({shown}); "
                           f"write to another --out or use the same settings")


def plan_split(s: Settings, source: Source, split: str, fingerprint: str | None, codec_spec: str) -> SplitPlan:
    split_url = join(s.out, split)
    existing, keys = None, {}
    try:
        existing = read_manifest(split_url, s.storage_options)
    except ManifestError as e:
        if "no readable manifest" not in str(e):
            raise
    if existing is not None:
        check_compatible(existing, s, fingerprint, codec_spec, split_url)
        keys = read_keys(split_url, existing, s.storage_options)
    done = {k for v in keys.values() for k in v}
    total, todo = _item_positions(source, split, s.limit, done)
    start = _next_index(existing)
    token = source.split_token(split)
    chunks = [ChunkSpec(split, start + n, todo[i:i + s.shard_size], token, fingerprint)
              for n, i in enumerate(range(0, len(todo), s.shard_size))]
    return SplitPlan(split, total, chunks, existing, keys)


def run_chunk(s: Settings, spec: ChunkSpec, source: Source | None = None, scheme=None) -> ChunkResult:
    """Load, encrypt, encode and write one chunk as one shard (or parts past the byte limit)."""
    source = source or s.open_source()
    codec = get_codec(s.codec)
    if scheme is None:
        scheme, _ = build_scheme(s)
    if spec.token and source.split_token(spec.split) != spec.token:
        raise PrepareError(f"source {source.name}, split {spec.split}: changed since this run was planned "
                           f"(chunk {spec.index}); run prepare again")
    all_items = source.items(spec.split)
    items = [all_items[i] for i in spec.items]
    batch = source.load(items, on_bad_image=s.on_bad_image)
    if len(batch.keys) == 0:
        return ChunkResult(spec.split, spec.index, [], batch.skipped, [], 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WeakKeyWarning)  # warned once by the caller, not per chunk
        enc = scheme.encrypt(batch.images, item=f"{spec.split} chunk {spec.index}")
    blobs = encode_batch(codec, enc)
    samples = [{"__key__": k, codec.ext: b, "cls": int(y), "json": {"cls": int(y), "source_id": k, "split": spec.split}}
               for k, b, y in zip(batch.keys, blobs, batch.labels)]
    shards = write_chunk(join(s.out, spec.split), spec.split, spec.index, samples, max_samples=None,
                         max_bytes=s.max_shard_bytes, storage_options=s.storage_options)
    return ChunkResult(spec.split, spec.index, [dict(x.entry(), keys=x.keys) for x in shards], batch.skipped,
                       list(enc.shape[1:3]), sum(len(b) for b in blobs))


def commit_split(s: Settings, source: Source, plan: SplitPlan, results: list[ChunkResult], fingerprint: str | None,
                 codec_spec: str, scheme_params: dict) -> Manifest:
    """Write keys.json and manifest.json (the commit point), then remove unlisted shards."""
    split_url = join(s.out, plan.split)
    results = sorted(results, key=lambda r: r.index)
    old = plan.existing
    sizes = {tuple(r.image_size) for r in results if r.image_size}
    if old is not None:
        sizes.add(tuple(old.image_size))
    if len(sizes) > 1:
        raise PrepareError(f"split {plan.split}: images of different sizes {sorted(sizes)}; choose --resize")
    shards = list(old.shards) if old else []
    keys = dict(plan.existing_keys)
    for r in results:
        for e in r.shards:
            shards.append({k: e[k] for k in ("name", "sha256", "bytes", "samples")})
            keys[e["name"]] = e["keys"]
    if not shards:
        raise PrepareError(f"split {plan.split}: no images were written (all unreadable or the split is empty)")
    m = Manifest(split=plan.split, dataset=s.dataset, scheme=scheme_params["scheme"],
                 block_size=scheme_params["block_size"], scheme_options=scheme_params["options"],
                 pad=scheme_params["pad"], codec=codec_spec, key_fingerprint=fingerprint,
                 classes=list(source.classes), image_size=list(next(iter(sizes))), shards=shards,
                 source=source.description, resize=source.resize_policy(), tool_version=__version__)
    write_manifest(split_url, m, keys=keys, storage_options=s.storage_options)
    listed = {e["name"] for e in shards}
    for name in list_names(split_url, s.storage_options):
        if (name.endswith(".tar") and name not in listed) or name.endswith(".part"):
            try:
                remove(join(split_url, name), s.storage_options)
            except StorageError:
                pass  # verify reports it as extra; nothing counts it
    return m


@dataclass
class PrepareSummary:
    manifests: dict[str, Manifest]
    written: dict[str, int]        # samples written by this run, per split
    skipped: dict[str, list[str]]  # unreadable images skipped, per split
    payload_bytes: dict[str, int]
    key_bits: float | None
    image_size: list[int] | None

    def lines(self) -> list[str]:
        out = []
        for split, m in self.manifests.items():
            mb = sum(e["bytes"] for e in m.shards) / 1e6
            out.append(f"{split}: {m.num_samples} samples in {len(m.shards)} shards ({mb:.1f} MB), "
                       f"{self.written[split]} new; scheme {m.scheme} block {m.block_size}, codec {m.codec}, "
                       f"key {m.key_fingerprint or '-'}")
            if self.skipped.get(split):
                out.append(f"{split}: skipped {len(self.skipped[split])} unreadable images: "
                           + ", ".join(self.skipped[split][:10]) + (" ..." if len(self.skipped[split]) > 10 else ""))
        return out


def prepare(s: Settings, map_chunks=None, progress=None, key_loader=None) -> PrepareSummary:
    """Run the whole pipeline: in this process, or with ``map_chunks(specs) -> iterable of
    ChunkResult`` (how the Prefect flow fans chunks out to tasks). ``key_loader(ref)`` resolves
    the key reference (default: a path or env:NAME)."""
    source = s.open_source()
    s.dataset = dataset_id(source, s.dataset)
    codec = get_codec(s.codec)
    scheme, key = build_scheme(s, key_loader=key_loader)
    check_scheme_codec(scheme, codec)
    fingerprint = key.fingerprint if key is not None else None
    splits = s.splits or source.splits
    for sp in splits:
        if sp not in source.splits:
            raise PrepareError(f"source {source.name} has no split {sp!r}; it has: {', '.join(source.splits)}")
    plans = [plan_split(s, source, sp, fingerprint, codec.spec) for sp in splits]
    specs = [c for p in plans for c in p.chunks]
    if map_chunks is None:
        results = []
        for c in specs:
            results.append(run_chunk(s, c, source, scheme))
            if progress:
                progress(results[-1])
    else:
        results = list(map_chunks(specs))
    manifests, written, skipped, payload = {}, {}, {}, {}
    for p in plans:
        rs = [r for r in results if r.split == p.split]
        manifests[p.split] = commit_split(s, source, p, rs, fingerprint, codec.spec, scheme.params())
        written[p.split] = sum(e["samples"] for r in rs for e in r.shards)
        skipped[p.split] = [x for r in rs for x in r.skipped]
        payload[p.split] = sum(r.payload_bytes for r in rs)
    size = next(iter(manifests.values())).image_size if manifests else None
    bits = scheme.key_space_bits(*size) if (size and scheme.keyed) else None
    return PrepareSummary(manifests, written, skipped, payload, bits, size)


# ----------------------------------------------------------------------------- local process pool

_SOURCES: dict = {}   # per process (a pool worker, or the thread runner's process): the last source opened
_SCHEMES: dict = {}   # and the last key schedule built


def cached_source(s: Settings, token: str = "", split: str = "") -> Source:
    """The source of these settings, opened once per process and reopened when it no longer
    matches the planner's ``token`` for ``split`` (a source that grew between two runs of a
    long-lived process)."""
    ck = (repr(s.source), s.resize)
    source = _SOURCES.get(ck)
    if source is None or (token and source.split_token(split) != token):
        _SOURCES.clear()
        source = _SOURCES[ck] = s.open_source()
    return source


def run_chunk_cached(settings: dict, spec: dict, key_loader=None) -> dict:
    """Run one chunk from public settings; the source and scheme are kept open per process (a
    pool worker, or a Prefect task thread) and the key is loaded here from its reference with
    ``key_loader`` (default: a path or env:NAME)."""
    import dataclasses

    s, c = Settings(**settings), ChunkSpec(**spec)
    source = cached_source(s, c.token, c.split)
    sk = (s.scheme, s.block_size, s.pad, s.dataset, s.key_ref)
    scheme, fp = _SCHEMES.get(sk, (None, None))
    if scheme is None or (c.fingerprint and fp != c.fingerprint):
        # first chunk here, or the key behind the reference changed since it was loaded (a rotated
        # key file or Prefect Secret in a long-lived process): load it again
        _SCHEMES.clear()
        scheme, key = build_scheme(s, key_loader=key_loader)
        fp = key.fingerprint if key is not None else None
        _SCHEMES[sk] = (scheme, fp)
    if c.fingerprint and fp != c.fingerprint:
        raise PrepareError(f"the key behind {s.key_ref} changed while this run was going on (fingerprint "
                           f"{fp}, planned with {c.fingerprint}); run prepare again")
    return dataclasses.asdict(run_chunk(s, c, source=source, scheme=scheme))


class ChunkPool:
    """A pool of worker processes (spawned, so it is safe next to threads) that run chunks.

    Started once per run, ideally while other start-up work goes on (e.g. Prefect's API server),
    it keeps each worker's opened source and key schedule warm across chunks."""

    def __init__(self, workers: int | None = None, settings: dict | None = None):
        """``settings``: open their source in each worker while it waits (no key is loaded)."""
        import multiprocessing as mp
        import os
        from concurrent.futures import ProcessPoolExecutor

        n = workers or len(os.sched_getaffinity(0))
        self.ex = ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"))
        for _ in range(n):
            self.ex.submit(_warm_up, settings)

    def run(self, settings: dict, spec: dict) -> dict:
        return self.ex.submit(run_chunk_cached, settings, spec).result()

    def close(self, wait: bool = True):
        """Stop the workers; ``wait=False`` lets them exit while the caller goes on (they are
        joined at interpreter exit)."""
        self.ex.shutdown(wait=wait, cancel_futures=True)


def _warm_up(settings: dict | None) -> None:
    from . import codecs, schemes, shards, sources  # noqa: F401 - import cost paid once per worker
    import simplejpeg  # noqa: F401

    if settings:
        try:
            source = cached_source(Settings(**settings))
            for split in source.splits:  # sorted listings and their tokens, checked by every chunk
                source.split_token(split)
        except Exception:  # noqa: BLE001 - a bad source is reported by the run itself, with its name
            pass
