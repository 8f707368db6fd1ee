"""The ``report`` flow: the compression-size report of ``etc_data.report`` as a Prefect flow.

One task per split (each encodes every image of that split once per scheme and codec); the key,
when one is used, is loaded inside the task from its reference and the task neither caches nor
persists its result. The report files (sizes.json/.md/.png) are written to ``out`` and the
figures become a table artifact and a Markdown artifact.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from etc_data.report import Cell, SizeReport, size_report
from etc_data.sources import open_source

from .keys import load_key_ref

DEFAULT_CODECS = ["jpeg:q=85,sub=444", "jpeg:q=80,sub=444", "jpegls", "j2k", "raw"]


@task(name="size-report-split", cache_policy=NO_CACHE, persist_result=False, log_prints=False)
def report_split(source: list[str], split: str, schemes: list[str], codecs: list[str], block_size: int | None,
                 key_ref: str | None, dataset: str | None, limit: int | None, resize: int | None,
                 on_bad_image: str) -> dict:
    """Sizes of one split; returns only public figures (no key, no pixels)."""
    src = open_source(source, resize=resize)
    key = load_key_ref(key_ref) if key_ref else None
    rep = size_report(src, schemes, codecs, block_size, key, dataset or src.name, [split], limit,
                      on_bad_image=on_bad_image)
    return {"source": rep.source, "key": rep.key, "schemes": rep.schemes, "codecs": rep.codecs,
            "skipped": rep.skipped,
            "cells": [[s, c, cell.images, cell.total_bytes, cell.psnr_sum, cell.lossy]
                      for (s, c), cell in rep.cells.items()]}


def merge(parts: list[dict], block_size: int | None) -> SizeReport:
    """Add the per-split figures into one report (same schemes and codecs in every part)."""
    first = parts[0]
    rep = SizeReport(first["source"], block_size, first["key"], schemes=list(first["schemes"]),
                     codecs=list(first["codecs"]))
    for p in parts:
        rep.skipped += p["skipped"]
        for s, c, n, nbytes, psnr_sum, lossy in p["cells"]:
            cell = rep.cells.setdefault((s, c), Cell(s, c, lossy=lossy))
            cell.images += n
            cell.total_bytes += nbytes
            cell.psnr_sum += psnr_sum
    return rep


@flow(name="etc-report", log_prints=False, persist_result=False)
def report_flow(source: list[str], out: str, schemes: list[str] | None = None, codecs: list[str] | None = None,
                block_size: int | None = 16, key_ref: str | None = None, dataset: str | None = None,
                splits: list[str] | None = None, limit: int | None = None, resize: int | None = None,
                on_bad_image: str = "stop") -> dict:
    """Size report over ``source``; ``key_ref`` is a reference (path, env:NAME, prefect-secret:BLOCK)
    or None for an ephemeral random key that is never stored."""
    schemes = schemes or ["plain", "etc", "ele", "pe"]
    codecs = codecs or DEFAULT_CODECS
    src = open_source(source, resize=resize)
    futures = [report_split.submit(list(source), sp, schemes, codecs, block_size, key_ref, dataset, limit, resize,
                                   on_bad_image) for sp in (splits or src.splits)]
    rep = merge([f.result() for f in futures], block_size)
    rep.write(out)
    rows = [rep.cells[(s, c)].row() for c in rep.codecs for s in rep.schemes]
    create_table_artifact(rows, key="size-report", description=f"compressed size by scheme and codec: {rep.source}")
    create_markdown_artifact(rep.markdown(), key="size-report-summary")
    return rep.to_json()
