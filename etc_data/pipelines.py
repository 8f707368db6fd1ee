"""Declarative pipeline specs (``pipelines/*.yaml``), validated with pydantic.

One file = one pipeline: owner, key *reference*, source, splits, scheme, block size, codec,
storage URL + storage options, shard size, schedule (cron). Relative paths are relative to the
YAML file. A bad field is an error naming the file and the field; a field that holds a secret
(or a key reference that is really a key) is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .codecs import get_codec
from .errors import EtcError
from .schemes import parse_scheme_spec
from .storage import is_local, read_config_yaml


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


class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, v):
        check_cron(v)
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
    codec: str = "jpeg:q=85,sub=420"
    resize: int | None = None
    shard_size: int = Field(default=10000, ge=1)
    on_bad_image: str = Field(default="stop", pattern="^(stop|skip)$")
    storage: Storage
    schedule: Schedule | None = None

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

    def flow_parameters(self) -> dict:
        """Prefect parameters of the prepare flow: public settings and the key reference only."""
        return {"source": self.source, "out": self.storage.url, "dataset": self.dataset, "owner": self.owner,
                "key_ref": self.key_ref, "scheme": self.scheme, "block_size": self.block_size, "codec": self.codec,
                "shard_size": self.shard_size, "splits": self.splits, "resize": self.resize,
                "on_bad_image": self.on_bad_image, "storage_options": self.storage.storage_options}


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
    if p.key_ref and not p.key_ref.startswith(("env:", "prefect-secret:")):
        p.key_ref = str(Path(p.key_ref).expanduser()) if p.key_ref.startswith("~") else resolve(p.key_ref)
    return p


def load_pipelines(folder: str | Path) -> list[Pipeline]:
    folder = Path(folder)
    files = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml")) if folder.is_dir() else [folder]
    if not files:
        raise PipelineError(f"{folder}: no pipeline files (*.yaml)")
    pipes = [load_pipeline(f) for f in files]
    names = [p.name for p in pipes]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise PipelineError(f"{folder}: pipeline name(s) used twice: {', '.join(sorted(dup))}")
    return pipes
