"""Declarative pipeline specs (``pipelines/*.yaml``), validated with pydantic.

One file = one pipeline: owner, key *reference*, source, splits, scheme, block size, codec,
storage URL + storage options, shard size, schedule (cron and IANA timezone). Relative paths are
relative to the YAML file. A bad field is an error naming the file and the field; a field that
holds a secret (or a key reference that is really a key) is refused.

Loading checks what the file says; ``check_pipeline`` checks what a run will meet when it starts
(``etc-data serve --check``): the key reference resolves to a key (a key file with mode 0600),
the sources open and have the splits asked for, the storage answers, and a dataset already there
was made with this key and these settings.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .codecs import DEFAULT_CODEC, get_codec
from .errors import EtcError
from .schemes import parse_scheme_spec
from .storage import StorageError, get_fs, is_local, list_names, read_config_yaml


class PipelineError(EtcError):
    """A pipeline file is invalid (message names the file and the field)."""


_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
_NAMES = {"jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6, "jul": 7, "aug": 8, "sep": 9, "oct": 10,
          "nov": 11, "dec": 12, "sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}


def check_cron(expr: str) -> None:
    """Validate a 5-field cron expression (numbers, names, ``*``, ranges, steps, lists)."""
    parts = str(expr).split()
    if len(parts) != 5:
        raise ValueError(f"{expr!r} is not a cron expression: expected 5 fields (minute hour day month weekday)")
    for text, (what, lo, hi) in zip(parts, _CRON_FIELDS):
        for item in text.split(","):
            rng, _, step = item.partition("/")
            if step and (not step.isdigit() or int(step) < 1):
                raise ValueError(f"{expr!r}: bad step {step!r} in the {what} field")
            if rng == "*":
                continue
            for bound in rng.split("-", 1):
                val = _NAMES.get(bound.lower()) if not bound.isdigit() else int(bound)
                if val is None or not lo <= val <= hi:
                    raise ValueError(f"{expr!r}: {bound!r} is not valid in the {what} field ({lo}-{hi})")


class Storage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    storage_options: dict = Field(default_factory=dict)


@lru_cache(maxsize=1)
def _timezones() -> frozenset[str]:
    import zoneinfo

    return frozenset(zoneinfo.available_timezones())  # the names Prefect's server accepts


class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cron: str
    timezone: str = "UTC"  # IANA name; the cron's hours are local time there (DST included)

    def describe(self) -> str:
        return f"cron '{self.cron}' ({self.timezone})"

    @field_validator("cron")
    @classmethod
    def _cron(cls, v):
        check_cron(v)
        return v

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v):
        if v not in _timezones():
            raise ValueError(f"{v!r} is not an IANA timezone name (e.g. UTC, Europe/Paris, America/New_York)")
        return v


class Pipeline(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    owner: str
    key_ref: str | None = None  # path, env:NAME or prefect-secret:BLOCK (required: manifests are signed with it)
    dataset: str
    source: list[str]
    splits: list[str] | None = None
    scheme: str = "etc"
    block_size: int | None = None
    codec: str = DEFAULT_CODEC
    resize: int | None = None
    shard_size: int = Field(default=10000, ge=1)
    on_bad_image: str = Field(default="stop", pattern="^(stop|skip)$")
    workers: int | None = Field(default=None, ge=1)  # local worker processes per run (default: one per core)
    storage: Storage
    schedule: Schedule | None = None
    _file: str = PrivateAttr(default="")  # the YAML file it was loaded from (for messages)

    @field_validator("source", mode="before")
    @classmethod
    def _source_list(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("scheme")
    @classmethod
    def _scheme(cls, v):
        parse_scheme_spec(v)
        return v

    @field_validator("codec")
    @classmethod
    def _codec(cls, v):
        return get_codec(v).spec

    @field_validator("key_ref")
    @classmethod
    def _key_ref(cls, v):
        if v is not None and re.fullmatch(r"\s*[0-9a-fA-F]{32,}\s*", v):
            raise ValueError("looks like a secret key itself; give a reference: a key file path, env:NAME "
                             "or prefect-secret:BLOCK")
        return v

    @property
    def file(self) -> str:
        return self._file or self.name

    def flow_parameters(self) -> dict:
        """Prefect parameters of the prepare flow: public settings and the key reference only."""
        return {"source": self.source, "out": self.storage.url, "dataset": self.dataset, "owner": self.owner,
                "key_ref": self.key_ref, "scheme": self.scheme, "block_size": self.block_size, "codec": self.codec,
                "shard_size": self.shard_size, "splits": self.splits, "resize": self.resize,
                "on_bad_image": self.on_bad_image, "storage_options": self.storage.storage_options,
                "workers": self.workers}


def load_pipeline(path: str | Path) -> Pipeline:
    path = Path(path)
    doc = read_config_yaml(path, "pipeline", PipelineError)
    try:
        p = Pipeline.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "(root)"
        raise PipelineError(f"{path}: field {field}: {err['msg']}") from None
    except EtcError as e:  # scheme or codec parsing
        raise PipelineError(f"{path}: {e}") from None
    if not p.key_ref:
        raise PipelineError(f"{path}: field key_ref is required (every manifest is signed with the owner key, "
                            f"also for scheme plain)")
    base = path.resolve().parent

    def resolve(x: str) -> str:
        return x if not is_local(x) or Path(x).is_absolute() else str((base / x).resolve())

    p.source = [resolve(x) for x in p.source]
    p.storage.url = resolve(p.storage.url)
    if not p.key_ref.startswith(("env:", "prefect-secret:")):
        p.key_ref = str(Path(p.key_ref).expanduser()) if p.key_ref.startswith("~") else resolve(p.key_ref)
    p._file = str(path)
    return p


def load_pipelines(folder: str | Path) -> list[Pipeline]:
    pipes = [load_pipeline(f) for f in pipeline_files(folder)]
    check_unique_names(folder, pipes)
    return pipes


def check_unique_names(folder: str | Path, pipes: list[Pipeline]) -> None:
    names = [p.name for p in pipes]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise PipelineError(f"{folder}: pipeline name(s) used twice: {', '.join(sorted(dup))}")


def pipeline_files(folder: str | Path) -> list[Path]:
    """The pipeline files of a folder (``*.yaml``, ``*.yml``), or the file itself."""
    folder = Path(folder)
    files = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml")) if folder.is_dir() else [folder]
    if not files:
        raise PipelineError(f"{folder}: no pipeline files (*.yaml)")
    return files


def check_pipeline(p: Pipeline, key_loader: Callable | None = None) -> list[str]:
    """What a run of ``p`` needs, checked now: one message per problem, naming the file and the
    field ([] = ready). ``key_loader(ref)`` resolves the key reference (default: a key file or
    env:NAME); the key itself appears in no message."""
    problems: list[str] = []

    def problem(field: str, err) -> None:
        problems.append(f"{p.file}: field {field}: {err}")

    from .keys import load_key

    key = None
    try:  # every run loads the key: its manifests are signed with it, for --scheme plain too
        key = (key_loader or load_key)(p.key_ref)
    except EtcError as e:
        problem("key_ref", e)
    fingerprint = key.fingerprint if key is not None and parse_scheme_spec(p.scheme)[0] != "plain" else None
    source = None
    try:
        from .sources import open_source

        source = open_source(p.source, resize=p.resize)
        missing = [s for s in (p.splits or []) if s not in source.splits]
        if missing or not source.splits:
            problem("splits", f"source has no split {', '.join(missing) or '(none found)'}; it has: "
                              f"{', '.join(source.splits) or 'nothing'}")
    except EtcError as e:
        problem("source", e)
    try:
        _check_storage(p.storage.url, p.storage.storage_options)
    except EtcError as e:
        problem("storage.url", e)
        return problems
    if source is not None and key is not None:
        problems += [f"{p.file}: {e}" for e in _committed_conflicts(p, source, fingerprint)]
    return problems


def _check_storage(url: str, storage_options: dict) -> None:
    """The dataset root can be written: a local folder (or its nearest existing parent) that is
    writable, or an object-store bucket that answers a listing with the environment's credentials."""
    if is_local(url):
        path = Path(url[len("file://"):] if url.startswith("file://") else url)
        while not path.exists() and path != path.parent:
            path = path.parent
        if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
            raise StorageError(f"{url}: {path} is not a writable folder")
        return
    fs, root = get_fs(url, storage_options)
    bucket = root.split("/", 1)[0]
    list_names(f"{url.split('://', 1)[0]}://{bucket}", storage_options)  # credentials, endpoint, bucket
    if not fs.exists(bucket):
        raise StorageError(f"{url}: bucket {bucket} does not exist")


def _committed_conflicts(p: Pipeline, source, fingerprint: str | None) -> list[str]:
    """Splits already committed at the storage URL with another key or other settings (a run
    would refuse to append to them)."""
    from .manifest import ManifestMissing, read_manifest
    from .prepare import PrepareConfig, check_compatible
    from .storage import join

    cfg = PrepareConfig(**p.flow_parameters())
    out = []
    for split in p.splits or source.splits:
        url = join(p.storage.url, split)
        try:
            check_compatible(read_manifest(url, p.storage.storage_options), cfg, fingerprint,
                             get_codec(cfg.codec).spec, url)
        except ManifestMissing:
            continue
        except EtcError as e:
            out.append(f"field storage.url: {e}")
    return out


def check_folder(folder: str | Path, key_loader: Callable | None = None) -> tuple[list[Pipeline], list[str]]:
    """Every pipeline file of ``folder`` loaded and checked (``check_pipeline``): the pipelines
    that load, and every problem found in any file (a bad file does not hide the others')."""
    pipes, problems = [], []
    for f in pipeline_files(folder):
        try:
            pipes.append(load_pipeline(f))
        except PipelineError as e:
            problems.append(str(e))
    try:
        check_unique_names(folder, pipes)
    except PipelineError as e:
        problems.append(str(e))
    for p in pipes:
        problems += check_pipeline(p, key_loader)
    return pipes, problems
