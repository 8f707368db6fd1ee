"""The prepare job (no Prefect here): source -> chunks -> encrypt -> encode -> shards -> manifest.

    from etc_data import PrepareConfig, prepare_dataset
    summary = prepare_dataset(PrepareConfig(source=["train.zip"], out="s3://b/ds", dataset="c10",
                                            key_ref="owner.key", scheme="etc", block_size=16))

Plan -> run -> commit:

- ``plan_split`` decides, per split, which source items still need sharding (incremental ingest:
  items whose stable sample key is already in the committed dataset are skipped), puts them in a
  seeded random order and cuts them into chunks, one shard each;
- ``run_chunk`` does one chunk end to end (load, encrypt with the owner's key, encode, write the
  shard atomically) and returns only public metadata. Chunks run in this process, in a
  ``WorkerPool`` of local processes, or wherever ``map_chunks`` sends them (the Prefect flow: one
  task per chunk, on threads or a Dask cluster);
- ``commit_split`` writes the manifest last, signed with the owner key (also for ``plain``
  datasets: the signature is the owner's identity); it is the commit point, after which shards
  that the manifest does not list (leftovers of a killed run) are removed. It first checks that the
  manifest it replaces is the one the run planned from (optimistic concurrency). An append only
  continues a split signed by the same owner.

One writer per dataset: a run holds ``locks.dataset_lock`` on its output from planning to the
commit, so a second run into the same output is refused with an error naming the holder (a killed
run's lock never blocks: see ``locks``).

A chunk receives a *key reference* (a path or ``env:NAME``), never the key: the key is loaded
where the encryption happens, so no key material travels through task parameters or results.
The same input, key and arguments always give byte-identical shards (deterministic plans, tar
layout and codecs), which is what makes a rerun after SIGKILL end with the same manifest.

Shards are written for streaming: a reader that takes the shards and their samples in order, with
no shuffling of its own, still sees every class in every batch. The items a run adds are ranked by
a keyed hash of their sample key (the hash key derives from the dataset id and the split), so the
order is random-looking across and within shards, yet a pure function of the keys: a rerun, a
resumed run and a run on another machine plan the same shards. An append orders its new items the
same way among its new shards. ``--limit N`` takes a stratified sample (every class in proportion),
the first N of a fixed per-split order, so a larger limit later appends to a smaller one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from . import __version__
from .codecs import DEFAULT_CODEC, check_scheme_codec, get_codec
from .errors import EtcError
from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageLimits
from .locks import dataset_lock
from .manifest import Manifest, ManifestMissing, manifest_url, read_manifest, read_sample_index, write_manifest
from .card import write_dataset_card
from .readers import ReaderWarning, reader_warning, write_wids_descriptor
from .schemes import MIN_KEY_BITS, WeakKeyWarning, make_scheme, parse_scheme_spec, weak_key_message
from .shards import ShardStream, sample_files_maker
from .sources import BAD_IMAGE_POLICIES, Source, open_source
from .storage import join
from .trust import TrustPolicy
from .verify import remove_leftovers

if TYPE_CHECKING:  # annotations only
    from .workers import WorkerPool

DEFAULT_SHARD_SIZE = 10000
POOL_MIN_IMAGES = 4000  # with workers=None, fewer images than this run in-process (a pool's start costs ~1 s)
# With workers=None, machines with fewer cores run chunks in this process on threads (ChunkThreads):
# decoding, encryption and encoding release the GIL, and what holds it (zip reads, tar members) is
# about a third of the work at 32 px and a few percent at 224 px, so threads start nothing, re-read
# nothing and leave no core idle at the end; except for large runs (SMALL_POOL_MIN_IMAGES and 2+
# chunks), where threads lose ~10 % to the GIL, and more inside a Prefect flow, whose own threads
# want it too (2 cores: the CLI on 39,400 images at 224 px 16.5 s with 2 worker processes against
# 17.9-21.2 s on threads, on CIFAR-10's 60,000 9.3-9.6 s against 10.9-11.1 s; the library alone
# 10.4-11.0 s against 10.8-12.1 s and 3.8-4.2 s against 4.0-4.7 s).
POOL_MIN_CORES = 5
SMALL_POOL_MIN_IMAGES = 20000


class PrepareError(EtcError):
    """The prepare step cannot proceed (message names the split, shard or setting)."""


@dataclass
class PrepareConfig:
    """Everything a prepare run needs. Public: safe for logs and Prefect parameters (the key is a
    *reference*: a path, ``env:NAME`` or, in flows, ``prefect-secret:BLOCK``)."""

    source: str | list[str]
    out: str
    dataset: str = ""            # dataset id (selects the per-dataset subkey); "" = from the source name
    scheme: str = "etc"
    block_size: int | None = None
    codec: str = DEFAULT_CODEC
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
    workers: int | None = None   # local worker processes: None = one per core for large runs, 1 = in this process
    verify: bool = True          # check every written split against its manifest after the commit
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # a source image past this (from its header) is a bad image
    max_image_bytes: int = DEFAULT_MAX_BYTES    # so is an image file or archive member past this

    def check(self) -> None:
        """Refuse settings no run can use, naming the field, and key material passed as the key reference."""
        from .keys import check_key_ref

        check_key_ref(self.key_ref)
        for name in ("shard_size", "max_shard_bytes", "limit", "resize", "workers", "max_image_pixels",
                     "max_image_bytes"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise PrepareError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise PrepareError(f"on-bad-image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {self.on_bad_image!r}")
        if not self.out:
            raise PrepareError("out (the dataset root URL) is required")

    def open_source(self) -> Source:
        return open_source(self.source, resize=self.resize,
                           limits=ImageLimits(self.max_image_pixels, self.max_image_bytes))

    def scheme_name(self) -> str:
        return parse_scheme_spec(self.scheme)[0]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ChunkSpec:
    split: str
    index: int           # shard index of the chunk
    items: list[int]     # positions in the split's sorted item list, in the order they are written
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
    existing_index: dict[str, list[str]]


def signing_key(cfg: PrepareConfig, key_loader=None):
    """The owner key every manifest of the run is signed with (also for ``--scheme plain``)."""
    from .keys import key_env_var, load_key

    name = key_env_var(cfg.key_ref)
    if name is not None and not os.environ.get(name):
        raise PrepareError(f"prepare signs every manifest with the owner's key: give --key (a key file or env:NAME; "
                           f"${name} is not set), also for --scheme plain")
    return (key_loader or load_key)(cfg.key_ref)


def build_scheme(cfg: PrepareConfig, key=None, key_loader=None):
    """The keyed scheme of a config, and the owner key it was built with (None for plain)."""
    name = cfg.scheme_name()
    if name != "plain" and key is None:
        from .keys import load_key

        key = (key_loader or load_key)(cfg.key_ref)
    return make_scheme(cfg.scheme, key=key, dataset=cfg.dataset, block_size=cfg.block_size, pad=cfg.pad), key


def dataset_id(source: Source, given: str | None) -> str:
    ds = given or re.sub(r"[^A-Za-z0-9_.\-]", "_", source.name)
    if not ds:
        raise PrepareError("dataset id is empty: pass --dataset")
    return ds


def _next_index(m: Manifest | None) -> int:
    if not m or not m.shards:
        return 0
    return max(int(re.match(r".*-(\d{6})(?:-\d+)?\.tar$", e["name"]).group(1)) for e in m.shards) + 1


def check_compatible(m: Manifest, cfg: PrepareConfig, fingerprint: str | None, codec_spec: str, where: str) -> None:
    """An append must use the dataset's own settings; anything else would mix two datasets."""
    name = cfg.scheme_name()
    scheme = make_scheme(cfg.scheme, subkey=b"\0" * 32, block_size=cfg.block_size, pad=cfg.pad) if name != "plain" \
        else make_scheme("plain")
    want = {"scheme": name, "block_size": scheme.block_size, "codec": codec_spec, "key_fingerprint": fingerprint,
            "dataset": cfg.dataset, "scheme_options": scheme.params()["options"]}
    have = {"scheme": m.scheme, "block_size": m.block_size, "codec": m.codec, "key_fingerprint": m.key_fingerprint,
            "dataset": m.dataset, "scheme_options": m.scheme_options}
    diff = [k for k in want if want[k] != have[k]]
    if diff:
        shown = ", ".join(f"{k}: dataset has {have[k]!r}, this run {want[k]!r}" for k in diff)
        raise PrepareError(f"{where} already holds a dataset made with other settings ({shown}); "
                           f"write to another --out or use the same settings")


def plan_split(cfg: PrepareConfig, source: Source, split: str, fingerprint: str | None, codec_spec: str,
               trust=None) -> SplitPlan:
    """``trust``: whose committed split may be appended to (the run's own owner key)."""
    split_url = join(cfg.out, split)
    existing, index = None, {}
    try:
        existing = read_manifest(split_url, cfg.storage_options, trust)
    except ManifestMissing:
        pass  # a new split
    if existing is not None:
        check_compatible(existing, cfg, fingerprint, codec_spec, split_url)
        index = read_sample_index(split_url, existing, cfg.storage_options)
    done = {k for v in index.values() for k in v}
    items = source.items(split)
    # Sources list items sorted by key, i.e. class by class for <split>/<class>/<file> layouts: written
    # in that order every shard would hold one class and a reader's shuffle buffer could not mix them.
    rank = shuffle_rank(cfg.dataset, split)
    chosen = range(len(items)) if cfg.limit is None else stratified_limit(items, cfg.limit, rank)
    todo = sorted((i for i in chosen if items[i].key not in done), key=lambda i: rank(items[i].key))
    start = _next_index(existing)
    token = source.split_token(split)
    chunks = [ChunkSpec(split, start + n, todo[i:i + cfg.shard_size], token, fingerprint)
              for n, i in enumerate(range(0, len(todo), cfg.shard_size))]
    return SplitPlan(split, len(chosen), chunks, existing, index)


SHUFFLE_CONTEXT = b"etc-data sample order v1\0"
SAMPLE_ORDER = {"shuffle": "seeded", "seed_from": ["dataset", "split"],
                "method": "each run's new samples sorted by blake2b-64 of the sample key, keyed with "
                          "sha256('etc-data sample order v1' NUL dataset NUL split)",
                "scope": "across and within the shards a run writes; an append orders its new samples "
                         "among its new shards"}


def shuffle_rank(dataset: str, split: str) -> Callable[[str], bytes]:
    """The sort key of the seeded sample order of one split: a keyed hash of the sample key (its
    bytes compare like a uniform random number). Public and reproducible: it hides nothing, and
    must not: it only mixes the classes."""
    seed = hashlib.sha256(SHUFFLE_CONTEXT + f"{dataset}\0{split}".encode()).digest()

    def rank(key: str) -> bytes:
        return hashlib.blake2b(key.encode(), key=seed, digest_size=8).digest() + key.encode()
    return rank


def stratified_limit(items: list, limit: int, rank: Callable[[str], bytes]) -> list[int]:
    """Positions of ``limit`` items spread over the classes in proportion to their sizes (each
    class within one item of its share). The items of each class are taken in ``rank`` order, the
    k-th of a class of n sits at (k + 0.5) / n in one merged order, and the first ``limit`` of that
    order are chosen: a larger limit selects a superset (appends stay appends)."""
    by_class: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_class.setdefault(it.label, []).append(i)
    merged = []
    for members in by_class.values():
        ranked = sorted((rank(items[i].key), i) for i in members)
        n = len(ranked)
        merged += [((k + 0.5) / n, r, i) for k, (r, i) in enumerate(ranked)]
    merged.sort()
    return sorted(i for _, _, i in merged[:limit])


STREAM_BATCH = 8  # images of a chunk's first batch; then STREAM_BYTES of decoded pixels a batch (8 to 256 images)
STREAM_BYTES = 1 << 20  # a batch decoded, encrypted and encoded while it is still in the core's cache


def stream_batch(image_bytes: int) -> int:
    """Images per batch once the decoded size of one image is known: about ``STREAM_BYTES`` of
    pixels (a 224 px image is 150 KB: 8 images; a 32 px one 3 KB: 256 images, which spreads the
    per-batch overhead), so memory is bounded and the pixels are still cached when encrypted."""
    return max(STREAM_BATCH, min(256, STREAM_BYTES // max(1, image_bytes)))


def _bounded_map(fn, items: Iterable, threads: int, executor=None):
    """``map(fn, items)`` in order, on ``threads`` threads (of ``executor`` when given, e.g. one
    shared by the chunks that run side by side in a process) with at most threads + 1 results
    pending (reads, decoding, numpy and the codecs release the GIL), so memory stays bounded.
    ``items`` may be a generator: it is advanced only as results are taken."""
    if threads <= 1 and executor is None:
        yield from map(fn, items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    own = ThreadPoolExecutor(threads) if executor is None else None
    ex = executor or own
    pending = deque()
    try:
        for x in items:
            pending.append(ex.submit(fn, x))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        if own is not None:
            own.shutdown(wait=True, cancel_futures=True)


def run_chunk(cfg: PrepareConfig, spec: ChunkSpec, source: Source, scheme, threads: int = 1,
              executor=None, stop: threading.Event | None = None) -> ChunkResult:
    """Load, encrypt, encode and write one chunk as one shard (or parts past the byte limit),
    streamed: batches of about ``STREAM_BYTES`` of pixels (spread over ``threads`` threads, or over
    those of ``executor``) go into a tar that is hashed and written as it grows, so memory is bounded
    whatever the shard size; then (``cfg.verify``) each shard is read back and checked. ``stop``
    (set by a chunk that failed beside this one) ends it between batches, nothing of its shard
    committed."""
    codec = get_codec(cfg.codec)
    if spec.token and source.split_token(spec.split) != spec.token:
        raise PrepareError(f"source {source.name}, split {spec.split}: changed since this run was planned "
                           f"(chunk {spec.index}); run prepare again")
    all_items = source.items(spec.split)
    items = [all_items[i] for i in spec.items]  # the plan's order is the tar's member order
    where = f"{spec.split} chunk {spec.index}"

    def work(part):
        batch = source.load(part, on_bad_image=cfg.on_bad_image)
        if not batch.keys:
            return batch, None
        return batch, codec.encode_many(scheme.encrypt(batch.images, item=where))

    stream = ShardStream(join(cfg.out, spec.split), "", None, cfg.max_shard_bytes, cfg.storage_options,
                         split=spec.split, index=spec.index, order="given")
    files = sample_files_maker(codec.ext, spec.split)
    skipped, size, payload = [], None, 0

    def parts():  # the batch size follows the first batch's image size
        i = 0
        while i < len(items):
            n = STREAM_BATCH if size is None else stream_batch(size[0] * size[1] * 3)
            yield items[i:i + n]
            i += n
    with warnings.catch_warnings(), stream:
        warnings.simplefilter("ignore", WeakKeyWarning)  # warned once by the caller, not per chunk
        for batch, blobs in _bounded_map(work, parts(), threads, executor):
            if stop is not None and stop.is_set():  # another chunk of the run failed: this shard is abandoned
                raise PrepareError(f"{where}: stopped because another chunk of this run failed")
            skipped += batch.skipped
            if blobs is None:
                continue
            shape = list(batch.images.shape[1:3])
            if size is None:
                size = shape
            elif shape != size:
                raise PrepareError(f"{where}: image {batch.keys[0]} is {shape[1]}x{shape[0]}, the chunk's first images "
                                   f"are {size[1]}x{size[0]}; choose a resize policy (--resize)")
            stream.add_many([(k, files(k, b, y)) for k, b, y in zip(batch.keys, blobs, batch.labels.tolist())])
            payload += sum(len(b) for b in blobs)
    shards = [dict(x.entry(), keys=x.keys) for x in stream.shards]
    if cfg.verify:  # read each shard back now, beside the other chunks' work (verify_dataset then only stats it)
        from .verify import check_shard

        for e in shards:
            problem, _ = check_shard(join(cfg.out, spec.split), e, size, storage_options=cfg.storage_options,
                                     whole=False)
            if problem:
                raise PrepareError(f"{where}: shard {e['name']} was written but reading it back failed: {problem}")
    return ChunkResult(spec.split, spec.index, shards, skipped, size or [], payload)


class ChunkRunner:
    """Runs planned chunks in one process (from any number of its threads), keeping the opened
    source and the key schedule between chunks. Before trusting them it checks the chunk's split token (a source that
    grew since it was opened is reopened) and the planner's key fingerprint (a key rotated behind
    the same reference, in a long-lived process, is loaded again)."""

    def __init__(self, key_loader: Callable | None = None, threads: int = 1, executor=None):
        self.key_loader = key_loader
        self.threads, self.executor = threads, executor  # a chunk's batches run on these threads
        self._source: Source | None = None
        self._source_id = None
        self._scheme = None
        self._scheme_id = None
        self._fingerprint: str | None = None
        self._lock = threading.Lock()

    def adopt(self, cfg: PrepareConfig, source: Source, scheme, fingerprint: str | None) -> "ChunkRunner":
        """Start from what the planner already opened (chunks run in the planner's process)."""
        self._source, self._source_id = source, (repr(cfg.source), cfg.resize)
        self._scheme, self._scheme_id, self._fingerprint = scheme, self._scheme_key(cfg), fingerprint
        return self

    def adopt_source(self, cfg: PrepareConfig, source: Source) -> "ChunkRunner":
        """Start from ``cfg``'s source opened elsewhere (a worker receives the planner's)."""
        with self._lock:
            self._source, self._source_id = source, (repr(cfg.source), cfg.resize)
        return self

    @staticmethod
    def _scheme_key(cfg: PrepareConfig):
        return cfg.scheme, cfg.block_size, cfg.pad, cfg.dataset, cfg.key_ref

    def source(self, cfg: PrepareConfig, token: str = "", split: str = "") -> Source:
        sid = (repr(cfg.source), cfg.resize)
        with self._lock:  # threads share the runner: one of them opens, the others wait for it
            if self._source is None or self._source_id != sid or (token and self._source.split_token(split) != token):
                self._source, self._source_id = None, None
                self._source, self._source_id = cfg.open_source(), sid
            return self._source

    def scheme(self, cfg: PrepareConfig, fingerprint: str | None = None):
        sid = self._scheme_key(cfg)
        with self._lock:
            if self._scheme is None or self._scheme_id != sid or (fingerprint and self._fingerprint != fingerprint):
                self._scheme, key = build_scheme(cfg, key_loader=self.key_loader)
                self._scheme_id, self._fingerprint = sid, (key.fingerprint if key is not None else None)
        if fingerprint and self._fingerprint != fingerprint:
            raise PrepareError(f"the key given with --key changed while this run was going on (fingerprint "
                               f"{self._fingerprint}, planned with {fingerprint}); run prepare again")
        return self._scheme

    def warm(self, cfg: PrepareConfig) -> None:
        """Open the source and build its sorted listings and split tokens (no key is loaded)."""
        source = self.source(cfg)
        for split in source.splits:
            source.split_token(split)

    def run(self, cfg: PrepareConfig, spec: ChunkSpec, stop: threading.Event | None = None) -> ChunkResult:
        source = self.source(cfg, spec.token, spec.split)
        return run_chunk(cfg, spec, source, self.scheme(cfg, spec.fingerprint), self.threads,
                         self.executor, stop)


class ChunkThreads:
    """Chunks run side by side on threads of this process: one ``ChunkRunner`` (the source opened
    and the key loaded once) and one executor of ``threads`` threads for the batches of all of them,
    so the cores stay busy whichever chunks are left, and one chunk's shard commit (the fsync) or
    its writing overlaps the others' decoding and encoding. Used by ``prepare_dataset`` for runs
    that ``pool_size`` keeps in this process, and by the flow's task threads. ``stop`` is set when a
    chunk fails: the others end at their next batch, committing nothing."""

    def __init__(self, threads: int = 1, key_loader: Callable | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.threads = max(1, threads)
        self.executor = ThreadPoolExecutor(self.threads, thread_name_prefix="etc-data-batch") if self.threads > 1 else None
        self.runner = ChunkRunner(key_loader, self.threads, self.executor)
        self.stop = threading.Event()

    def run(self, cfg: PrepareConfig, spec: ChunkSpec) -> ChunkResult:
        """One chunk (from any thread, e.g. Prefect's task threads, which retry failed chunks)."""
        return self.runner.run(cfg, spec, self.stop)

    def map(self, cfg: PrepareConfig, specs: list[ChunkSpec]) -> Iterator[ChunkResult]:
        """Run ``specs`` with up to ``threads`` chunks side by side; results as each finishes. The
        first failure stops the others and is raised once they have ended."""
        if len(specs) <= 1 or self.threads <= 1:
            for spec in specs:
                yield self.run(cfg, spec)
            return
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        with ThreadPoolExecutor(min(self.threads, len(specs)), thread_name_prefix="etc-data-chunk") as drivers:
            pending = {drivers.submit(self.run, cfg, spec) for spec in specs}
            finished = False
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for f in done:
                        yield f.result()
                finished = True
            finally:  # a failure, or the caller stopped: chunks not started never start, running ones end
                if not finished:
                    self.stop.set()
                    for f in pending:
                        f.cancel()

    def close(self) -> None:
        self.stop.set()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)


def commit_split(cfg: PrepareConfig, source: Source, plan: SplitPlan, results: list[ChunkResult],
                 fingerprint: str | None, codec_spec: str, scheme_params: dict, key, trust: TrustPolicy) -> Manifest:
    """Write the sample index and manifest.json (the commit point, signed with the owner key
    ``key``; ``trust`` accepts the manifest it replaces), then remove unlisted shards and write the
    split's wids descriptor."""
    split_url = join(cfg.out, plan.split)
    check_planned(split_url, plan.existing, cfg.storage_options, trust)
    results = sorted(results, key=lambda r: r.index)
    old = plan.existing
    sizes = {tuple(r.image_size) for r in results if r.image_size}
    if old is not None:
        sizes.add(tuple(old.image_size))
    if len(sizes) > 1:
        raise PrepareError(f"split {plan.split}: images of different sizes {sorted(sizes)}; choose --resize")
    shards = list(old.shards) if old else []
    index = dict(plan.existing_index)
    for r in results:
        for e in r.shards:
            shards.append({k: e[k] for k in ("name", "sha256", "bytes", "samples")})
            index[e["name"]] = e["keys"]
    if not shards:
        raise PrepareError(f"split {plan.split}: no images were written (all unreadable or the split is empty)")
    m = Manifest(split=plan.split, dataset=cfg.dataset, scheme=scheme_params["scheme"],
                 block_size=scheme_params["block_size"], scheme_options=scheme_params["options"],
                 pad=scheme_params["pad"], codec=codec_spec, key_fingerprint=fingerprint,
                 classes=list(source.classes), image_size=list(next(iter(sizes))), shards=shards,
                 source=source.description, resize=source.resize_policy(), tool_version=__version__,
                 sample_order=dict(SAMPLE_ORDER))
    write_manifest(split_url, m, sample_index=index, storage_options=cfg.storage_options, key=key)
    remove_leftovers(split_url, {e["name"] for e in shards}, cfg.storage_options)  # also when nothing was new
    write_wids_descriptor(split_url, m, cfg.storage_options)
    return m


@dataclass
class PrepareSummary:
    dataset: str
    out: str
    manifests: dict[str, Manifest]
    written: dict[str, int]        # samples written by this run, per split
    skipped: dict[str, list[str]]  # unreadable images skipped, per split
    payload_bytes: dict[str, int]  # encoded image bytes written by this run, per split
    key_bits: float | None
    image_size: list[int] | None
    verified: dict[str, int] = field(default_factory=dict)  # samples checked per split (verify=True)
    reader_warning: str | None = None  # the codec is not decodable by Pillow-based readers (readers.reader_warning)

    def rows(self) -> list[dict]:
        """One public row per split: what a table artifact, a log line or a report shows."""
        out = []
        for split, m in self.manifests.items():
            on_disk = m.num_bytes
            out.append({"split": split, "samples": m.num_samples, "new": self.written[split], "shards": len(m.shards),
                        "bytes": on_disk, "bytes_per_image": round(on_disk / max(1, m.num_samples), 1),
                        "new_payload_bytes": self.payload_bytes[split],
                        "payload_per_image": round(self.payload_bytes[split] / max(1, self.written[split]), 1),
                        "skipped": len(self.skipped[split])})
        return out

    def weak_key_message(self) -> str | None:
        """The loud key-space warning, when the configuration is below MIN_KEY_BITS."""
        m0 = next(iter(self.manifests.values()))
        if self.key_bits is None or self.key_bits >= MIN_KEY_BITS:
            return None
        return weak_key_message(m0.scheme, self.key_bits, *m0.image_size, m0.block_size)

    def lines(self) -> list[str]:
        out = []
        for r in self.rows():
            m = self.manifests[r["split"]]
            out.append(f"{r['split']}: {r['samples']} samples in {r['shards']} shards ({r['bytes'] / 1e6:.1f} MB), "
                       f"{r['new']} new; scheme {m.scheme} block {m.block_size}, codec {m.codec}, "
                       f"key {m.key_fingerprint or '-'}")
            skipped = self.skipped.get(r["split"])
            if skipped:
                out.append(f"{r['split']}: skipped {len(skipped)} unreadable images: " + ", ".join(skipped[:10])
                           + (" ..." if len(skipped) > 10 else ""))
        from .keys import fingerprint

        for pub in sorted({m.public_key for m in self.manifests.values()}):
            out.append(f"manifests signed by {pub} (key fingerprint {fingerprint(pub)}); readers pin it with --trust")
        return out

    def markdown(self) -> str:
        rows = ["| split | samples | new | shards | MB on disk | bytes/img on disk | image bytes/img (new) |",
                "|---|---|---|---|---|---|---|"]
        for r in self.rows():
            rows.append(f"| {r['split']} | {r['samples']} | {r['new']} | {r['shards']} | {r['bytes'] / 1e6:.2f} | "
                        f"{r['bytes_per_image']:.0f} | {r['payload_per_image']:.0f} |")
        m0 = next(iter(self.manifests.values()))
        head = (f"# etc-data prepare: {self.dataset}\n\nOutput `{self.out}`; scheme `{m0.scheme}` block "
                f"{m0.block_size}; codec `{m0.codec}`; key fingerprint `{m0.key_fingerprint or '-'}`; image size "
                f"{m0.image_size}.\n\nOn-disk bytes include the tar headers and each sample's `.cls` and `.json` "
                f"members (about 3 KB per sample); image bytes are the encoded images alone.\n\n")
        warn = self.weak_key_message()
        return head + "\n".join(rows) + (f"\n\n**{warn}**\n" if warn else "")

    def to_public(self) -> dict:
        """A JSON-able summary with no key material (what a flow returns)."""
        m0 = next(iter(self.manifests.values()))
        return {"dataset": self.dataset, "out": self.out, "lines": self.lines(), "rows": self.rows(),
                "scheme": m0.scheme, "block_size": m0.block_size, "key_bits": self.key_bits,
                "image_size": self.image_size, "weak_key_message": self.weak_key_message(),
                "splits": {k: v.num_samples for k, v in self.manifests.items()}, "verified": self.verified,
                "public_key": m0.public_key, "reader_warning": self.reader_warning}


MapChunks = Callable[[PrepareConfig, list[ChunkSpec]], Iterable[ChunkResult]]


def prepare_dataset(cfg: PrepareConfig, *, progress: Callable[[ChunkResult], None] | None = None,
                    pool: "WorkerPool | None" = None, map_chunks: MapChunks | None = None,
                    key_loader: Callable | None = None, source: Source | None = None) -> PrepareSummary:
    """Encrypt, compress and shard a dataset; commit a manifest per split; verify what was written.

    Chunks run in ``pool`` when given, else in a ``WorkerPool`` of ``cfg.workers`` processes (one
    per core by default; ``workers=1`` or a single chunk: in this process), or wherever
    ``map_chunks(cfg, specs) -> iterable of ChunkResult`` sends them (the Prefect flow's tasks).
    ``progress(result)`` is called as each chunk finishes; ``key_loader(ref)`` resolves the key
    reference (default: a path or env:NAME). ``source``: ``cfg.open_source()`` when the caller
    already opened it (the CLI does, to start its workers early).

    A pool of this function's own starts before the source is listed when the entries its zip files
    declare already make a run large enough (``_pool_before_listing``), else as soon as the source
    is open if the run will want one (``planned_pool_size``): its processes start while the source
    is listed and the run planned, and receive the listing instead of listing it again; it is
    stopped unused when the listing or the plan shows a smaller run."""
    cfg.check()
    local = pool is None and map_chunks is None and key_loader is None
    own = None  # the worker pool this call started, if any: stopped at once when anything fails
    try:
        if local and source is None:
            own = _pool_before_listing(cfg)
        source = source or cfg.open_source()
        cfg = dataclasses.replace(cfg, dataset=dataset_id(source, cfg.dataset))
        codec = get_codec(cfg.codec)
        owner = signing_key(cfg, key_loader)
        scheme, key = build_scheme(cfg, key=owner if cfg.scheme_name() != "plain" else None)
        check_scheme_codec(scheme, codec)
        compat = reader_warning(codec)
        if compat:
            warnings.warn(compat, ReaderWarning, stacklevel=2)
        fingerprint = key.fingerprint if key is not None else None
        trust = TrustPolicy.from_refs(key=owner)
        splits = cfg.splits or source.splits
        for sp in splits:
            if sp not in source.splits:
                raise PrepareError(f"source {source.name} has no split {sp!r}; it has: {', '.join(source.splits)}")
        if local:
            own = _pool_for_source(cfg, source, own)
        with dataset_lock(cfg.out, cfg.storage_options) as lock:  # one writer per dataset, planning to commit
            plans = [plan_split(cfg, source, sp, fingerprint, codec.spec, trust) for sp in splits]
            specs = [c for p in plans for c in p.chunks]
            if own is not None and pool_size(cfg, specs) == 0:  # less to do than counted (chunks written before)
                own.terminate()
                own = None
            results = _run_chunks(cfg, specs, source, scheme, fingerprint, pool or own, progress, map_chunks,
                                  key_loader)
            if own is not None:
                own.close(wait=False)
                own = None
            lock.check()
            manifests, written, skipped, payload = {}, {}, {}, {}
            for p in plans:
                rs = [r for r in results if r.split == p.split]
                manifests[p.split] = commit_split(cfg, source, p, rs, fingerprint, codec.spec, scheme.params(), owner,
                                                  trust)
                written[p.split] = sum(e["samples"] for r in rs for e in r.shards)
                skipped[p.split] = [x for r in rs for x in r.skipped]
                payload[p.split] = sum(r.payload_bytes for r in rs)
            write_dataset_card(cfg.out, cfg.storage_options, trust)  # once, over every committed split
            remove_root_leftovers(cfg.out, cfg.storage_options)
        size = next(iter(manifests.values())).image_size if manifests else None
        bits = scheme.key_space_bits(*size) if (size and scheme.keyed) else None
        summary = PrepareSummary(cfg.dataset, cfg.out, manifests, written, skipped, payload, bits, size,
                                 reader_warning=compat)
        if cfg.verify:
            from .verify import VerifyConfig, verify_dataset

            read_back = {sp: [e for r in results if r.split == sp for e in r.shards] for sp in manifests}
            result = verify_dataset(VerifyConfig(url=cfg.out, splits=list(manifests), storage_options=cfg.storage_options,
                                                 trust=[owner.public_key], read_back=read_back))
            if not result.ok:
                raise PrepareError(f"verification of {cfg.out} failed after the commit:\n" + "\n".join(result.lines()))
            summary.verified = {r.split: r.samples for r in result.reports}
        return summary
    except BaseException:
        if own is not None:
            own.terminate()
        raise


def _pool_before_listing(cfg: PrepareConfig) -> "WorkerPool | None":
    """Worker processes started before the source is even listed, when the entries its zip files
    declare (``estimated_images``) already make a run that ``pool_size`` gives a pool: they start
    (a Python and its imports: ~0.4 s) while this process lists the source, then receive the
    listing (``_pool_for_source``). None when the count needs the listing, or with a ``limit``."""
    if cfg.limit is not None:
        return None
    from .sources import estimated_images

    n = estimated_images(cfg.source)
    workers = _pool_for(cfg, n, -(-n // cfg.shard_size)) if n else 0
    if not workers:
        return None
    from .workers import WorkerPool

    return WorkerPool(workers, warm=cfg, source_follows=True)


def _pool_for_source(cfg: PrepareConfig, source: Source, early: "WorkerPool | None") -> "WorkerPool | None":
    """The run's own pool once its source is open, when ``planned_pool_size`` wants one: the
    early pool, handed the listing (or stopped when the listing shows a smaller run), or one
    started now with it; the workers start and read the listing while the run is planned."""
    workers = planned_pool_size(cfg, source)
    if early is not None and early.size != workers:
        early.terminate()
        early = None
    if early is not None:
        early.share_source(source)
        return early
    if not workers:
        return None
    from .workers import WorkerPool

    return WorkerPool(workers, warm=cfg, source=source)


def _run_chunks(cfg, specs, source, scheme, fingerprint, pool, progress, map_chunks, key_loader) -> list[ChunkResult]:
    """Every planned chunk, through ``map_chunks`` when given, else locally; ``progress`` as each ends."""
    chunks = map_chunks(cfg, specs) if map_chunks is not None else \
        _local_chunks(cfg, specs, source, scheme, fingerprint, pool, key_loader)
    results = []
    try:
        for r in chunks:
            results.append(r)
            if progress:
                progress(r)
    finally:
        getattr(chunks, "close", lambda: None)()  # a generator stopped early cleans up now (its pool)
    return results


def remove_root_leftovers(root: str, storage_options: dict | None = None) -> None:
    """Temporary files a killed run left at the dataset root (``._info.json.*.part``); only called
    under the dataset lock, so no other writer's temporary file is in flight."""
    remove_leftovers(root, set(), storage_options,
                     leftover=lambda name, _listed: name.startswith(".") and name.endswith(".part"))


def check_planned(split_url: str, planned: Manifest | None, storage_options: dict | None = None,
                  trust: TrustPolicy | None = None) -> None:
    """Optimistic concurrency: the manifest a commit replaces must still be the one it planned from."""
    try:
        current = read_manifest(split_url, storage_options, trust)
    except ManifestMissing:
        current = None
    if (current and current.to_dict()) != (planned and planned.to_dict()):
        raise PrepareError(f"{manifest_url(split_url)} changed since this run planned (another writer committed "
                           f"there); nothing of this split was committed, run prepare again")


def use_worker_pool(cfg: PrepareConfig) -> bool:
    """Whether a run of this configuration will want local worker processes whatever its size
    (``workers`` > 1, or ``None`` on a machine with at least ``POOL_MIN_CORES`` cores): the CLI
    then starts them before planning, while Prefect's API boots. ``pool_size`` decides per run."""
    from .codecs import default_workers

    return cfg.workers > 1 if cfg.workers is not None else default_workers() >= POOL_MIN_CORES


def pool_before_planning(cfg: PrepareConfig, source: Source | None = None) -> bool:
    """Whether to start the worker processes before the run is planned (the CLI does, while
    Prefect's API boots): ``use_worker_pool``, or a source (``source``: ``cfg``'s, opened; else
    opened here) large enough for ``pool_size`` to want a pool on this machine."""
    cfg.check()
    return use_worker_pool(cfg) or planned_pool_size(cfg, source or cfg.open_source()) > 0


def planned_pool_size(cfg: PrepareConfig, source: Source) -> int:
    """``pool_size`` of a run of ``cfg`` over ``source`` (opened) that finds nothing written yet,
    known before it is planned: each split's images (up to ``limit``) in chunks of ``shard_size``."""
    counts = [len(source.items(sp)) for sp in (cfg.splits or source.splits) if sp in source.splits]
    if cfg.limit is not None:
        counts = [min(c, cfg.limit) for c in counts]
    return _pool_for(cfg, sum(counts), sum(-(-c // cfg.shard_size) for c in counts))


def pool_size(cfg: PrepareConfig, specs: list[ChunkSpec]) -> int:
    """How many worker processes these chunks deserve: ``cfg.workers`` when given (1 = none), else
    one per core once the run is large enough to pay for starting them: ``POOL_MIN_IMAGES`` on a
    machine of ``POOL_MIN_CORES`` or more, ``SMALL_POOL_MIN_IMAGES`` on a smaller one (0 = run in
    this process, on threads)."""
    return _pool_for(cfg, sum(len(s.items) for s in specs), len(specs))


def _pool_for(cfg: PrepareConfig, images: int, chunks: int) -> int:
    if chunks < 2:
        return 0
    if cfg.workers is not None:
        return min(cfg.workers, chunks) if cfg.workers > 1 else 0
    return _pool_workers(images, chunks)


def _pool_workers(images: int, chunks: int) -> int:
    """With ``workers=None``: worker processes for a run of ``images`` in ``chunks`` (0 = threads here)."""
    from .codecs import default_workers

    cores = default_workers()
    n = min(cores, chunks)
    least = POOL_MIN_IMAGES if cores >= POOL_MIN_CORES else SMALL_POOL_MIN_IMAGES
    return n if n > 1 and images >= least else 0


def chunk_threads(side_by_side: int) -> int:
    """Threads for one chunk's batches when ``side_by_side`` chunks run at once on this machine."""
    from .codecs import default_workers

    return max(1, default_workers() // max(1, side_by_side))


def _local_chunks(cfg, specs, source, scheme, fingerprint, pool, key_loader) -> Iterator[ChunkResult]:
    """Chunks in the given pool, in a pool of our own, or in this process, as each finishes."""
    workers = pool_size(cfg, specs) if pool is None and key_loader is None else 0
    own = workers > 0
    if pool is None and not own:
        chunks = ChunkThreads(chunk_threads(1), key_loader)
        chunks.runner.adopt(cfg, source, scheme, fingerprint)
        try:
            yield from chunks.map(cfg, specs)
        finally:
            chunks.close()
        return
    from concurrent.futures import as_completed

    from .workers import WorkerPool

    pool = pool or WorkerPool(workers)
    futures = [pool.submit(cfg, spec) for spec in specs]
    try:
        for f in as_completed(futures):
            yield f.result()
    except BaseException:  # a failed chunk, or the caller stopped (GeneratorExit): nothing keeps writing
        if own:
            pool.terminate()
        else:
            pool.drain()  # chunks no worker has started never start; the run fails with the first error
        raise
    if own:
        pool.close()
