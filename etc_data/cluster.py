"""Prepare chunks on a Dask cluster: the same chunks, on other machines' processes.

    from distributed import Client
    from etc_data.cluster import dask_map_chunks
    with Client("tcp://scheduler:8786") as client:
        prepare_dataset(cfg, map_chunks=dask_map_chunks(client))

(``etc-data prepare --dask-address`` does the same through Prefect's ``DaskTaskRunner``, one task
per shard.) Each Dask worker keeps one ``ChunkRunner`` for its life, so its opened source and key
schedule stay warm across chunks; the key is loaded on the worker from the config's key
*reference* (a path or ``env:NAME`` that every worker must resolve) and never travels through the
scheduler. A chunk is a pure function of (config, plan): when a worker dies mid-chunk, Dask runs
the chunk again on another worker, which writes the same shard bytes (a half-written shard never
gets its name: see ``storage.staged_open``); the planner's process commits the manifest at the end.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from .prepare import ChunkResult, ChunkRunner, ChunkSpec, PrepareConfig


def worker_runner(key_loader: Callable | None = None) -> ChunkRunner:
    """The ChunkRunner kept on the current Dask worker (created on first use)."""
    from distributed import get_worker

    w = get_worker()
    runners = getattr(w, "etc_data_chunk_runners", None)
    if runners is None:
        runners = {}
        setattr(w, "etc_data_chunk_runners", runners)
    if key_loader not in runners:  # one per way of resolving key references (library, Prefect flow)
        runners[key_loader] = ChunkRunner(key_loader)
    return runners[key_loader]


def run_on_worker(cfg: dict, spec: dict, key_loader: Callable | None = None) -> dict:
    """One chunk on this Dask worker: public settings in, public metadata out (no key, no pixels);
    ``key_loader`` resolves the key reference there (default: a path or env:NAME)."""
    return dataclasses.asdict(worker_runner(key_loader).run(PrepareConfig(**cfg), ChunkSpec(**spec)))


def dask_map_chunks(client):
    """A ``map_chunks`` for ``prepare_dataset`` that runs every chunk on ``client``'s cluster."""
    def map_chunks(cfg: PrepareConfig, specs: list[ChunkSpec]):
        from distributed import as_completed

        public = cfg.to_dict()
        futures = [client.submit(run_on_worker, public, dataclasses.asdict(s), pure=False,
                                 key=f"etc-data-{s.split}-shard-{s.index:06d}-{id(specs):x}") for s in specs]
        try:
            for f in as_completed(futures):
                yield ChunkResult(**f.result())
        finally:
            client.cancel([f for f in futures if not f.done()])
    return map_chunks
