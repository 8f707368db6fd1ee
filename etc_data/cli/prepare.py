"""``etc-data prepare`` (the main job, as a Prefect flow), ``etc-data verify`` and ``etc-data serve``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click

from ..errors import EtcError
from .options import image_limit_options, key_option, storage_config_option, storage_options, trust_option


def _boot_ephemeral_api(key_ref: str | None):
    """Start Prefect's local API server now, so that its boot overlaps this process's imports and
    the worker pool's start (see ephemeral.py); returns it, to ``wait`` on before the flow. Only in
    a fresh process with no PREFECT_API_URL: where Prefect is already imported (a notebook, the
    tests) its settings are fixed, and Prefect starts its own server on first use as usual."""
    import sys

    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    from ..keys import key_env_var
    from .ephemeral import EphemeralAPI

    name = key_env_var(key_ref)  # the server never sees the variable holding the key
    return EphemeralAPI(hide_env=(name,) if name else ())


def register(cli: click.Group) -> None:
    register_serve(cli)

    @cli.command("prepare")
    @click.option("--source", "sources", multiple=True, required=True,
                  help="npz, image folder/.zip/.tgz with class folders, CIFAR-10 python folder/.tar.gz; repeat to merge")
    @click.option("--owner", default=None, help="owner name (informational; the key decides)")
    @key_option(help_extra="Every manifest is signed with it (also with --scheme plain).")
    @click.option("--out", required=True, help="dataset root URL: a folder, file://, s3://, gs://, memory://")
    @click.option("--dataset", default=None, help="dataset id (selects the per-dataset subkey; default: source name)")
    @click.option("--scheme", default="etc", show_default=True, help="etc, blockwise[:scramble=1], pe, ele, plain")
    @click.option("--block-size", type=int, default=None, help="block size (default: etc 16, ele 4)")
    @click.option("--codec", default=None, help="codec spec [default: jpeg:q=85,sub=420]")
    @click.option("--shard-size", type=int, default=None, help="samples per shard [default: 10000]")
    @click.option("--max-shard-bytes", type=int, default=None, help="split a shard past this many payload bytes")
    @click.option("--limit", type=int, default=None, help="at most N images per split (quick runs)")
    @click.option("--split", "splits", multiple=True, help="only these splits (default: all the source has)")
    @click.option("--resize", type=int, default=None, help="shorter side to N then centre crop NxN (e.g. 224, 160)")
    @click.option("--pad", type=click.Choice(["error", "edge", "zero"]), default="error", show_default=True)
    @click.option("--on-bad-image", type=click.Choice(["stop", "skip"]), default="stop", show_default=True)
    @image_limit_options
    @storage_config_option()
    @click.option("--workers", type=int, default=None, help="local worker processes (default: all cores)")
    @click.option("--dask-address", default=None, help="run the tasks on this Dask scheduler (prefect-dask)")
    @click.option("--no-verify", is_flag=True, help="skip the verification of what was written")
    def prepare_cmd(sources, owner, key_ref, out, dataset, scheme, block_size, codec, shard_size, max_shard_bytes,
                    limit, splits, resize, pad, on_bad_image, max_image_pixels, max_image_bytes, storage_config, workers,
                    dask_address, no_verify):
        """Encrypt, compress and shard a dataset into verified WebDataset shards (a Prefect flow)."""
        import warnings

        from ..prepare import PrepareConfig
        from ..readers import ReaderWarning

        cfg = PrepareConfig(source=list(sources), out=out, dataset=dataset or "", owner=owner, key_ref=key_ref,
                            scheme=scheme, block_size=block_size, limit=limit, splits=list(splits) or None,
                            resize=resize, pad=pad, on_bad_image=on_bad_image, max_shard_bytes=max_shard_bytes,
                            storage_options=storage_options(storage_config), workers=workers, verify=not no_verify,
                            max_image_pixels=max_image_pixels, max_image_bytes=max_image_bytes)
        if codec is not None:
            cfg.codec = codec
        if shard_size is not None:
            cfg.shard_size = shard_size
        cfg.check()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReaderWarning)  # printed below, once, without a traceback line
            res = run_prepare_flow(cfg, dask_address)
        for line in res["lines"]:
            click.echo(line)
        if res["key_bits"] is not None:
            click.echo(f"key space: log2 = {res['key_bits']:.1f} bits")
        if res["weak_key_message"]:
            click.secho(res["weak_key_message"], fg="red", err=True)
        if res.get("reader_warning"):
            click.secho(f"warning: {res['reader_warning']}", fg="yellow", err=True)
        if res["verified"]:
            click.echo(f"verified: {', '.join(f'{k} {v}' for k, v in res['verified'].items())} samples")

    @cli.command("verify")
    @click.argument("url")
    @click.option("--deep", is_flag=True, help="decode every sample, not only the first of each shard")
    @click.option("--strict", is_flag=True, help="fail on shards the manifest does not list (default: a warning)")
    @click.option("--clean", is_flag=True,
                  help="remove shards the manifest does not list and .part temporaries (never a listed shard); "
                       "not while a prepare writes to this dataset")
    @trust_option()
    @storage_config_option()
    def verify_cmd(url, deep, strict, clean, trust, storage_config):
        """Check a split (URL = ROOT/<split>) or every split of a dataset root against its signed manifest.
        Shards the manifest does not list (left by an interrupted run) are a warning; exit 2 on a missing
        or corrupt shard."""
        from ..verify import VerifyConfig, verify_dataset

        result = verify_dataset(VerifyConfig(url=url, deep=deep, strict=strict, clean=clean,
                                             storage_options=storage_options(storage_config), trust=list(trust)))
        for line in result.lines():
            click.echo(line)
        if not result.ok:
            raise EtcError(f"verification failed for {url}")


def run_prepare_flow(cfg, dask_address: str | None = None) -> dict:
    """The prepare flow on Prefect's local ephemeral API, with a progress bar; the worker pool
    starts (and opens the source) while the API server boots."""
    from tqdm import tqdm

    from ..flows import apply_local_defaults  # the top-level flows/ folder, installed as etc_data.flows

    apply_local_defaults()
    api = _boot_ephemeral_api(cfg.key_ref)
    from ..prepare import pool_before_planning
    from ..workers import WorkerPool

    pool = opened = None
    if not dask_address:  # the source is listed once, here: the workers and the flow's planning start from it
        cfg.check()
        opened = (cfg, cfg.open_source())
        if pool_before_planning(cfg, opened[1]):
            pool = WorkerPool(cfg.workers, warm=cfg, source=opened[1])
    bar = tqdm(unit="shard", desc="prepare")
    try:
        from ..flows.prepare import make_prepare_flow, prepare_runtime

        flow_fn = make_prepare_flow(cfg.workers, dask_address)
        if api is not None:
            api.wait()  # the flow may only talk to a server that answers
        with prepare_runtime(pool, lambda r: (bar.update(1), bar.set_postfix_str(f"{r.split} #{r.index}")), opened), \
                prefect_logs_to_file():
            return flow_fn(**{k: v for k, v in cfg.to_dict().items()})
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool = None
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close(wait=False)


@contextlib.contextmanager
def prefect_logs_to_file():
    """Prefect's console log (a failed run logs a traceback of ~110 lines before the CLI's own
    error line) goes to ``$PREFECT_HOME/etc-data.log`` for the duration of the block; the CLI
    prints one ``error:`` line. With --debug / ETC_DATA_DEBUG=1 it stays on the terminal."""
    import logging
    from logging.handlers import RotatingFileHandler

    from prefect.logging.handlers import PrefectConsoleHandler
    from prefect.settings import PREFECT_HOME

    from . import debugging

    if debugging():
        yield None
        return
    path = Path(PREFECT_HOME.value()) / "etc-data.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = RotatingFileHandler(path, maxBytes=10 << 20, backupCount=2)
    to_file.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    names = [n for n in logging.root.manager.loggerDict if n.startswith(("prefect", "uvicorn", "fastapi"))]
    swapped = []
    for logger in [logging.getLogger()] + [logging.getLogger(n) for n in names]:
        consoles = [h for h in logger.handlers if isinstance(h, PrefectConsoleHandler)
                    or type(h).__name__ == "_SafeStreamHandler"]
        for h in consoles:
            logger.removeHandler(h)
            swapped.append((logger, h))
        if consoles:
            logger.addHandler(to_file)
    try:
        yield path
    finally:
        for logger, h in swapped:
            logger.removeHandler(to_file)
            logger.addHandler(h)
        to_file.close()


def register_serve(cli: click.Group) -> None:
    @cli.command("serve")
    @click.argument("folder", type=click.Path(exists=True))
    @click.option("--check", is_flag=True,
                  help="check what a run will need (pipeline files, timezones, key references and key file modes, "
                       "sources, storage, committed datasets, the Prefect server), list the pipelines and exit; "
                       "status 2 on any problem")
    def serve_cmd(folder, check):
        """Serve every pipelines/*.yaml as a scheduled Prefect deployment until SIGTERM/SIGINT (needs a real
        Prefect server: `prefect server start --host 127.0.0.1` and PREFECT_API_URL=http://127.0.0.1:4200/api).
        On stop, running flow runs are cancelled and the schedules paused; the next serve resumes them."""
        from ..pipelines import check_folder, load_pipelines

        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")  # before Prefect is imported: serve's log is its record
        from ..flows import serve as fs

        if not check:
            pipes = load_pipelines(folder)
            _list_pipelines(pipes)
            problem = fs.server_problem()
            if problem:
                raise EtcError(problem)
            fs.serve(pipes)
            return
        from ..flows.keys import load_key_ref

        pipes, problems = check_folder(folder, key_loader=load_key_ref)
        _list_pipelines(pipes)
        server = fs.server_problem()
        problems += [server] if server else []
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        if problems:
            raise EtcError(f"{len(problems)} problem(s) in {folder}: a run would fail")
        click.echo(f"ready: {len(pipes)} pipeline(s) checked")


def _list_pipelines(pipes) -> None:
    for p in pipes:
        sched = p.schedule.describe() if p.schedule else "no schedule"
        click.echo(f"{p.name}: {p.dataset} -> {p.storage.url} [{p.scheme}, block {p.block_size}, {p.codec}], {sched}")
