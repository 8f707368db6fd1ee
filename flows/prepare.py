"""The ``prepare`` flow: ``etc_data.prepare.prepare_dataset`` with one Prefect task per shard.

The flow body is the library's own job; only where chunks run changes: each chunk becomes a task
(named ``<split>-shard-<index>``), on Prefect's thread runner (the CPU work then goes to a warm
local ``WorkerPool``) or on a Dask cluster (``make_prepare_flow(dask_address=...)``). The summary
becomes a table and a Markdown artifact, and one line in the flow log. Artifacts are keyed by the
deployment (= the pipeline's name) when the run belongs to one, else by the dataset id: two
pipelines may write the same dataset id to different places, and Prefect's latest-by-key view
would mix them.

A run that ``etc-data serve`` started (``flows/serve.py``) ends when serve ends, even when serve is
killed: the flow asks the kernel for SIGTERM on its parent's death, which Prefect's engine turns
into a Crashed run and which stops the run's worker pool.

Run-time resources that cannot be flow parameters (a worker pool started early by the CLI, a
progress callback) are handed over with ``prepare_runtime(...)``, a context manager scoped to
the call: nothing is stored at module level.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import re
import signal
from dataclasses import dataclass
from typing import Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from etc_data.codecs import DEFAULT_CODEC, default_workers
from etc_data.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from etc_data.prepare import (DEFAULT_SHARD_SIZE, ChunkResult, ChunkSpec, ChunkThreads, PrepareConfig,
                              PrepareSummary, pool_size, prepare_dataset)
from etc_data.storage import StorageError

from .keys import SECRET_PREFIX, load_key_ref

SERVE_PID_ENV = "ETC_DATA_SERVE_PID"  # set by etc-data serve: the pid of the serving process


@dataclass
class Runtime:
    pool: object | None = None                       # an etc_data.workers.WorkerPool, started by the caller
    progress: Callable[[ChunkResult], None] | None = None
    source: tuple | None = None                      # (PrepareConfig, its source opened by the caller)

    def opened_source(self, cfg: PrepareConfig):
        """The caller's opened source when the flow runs with the same source and resize, else None."""
        if self.source is None:
            return None
        given, src = self.source
        return src if (given.source, given.resize, given.max_image_pixels, given.max_image_bytes) == \
            (cfg.source, cfg.resize, cfg.max_image_pixels, cfg.max_image_bytes) else None


_RUNTIME: contextvars.ContextVar[Runtime | None] = contextvars.ContextVar("etc_data_prepare_runtime", default=None)


@contextlib.contextmanager
def prepare_runtime(pool=None, progress: Callable[[ChunkResult], None] | None = None, source: tuple | None = None):
    """Within this block, prepare flows called from this thread use ``pool``, report to ``progress``
    and plan from ``source`` = (cfg, cfg.open_source()) when they run that configuration's source."""
    token = _RUNTIME.set(Runtime(pool, progress, source))
    try:
        yield
    finally:
        _RUNTIME.reset(token)


def _storage_error(task, task_run, state) -> bool:
    """Retry only storage errors (a server restart, a dropped connection); bad input fails at once."""
    try:
        state.result()
    except StorageError:
        return True
    except Exception:  # noqa: BLE001
        return False
    return False


@task(name="shard", task_run_name="{spec[split]}-shard-{spec[index]:06d}", retries=3,
      retry_delay_seconds=[1, 4, 10], retry_condition_fn=_storage_error, cache_policy=NO_CACHE,
      persist_result=False, log_prints=False)
def shard_chunk(cfg: dict, spec: dict, runner=None) -> dict:
    """One shard: the key is loaded from its reference where the chunk runs and never leaves it
    (without ``runner``: on a Dask worker, whose ChunkRunner keeps its source open)."""
    if runner is None:
        from etc_data.cluster import run_on_worker

        return run_on_worker(cfg, spec, load_key_ref)
    return dataclasses.asdict(runner.run(PrepareConfig(**cfg), ChunkSpec(**spec)))


def run_prepare(cfg: PrepareConfig, *, on_dask: bool = False) -> PrepareSummary:
    """``prepare_dataset`` with one task per chunk (call inside a flow run). The chunks' CPU work
    goes to the caller's pool (``prepare_runtime``), to a pool of the flow's own when the run is
    large enough (``prepare.pool_size``), or stays in the task threads; on Dask it runs on the
    cluster's workers. A key in a Prefect Secret is always loaded in the task threads."""
    rt = _RUNTIME.get() or Runtime()
    secret_ref = str(cfg.key_ref or "").startswith(SECRET_PREFIX)
    own: list = []  # the pool this run started, if any
    threads: list = []  # the batch threads of this run, if any
    opened = rt.opened_source(cfg)
    if opened is None and not on_dask:  # listed once: for the plan and for a pool's workers, which receive it
        cfg.check()
        opened = cfg.open_source()

    def map_chunks(c: PrepareConfig, specs: list[ChunkSpec]):
        runner = None  # on Dask: a runner kept on each Dask worker
        if not on_dask:
            workers = 0 if secret_ref else pool_size(c, specs)  # a Prefect Secret is only read in task threads
            if rt.pool is not None and not secret_ref:
                runner = rt.pool
            elif workers:
                from etc_data.workers import WorkerPool

                runner = WorkerPool(workers, warm=c, source=opened)
                own.append(runner)
            else:
                runner = ChunkThreads(default_workers(), load_key_ref)
                threads.append(runner)
        public = c.to_dict()  # public settings; the key stays a reference
        futures = [shard_chunk.submit(public, dataclasses.asdict(s), runner) for s in specs]
        for f in as_completed(futures):
            yield ChunkResult(**f.result())

    try:
        return prepare_dataset(cfg, map_chunks=map_chunks, progress=rt.progress, key_loader=load_key_ref,
                               source=opened)
    except BaseException as e:
        if rt.pool is not None and not isinstance(e, Exception):
            own.append(rt.pool)  # SIGTERM (Prefect's TerminationSignal), Ctrl-C: this process is stopping, so
            # do its workers, now, before Prefect reports the crash and waits for the task threads
        for p in own:
            p.terminate()
        own.clear()
        raise
    finally:
        for p in own:
            p.close()
        for t in threads:
            t.close()


def _artifact_key(name: str, kind: str) -> str:
    """``prepare-<name>-<kind>`` in the lowercase letters, digits and dashes that Prefect requires."""
    return f"prepare-{re.sub(r'[^a-z0-9-]+', '-', name.lower()).strip('-') or 'dataset'}-{kind}"


def artifact_name(dataset: str) -> str:
    """What the artifacts are keyed by: the deployment (pipeline) running this flow, else the dataset."""
    from prefect.runtime import deployment

    return deployment.name or dataset


SIZE_COLUMNS = {"split": "split", "samples": "samples", "new": "new samples", "shards": "shards",
                "bytes": "bytes on disk (tar: images + headers + cls/json)",
                "bytes_per_image": "bytes/image on disk",
                "new_payload_bytes": "encoded image bytes (new samples)",
                "payload_per_image": "encoded image bytes/image (new samples)", "skipped": "skipped images"}


def summary_line(summary: PrepareSummary) -> str:
    """The one log line of a run: per split, samples (new, shards) and bytes per image."""
    parts = ", ".join(f"{r['split']} {r['samples']} ({r['new']} new, {r['shards']} shards, "
                      f"{r['bytes_per_image']:.0f} B/image on disk"
                      + (f", {r['payload_per_image']:.0f} B/image encoded images alone" if r["new"] else "") + ")"
                      for r in summary.rows())
    return f"prepared {summary.dataset} at {summary.out}: {parts}"


def publish(summary: PrepareSummary) -> None:
    """The summary as artifacts (a table and Markdown) and one log line."""
    name = artifact_name(summary.dataset)
    rows = [{SIZE_COLUMNS.get(k, k): v for k, v in r.items()} for r in summary.rows()]
    create_table_artifact(rows, key=_artifact_key(name, "sizes"),
                          description=f"etc-data prepare sizes: {name} ({summary.dataset} at {summary.out})")
    create_markdown_artifact(summary.markdown(), key=_artifact_key(name, "summary"),
                             description=f"etc-data prepare: {name} ({summary.dataset} at {summary.out})")
    get_run_logger().info(summary_line(summary))


def _end_with_serve() -> None:
    """In a flow-run process started by ``etc-data serve``: SIGTERM when serve dies (see the docstring)."""
    from etc_data.workers import set_parent_death_signal

    if os.environ.get(SERVE_PID_ENV) == str(os.getppid()):
        set_parent_death_signal(signal.SIGTERM)
        if os.environ.get(SERVE_PID_ENV) != str(os.getppid()):  # serve died before the call
            os.kill(os.getpid(), signal.SIGTERM)


@flow(name="etc-prepare", log_prints=False, persist_result=False)
def prepare_flow(source: list[str], out: str, dataset: str | None = None, owner: str | None = None,
                 key_ref: str | None = None, scheme: str = "etc", block_size: int | None = None,
                 codec: str = DEFAULT_CODEC, shard_size: int = DEFAULT_SHARD_SIZE,
                 max_shard_bytes: int | None = None, limit: int | None = None, splits: list[str] | None = None,
                 resize: int | None = None, pad: str = "error", on_bad_image: str = "stop",
                 storage_options: dict | None = None, workers: int | None = None, verify: bool = True,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS, max_image_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Encrypt, compress and shard a dataset; ``key_ref`` is a reference (path, env:NAME,
    prefect-secret:BLOCK), never a key. ``workers``: local worker processes (when no Dask runner)."""
    from prefect.context import get_run_context

    _end_with_serve()
    cfg = PrepareConfig(source=source, out=out, dataset=dataset or "", scheme=scheme, block_size=block_size,
                        codec=codec, key_ref=key_ref, owner=owner, shard_size=shard_size,
                        max_shard_bytes=max_shard_bytes, limit=limit, splits=splits, resize=resize, pad=pad,
                        on_bad_image=on_bad_image, storage_options=storage_options or {}, workers=workers,
                        verify=verify, max_image_pixels=max_image_pixels, max_image_bytes=max_image_bytes)
    on_dask = type(get_run_context().task_runner).__name__ == "DaskTaskRunner"
    summary = run_prepare(cfg, on_dask=on_dask)
    publish(summary)
    return summary.to_public()


def make_prepare_flow(workers: int | None = None, dask_address: str | None = None):
    """The prepare flow with the task runner for these settings: Dask when given a scheduler, else
    threads that hand the CPU work to a local WorkerPool. (Prefect's ProcessPoolTaskRunner was
    measured here at ~2 s per worker start plus ~0.5 s per task, more than the whole CIFAR-10 job.)"""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return prepare_flow.with_options(task_runner=DaskTaskRunner(address=dask_address))
    from prefect.task_runners import ThreadPoolTaskRunner

    return prepare_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers or default_workers()))
