"""The ``prepare`` flow: source -> one task per shard (encrypt, encode, write) -> manifest last -> artifacts."""

from __future__ import annotations

import dataclasses
import os

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from etc_data.prepare import ChunkResult, PrepareSummary, Settings, prepare, run_chunk_cached
from etc_data.schemes import MIN_KEY_BITS, weak_key_message
from etc_data.storage import StorageError

from .keys import load_key_ref


def _storage_error(task, task_run, state) -> bool:
    """Retry only storage errors (a server restart, a dropped connection); bad input fails at once."""
    try:
        state.result()
    except StorageError:
        return True
    except Exception:  # noqa: BLE001
        return False
    return False


@task(name="shard-chunk", retries=3, retry_delay_seconds=[1, 4, 10], retry_condition_fn=_storage_error,
      cache_policy=NO_CACHE, persist_result=False, log_prints=False)
def shard_chunk(settings: dict, spec: dict) -> dict:
    """One shard: the key is loaded from its reference where the chunk runs and never leaves it."""
    if POOL is not None and not str(settings.get("key_ref") or "").startswith("prefect-secret:"):
        return POOL.run(settings, spec)  # CPU work in a warm local worker process
    return run_chunk_cached(settings, spec, key_loader=load_key_ref)


def _task_runner(workers: int | None, dask_address: str | None):
    """Dask when given a scheduler; else threads that hand the CPU work to a local process pool
    (``POOL``). Prefect's own ProcessPoolTaskRunner was measured here at ~2 s per worker start plus
    ~0.5 s per task, more than the whole CIFAR-10 job, so it is only used on request
    (ETC_DATA_TASK_RUNNER=processes)."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    n = workers or len(os.sched_getaffinity(0))
    if os.environ.get("ETC_DATA_TASK_RUNNER", "threads") == "processes":
        return ProcessPoolTaskRunner(max_workers=n)
    return ThreadPoolTaskRunner(max_workers=n)


def summary_markdown(s: Settings, summ: PrepareSummary) -> str:
    rows = ["| split | samples | new | shards | MB | bytes/img |", "|---|---|---|---|---|---|"]
    for split, m in summ.manifests.items():
        tot = sum(e["bytes"] for e in m.shards)
        rows.append(f"| {split} | {m.num_samples} | {summ.written[split]} | {len(m.shards)} | {tot / 1e6:.2f} | "
                    f"{tot / max(1, m.num_samples):.0f} |")
    m0 = next(iter(summ.manifests.values()))
    head = (f"# etc-data prepare: {s.dataset}\n\nOutput `{s.out}`; scheme `{m0.scheme}` block {m0.block_size}; "
            f"codec `{m0.codec}`; key fingerprint `{m0.key_fingerprint or '-'}`; image size {m0.image_size}.\n\n")
    warn = ""
    if summ.key_bits is not None and summ.key_bits < MIN_KEY_BITS:
        warn = "\n\n**" + weak_key_message(m0.scheme, summ.key_bits, *m0.image_size, m0.block_size) + "**\n"
    return head + "\n".join(rows) + warn


PROGRESS = None  # optional callback(ChunkResult), set by the CLI for its progress bar
POOL = None      # optional etc_data.prepare.ChunkPool: local worker processes for the chunk tasks


def run_prepare(s: Settings) -> PrepareSummary:
    """The library pipeline with one Prefect task per chunk (call inside a flow)."""

    def map_chunks(specs):
        settings = dataclasses.asdict(s)  # public settings; the key stays a reference
        futures = [shard_chunk.submit(settings, dataclasses.asdict(c)) for c in specs]
        for f in as_completed(futures):
            r = ChunkResult(**f.result())
            if PROGRESS:
                PROGRESS(r)
            yield r

    return prepare(s, map_chunks=map_chunks, key_loader=load_key_ref)


@flow(name="etc-prepare", log_prints=False, persist_result=False)
def prepare_flow(source: list[str], out: str, dataset: str | None = None, owner: str | None = None,
                 key_ref: str | None = None, scheme: str = "etc", block_size: int | None = None,
                 codec: str = "jpeg:q=85,sub=420", shard_size: int = 10000, max_shard_bytes: int | None = None,
                 limit: int | None = None, splits: list[str] | None = None, resize: int | None = None,
                 pad: str = "error", on_bad_image: str = "stop", storage_options: dict | None = None,
                 workers: int | None = None) -> dict:
    """Encrypt, compress and shard a dataset; ``key_ref`` is a reference (path, env:NAME,
    prefect-secret:BLOCK), never a key. ``workers``: local worker processes (when no Dask runner)."""
    global POOL
    s = Settings(source=source, out=out, dataset=dataset or "", scheme=scheme, block_size=block_size,
                 codec=codec, key_ref=key_ref, owner=owner, shard_size=shard_size,
                 max_shard_bytes=max_shard_bytes, limit=limit, splits=splits, resize=resize, pad=pad,
                 on_bad_image=on_bad_image, storage_options=storage_options or {})
    from etc_data.prepare import ChunkPool
    from prefect.context import get_run_context

    on_dask = type(get_run_context().task_runner).__name__ == "DaskTaskRunner"
    own_pool = POOL is None and not on_dask and (workers or len(os.sched_getaffinity(0))) > 1
    if own_pool:
        POOL = ChunkPool(workers)
    try:
        summ = run_prepare(s)
    finally:
        if own_pool:
            POOL.close()
            POOL = None
    table = []
    for split, m in summ.manifests.items():
        tot = sum(e["bytes"] for e in m.shards)
        table.append({"split": split, "samples": m.num_samples, "new": summ.written[split], "shards": len(m.shards),
                      "bytes": tot, "bytes_per_image": round(tot / max(1, m.num_samples), 1),
                      "skipped": len(summ.skipped[split])})
    create_table_artifact(table, key="prepare-sizes", description=f"etc-data prepare sizes: {s.dataset}")
    create_markdown_artifact(summary_markdown(s, summ), key="prepare-summary")
    m0 = next(iter(summ.manifests.values()))
    return {"dataset": s.dataset, "lines": summ.lines(), "scheme": m0.scheme, "block_size": m0.block_size,
            "key_bits": summ.key_bits, "image_size": summ.image_size,
            "splits": {k: v.num_samples for k, v in summ.manifests.items()}}


def make_prepare_flow(workers: int | None = None, dask_address: str | None = None):
    """The prepare flow with the task runner for these settings (threads + local pool, or Dask)."""
    return prepare_flow.with_options(task_runner=_task_runner(workers, dask_address))
