"""``etc-data prepare`` (the main job, as a Prefect flow), ``etc-data verify`` and ``etc-data serve``."""

from __future__ import annotations

import os

import click

from ..errors import EtcError
from .keys import key_option


def _prefect_env() -> None:
    """Embedded default: Prefect's local ephemeral API, quiet logs, results not persisted."""
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _boot_ephemeral_api(key_ref: str | None):
    """Start Prefect's local API server now, so that its boot overlaps this process's imports and
    the worker pool's start (see flows/ephemeral.py); returns it, to ``wait`` on before the flow.
    Only in a fresh process with no PREFECT_API_URL: where Prefect is already imported (a notebook,
    the tests) its settings are fixed, and Prefect starts its own server on first use as usual."""
    import sys

    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    from flows.ephemeral import EphemeralAPI

    from ..keys import key_env_var

    name = key_env_var(key_ref)  # the server never sees the variable holding the key
    return EphemeralAPI(hide_env=(name,) if name else ())


def _storage(storage_config):
    if not storage_config:
        return {}
    from ..storage import load_storage_config

    return load_storage_config(storage_config)["storage_options"]


def register(cli: click.Group) -> None:
    register_serve(cli)

    @cli.command("prepare")
    @click.option("--source", "sources", multiple=True, required=True,
                  help="npz, image folder/.zip/.tgz with class folders, CIFAR-10 python folder/.tar.gz; repeat to merge")
    @click.option("--owner", default=None, help="owner name (informational; the key decides)")
    @key_option(help_extra="Not needed with --scheme plain.")
    @click.option("--out", required=True, help="dataset root URL: a folder, file://, s3://, gs://, memory://")
    @click.option("--dataset", default=None, help="dataset id (selects the per-dataset subkey; default: source name)")
    @click.option("--scheme", default="etc", show_default=True, help="etc, blockwise[:scramble=1], pe, ele, plain")
    @click.option("--block-size", type=int, default=None, help="block size (default: etc 16, ele 4)")
    @click.option("--codec", default="jpeg:q=85,sub=420", show_default=True)
    @click.option("--shard-size", type=int, default=10000, show_default=True, help="samples per shard")
    @click.option("--max-shard-bytes", type=int, default=None, help="split a shard past this many payload bytes")
    @click.option("--limit", type=int, default=None, help="at most N images per split (quick runs)")
    @click.option("--split", "splits", multiple=True, help="only these splits (default: all the source has)")
    @click.option("--resize", type=int, default=None, help="shorter side to N then centre crop NxN (e.g. 224, 160)")
    @click.option("--pad", type=click.Choice(["error", "edge", "zero"]), default="error", show_default=True)
    @click.option("--on-bad-image", type=click.Choice(["stop", "skip"]), default="stop", show_default=True)
    @click.option("--storage-config", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="YAML with storage_options (no secrets: credentials come from the environment)")
    @click.option("--workers", type=int, default=None, help="local worker processes (default: all cores)")
    @click.option("--dask-address", default=None, help="run the tasks on this Dask scheduler (prefect-dask)")
    @click.option("--no-verify", is_flag=True, help="skip the verification of what was written")
    def prepare_cmd(sources, owner, key_ref, out, dataset, scheme, block_size, codec, shard_size, max_shard_bytes,
                    limit, splits, resize, pad, on_bad_image, storage_config, workers, dask_address, no_verify):
        """Encrypt, compress and shard a dataset into verified WebDataset shards (a Prefect flow)."""
        from tqdm import tqdm

        from ..schemes import MIN_KEY_BITS, weak_key_message
        from ..shards import verify
        from ..storage import join

        if shard_size < 1:
            raise EtcError("--shard-size must be >= 1")
        _prefect_env()
        api = _boot_ephemeral_api(key_ref)  # Prefect's API server boots while the rest is imported and spawned
        from ..prepare import ChunkPool

        # worker processes start (and open the source) while Prefect's API server boots
        pool = None
        if not dask_address and (workers or len(os.sched_getaffinity(0))) > 1:
            pool = ChunkPool(workers, {"source": list(sources), "out": out, "dataset": "", "resize": resize})
        import flows.prepare as fp

        fp.POOL = pool
        opts = _storage(storage_config)
        bar = tqdm(unit="shard", desc="prepare")
        fp.PROGRESS = lambda r: (bar.update(1), bar.set_postfix_str(f"{r.split} #{r.index}"))
        try:
            flow_fn = fp.make_prepare_flow(workers, dask_address)
            if api is not None:
                api.wait()  # the flow may only talk to a server that answers
            res = flow_fn(source=list(sources), out=out, dataset=dataset, owner=owner, key_ref=key_ref,
                          scheme=scheme, block_size=block_size, codec=codec, shard_size=shard_size,
                          max_shard_bytes=max_shard_bytes, limit=limit, splits=list(splits) or None, resize=resize,
                          pad=pad, on_bad_image=on_bad_image, storage_options=opts, workers=workers)
        finally:
            bar.close()
            fp.PROGRESS = None
            if fp.POOL is not None:
                fp.POOL.close(wait=False)  # its workers exit while the shards are verified
                fp.POOL = None
        for line in res["lines"]:
            click.echo(line)
        bits, size = res["key_bits"], res["image_size"]
        if bits is not None:
            click.echo(f"key space: log2 = {bits:.1f} bits")
            if bits < MIN_KEY_BITS:
                click.secho(weak_key_message(res["scheme"], bits, size[0], size[1], res["block_size"]), fg="red", err=True)
        if not no_verify:
            for split in res["splits"]:
                rep = verify(join(out, split), storage_options=opts)
                if not rep.ok:
                    for line in rep.lines():
                        click.echo(line, err=True)
                    raise EtcError(f"verification of {join(out, split)} failed")
            click.echo(f"verified: {', '.join(f'{k} {v}' for k, v in res['splits'].items())} samples")

    @cli.command("verify")
    @click.argument("url")
    @click.option("--deep", is_flag=True, help="decode every sample, not only the first of each shard")
    @click.option("--storage-config", type=click.Path(exists=True, dir_okay=False), default=None)
    def verify_cmd(url, deep, storage_config):
        """Check a split (URL = ROOT/<split>) or every split of a dataset root against its manifest."""
        from ..manifest import INFO_NAME
        from ..shards import verify
        from ..storage import StorageError, join, read_bytes

        import json

        opts = _storage(storage_config)
        targets = [url]
        try:
            info = json.loads(read_bytes(join(url, INFO_NAME), opts))
            targets = [join(url, s) for s in info.get("splits", {})] or [url]
        except (StorageError, ValueError):
            pass
        bad = False
        for t in targets:
            rep = verify(t, deep=deep, storage_options=opts)
            for line in rep.lines():
                click.echo(line)
            bad |= not rep.ok
        if bad:
            raise EtcError(f"verification failed for {url}")


def register_serve(cli: click.Group) -> None:
    @cli.command("serve")
    @click.argument("folder", type=click.Path(exists=True))
    @click.option("--check", is_flag=True, help="only validate the pipeline files and list them")
    def serve_cmd(folder, check):
        """Serve every pipelines/*.yaml as a scheduled Prefect deployment (needs a real Prefect server:
        `prefect server start --host 127.0.0.1` and PREFECT_API_URL=http://127.0.0.1:4200/api)."""
        from ..pipelines import load_pipelines

        pipes = load_pipelines(folder)
        for p in pipes:
            sched = f"cron '{p.schedule.cron}' ({p.schedule.timezone})" if p.schedule else "no schedule"
            click.echo(f"{p.name}: {p.dataset} -> {p.storage.url} [{p.scheme}, block {p.block_size}, {p.codec}], {sched}")
        if check:
            return
        if not os.environ.get("PREFECT_API_URL"):
            raise EtcError("serve needs a running Prefect server: start one with `prefect server start --host "
                           "127.0.0.1` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
        from flows.serve import serve

        serve(folder)
