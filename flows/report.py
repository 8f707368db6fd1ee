"""The ``report`` flow: ``etc_data.report.size_report`` with one Prefect task per split.

Each task measures one split (every image encoded once per scheme and codec); the key, when one
is used, is loaded inside the task from its reference, and the task neither caches nor persists
its result. ``SizeReport.merge`` adds the per-split figures; the report files (sizes.json/.md/.png)
are written to ``out`` and the figures become a table and a Markdown artifact.
"""

from __future__ import annotations

import dataclasses

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from etc_data.report import DEFAULT_CODECS, DEFAULT_SCHEMES, ReportConfig, SizeReport, size_report
from etc_data.sources import open_source

from .keys import load_key_ref


@task(name="size-report-split", task_run_name="sizes-{split}", cache_policy=NO_CACHE, persist_result=False,
      log_prints=False)
def report_split(cfg: dict, split: str) -> dict:
    """Sizes of one split; returns only public figures (no key, no pixels)."""
    c = ReportConfig(**dict(cfg, splits=[split], out=None))
    return size_report(c, key_loader=load_key_ref).to_state()


@flow(name="etc-report", log_prints=False, persist_result=False)
def report_flow(source: list[str], out: str, schemes: list[str] | None = None, codecs: list[str] | None = None,
                block_size: int | None = 16, key_ref: str | None = None, dataset: str | None = None,
                splits: list[str] | None = None, limit: int | None = None, resize: int | None = None,
                on_bad_image: str = "stop", psnr: bool = True) -> dict:
    """Size report over ``source``; ``key_ref`` is a reference (path, env:NAME, prefect-secret:BLOCK)
    or None for an ephemeral random key that is never stored."""
    cfg = ReportConfig(source=list(source), out=out, schemes=schemes or list(DEFAULT_SCHEMES),
                       codecs=codecs or list(DEFAULT_CODECS), block_size=block_size, key_ref=key_ref, dataset=dataset,
                       splits=splits, limit=limit, resize=resize, on_bad_image=on_bad_image, psnr=psnr)
    cfg.check()
    public = dataclasses.asdict(cfg)
    futures = [report_split.submit(public, sp) for sp in (splits or open_source(source, resize=resize).splits)]
    rep = SizeReport.merge([f.result() for f in futures])
    rep.write(out)
    rows = [rep.cells[(s, c)].row() for c in rep.codecs for s in rep.schemes]
    create_table_artifact(rows, key="size-report", description=f"compressed size by scheme and codec: {rep.source}")
    create_markdown_artifact(rep.markdown(), key="size-report-summary")
    return rep.to_json()
