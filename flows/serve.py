"""Serve every pipeline in a folder as a scheduled deployment of the prepare flow.

Needs a real Prefect server (``prefect server start --host 127.0.0.1``) and PREFECT_API_URL
pointing at it: the server's scheduler creates the runs (the cron in the pipeline's timezone) and
this process executes them, each in a ``python -m prefect.engine`` subprocess of its own.

Lifecycle, which Prefect's own ``serve`` leaves to chance (it marks nothing when stopped):

- start: every pipeline is (re)registered with its schedule active, so a schedule paused by an
  earlier stop resumes, and the log says so; scheduled runs that were missed while no serve was
  running (state Late, after a crash) are collapsed into the latest one, which ingests everything
  new anyway;
- SIGTERM / SIGINT (systemd, Docker, Kubernetes, Ctrl-C): no new run starts; each running flow run
  is cancelled (its process gets SIGTERM and kills its worker pool; SIGKILL if it is still there 30 s
  later) and ends
  *Cancelled* with a message saying serve stopped, which releases its deployment's concurrency
  slot; then the schedules are paused, so no run piles up while nothing serves them;
- SIGKILL (a crash): the flow-run processes get SIGTERM from the kernel (parent-death signal, set
  by the flow) and end *Crashed*; their pool workers die with them.
"""

from __future__ import annotations

import asyncio
import os
import signal

from etc_data.pipelines import Pipeline

from .prepare import SERVE_PID_ENV, prepare_flow

STOP_MESSAGE = ("etc-data serve stopped ({signal}) while this run was going on; the dataset keeps its last "
                "committed manifest, and the next run removes the shards this one left uncommitted")


def schedule_of(p: Pipeline):
    """The pipeline's cron schedule in its own timezone (Prefect's Cron), or None."""
    if p.schedule is None:
        return None
    from prefect.schedules import Cron

    return Cron(p.schedule.cron, timezone=p.schedule.timezone)


def deployments(pipes: list[Pipeline]):
    out = []
    for p in pipes:
        sched = schedule_of(p)
        kw = {"schedule": sched} if sched is not None else {}
        # one run at a time per pipeline: a scheduled ingest that outlasts its interval would
        # otherwise plan the same next shards as the run before it and race it to the manifest
        out.append(prepare_flow.to_deployment(name=p.name, parameters=p.flow_parameters(), paused=False,
                                              tags=["etc-data", f"owner:{p.owner}"], concurrency_limit=1, **kw))
    return out


def _runner_class():
    from prefect.runner import Runner

    class ServeRunner(Runner):
        """Prefect's Runner with a graceful stop on SIGTERM and SIGINT (see the module docstring).
        Uses the Runner's cancellation manager and run poller (Prefect 3.8.8, pinned)."""

        stop_signal: str | None = None
        _stop_task: asyncio.Task | None = None

        def handle_sigterm(self, *args) -> None:  # installed by Runner.start for SIGTERM
            (self._loop or asyncio.get_running_loop()).call_soon_threadsafe(self.request_stop, "SIGTERM")

        def request_stop(self, name: str) -> None:
            if self._stop_task is not None:
                self._logger.info(f"{name} received again: already stopping")
                return
            self.stop_signal = name
            self._stop_task = asyncio.ensure_future(self._graceful_stop(name))

        async def _graceful_stop(self, name: str) -> None:
            while not self.started:  # a signal while start() sets up: stop once it has
                await asyncio.sleep(0.05)
            running = len(self._process_manager.flow_run_ids())
            self._logger.info(f"etc-data serve: {name} received; cancelling {running} running flow run(s), "
                              f"then pausing the schedules")
            self.stopping = True
            self._scheduled_run_poller.stopping = True  # no new run is submitted from here on
            done: set = set()
            for attempt in range(4):  # looked at again for a run whose process was starting at the signal
                todo = self._process_manager.flow_run_ids() - done
                for run_id in todo:
                    await self._cancellation_manager.cancel(await self._client.read_flow_run(run_id),
                                                            state_msg=STOP_MESSAGE.format(signal=name))
                done |= todo
                if attempt and not todo:
                    break
                await asyncio.sleep(0.5)
            await self.astop()

    return ServeRunner


async def _deployment_states(names: list[str]) -> dict:
    """name -> the served deployment as the server has it now (absent: never deployed)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    out = {}
    async with get_client() as c:
        for n in names:
            try:
                out[n] = await c.read_deployment_by_name(f"{prepare_flow.name}/{n}")
            except ObjectNotFound:
                pass
    return out


async def collapse_missed_runs(deployment_id) -> int:
    """Delete the deployment's missed scheduled runs (state Late) except the latest; returns how many.
    Each run ingests everything new since the last commit, so one catch-up run is enough."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterStateName, FlowRunFilterState)
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as c:
        late = await c.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Late"]))),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC)
        for run in late[1:]:
            await c.delete_flow_run(run.id)
    return max(0, len(late) - 1)


async def aserve(pipes: list[Pipeline], deps: list) -> None:
    """Serve ``deps`` (``deployments(pipes)``, built outside the event loop)."""
    runner = _runner_class()(pause_on_shutdown=True)
    logger = runner._logger
    before = await _deployment_states([p.name for p in pipes])
    for p, d in zip(pipes, deps):
        dep_id = await runner.aadd_deployment(d)
        sched = p.schedule.describe() if p.schedule else "no schedule (runs on demand)"
        was = before.get(p.name)
        resumed = " - resumed: it was paused, e.g. by a stopped serve" if was is not None and was.paused else ""
        logger.info(f"serving {prepare_flow.name}/{p.name}: {sched}{resumed}")
        dropped = await collapse_missed_runs(dep_id)
        if dropped:
            logger.warning(f"{p.name}: {dropped + 1} scheduled runs were missed while serve was not running; "
                           f"only the latest runs now (each run ingests everything new)")
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, runner.request_stop, "SIGINT")
    try:
        await runner.start()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    if runner.stop_signal:
        logger.info(f"etc-data serve stopped ({runner.stop_signal}); the schedules of "
                    f"{', '.join(p.name for p in pipes)} are paused until `etc-data serve` runs again")


def server_problem() -> str | None:
    """Why serve cannot talk to a Prefect server now, or None when the server answers."""
    import urllib.request

    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return ("serve needs a running Prefect server: start one with `prefect server start --host 127.0.0.1` "
                "and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5):
            return None
    except (OSError, ValueError) as e:
        return f"the Prefect server at PREFECT_API_URL={url} does not answer: {e}"


def serve(pipes: list[Pipeline]) -> None:
    """Serve ``pipes`` (``load_pipelines(folder)``) until SIGTERM or SIGINT (see the module docstring)."""
    # the flow-run processes this one starts end with it, even when it is killed (prepare_flow)
    os.environ[SERVE_PID_ENV] = str(os.getpid())
    try:
        asyncio.run(aserve(pipes, deployments(pipes)))
    except KeyboardInterrupt:  # Ctrl-C while registering, before any run could start
        print("etc-data serve: interrupted before serving; no run was started")
