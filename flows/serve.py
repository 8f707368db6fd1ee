"""Register every pipeline in a folder as a scheduled deployment of the prepare flow and serve them.

Needs a real Prefect server (``prefect server start --host 127.0.0.1``) and PREFECT_API_URL
pointing at it: scheduled runs are created by that server's scheduler.
"""

from __future__ import annotations

from etc_data.pipelines import load_pipelines

from .prepare import prepare_flow


def deployments(folder: str):
    out = []
    for p in load_pipelines(folder):
        kw = {"cron": p.schedule.cron} if p.schedule else {}
        # one run at a time per pipeline: a scheduled ingest that outlasts its interval would
        # otherwise plan the same next shards as the run before it and race it to the manifest
        out.append(prepare_flow.to_deployment(name=p.name, parameters=p.flow_parameters(),
                                              tags=["etc-data", f"owner:{p.owner}"], concurrency_limit=1, **kw))
    return out


def serve(folder: str) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(folder))
