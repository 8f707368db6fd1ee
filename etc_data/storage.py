"""Storage through fsspec: local paths, ``file://``, ``s3://``, ``gs://``, ``memory://``...

Whole objects are written atomically:
- local files go to a hidden temporary name in the same folder (unpredictable, created with
  ``O_EXCL``, so a planted file or symlink is never written through), are fsynced and renamed;
- object stores get one ``pipe_file`` call: a single PUT or a multipart upload that only becomes
  visible when completed, so a failed or killed upload never leaves an object under the final name;
- ``atomic_open`` streams large writes, and on any exception aborts the upload with ``discard()``
  (fsspec's ``__exit__`` would otherwise *commit* the truncated object on S3);
- ``staged_open`` streams objects of any size with bounded memory (shards): local files as
  ``atomic_open``, object stores through a local temporary file uploaded (and retried) at the end.
Transient storage errors (a connection refused or reset, a timeout, throttling, a 5xx) are retried
with exponential backoff, each retry logged on one line (logger ``etc_data.storage``, which reaches
stderr when nothing else is configured), then reported naming the URL. Errors a retry cannot fix
fail at once, in one line naming the URL and the cause: missing or refused credentials, a host name
that does not resolve (with a hint when no endpoint was configured and the URL went to AWS's public
endpoint), a missing object (``StorageNotFound``). The S3 client's own hidden retries are turned
down (``s3_defaults``) so that these are the only ones.

Credentials never live in the project's config files: they come from the environment or the
provider's own chain (AWS_* variables, ~/.aws, GOOGLE_APPLICATION_CREDENTIALS, metadata servers).
A storage config that contains a secret-looking field (``secret``, ``api_key``, ``passphrase``,
``connection_string``...) or value (an Azure ``AccountKey=``/``SharedAccessSignature=``, a URL with
``user:password@`` or a ``sig=`` signature) is refused, naming the field, never quoting the value.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import EtcError

SECRET_FIELDS = ("key", "secret", "token", "password", "passwd", "credential", "credentials",
                 "aws_secret_access_key", "aws_session_token", "secret_access_key", "access_key",
                 "private_key", "client_secret", "sas_token", "account_key", "api_key", "apikey", "secret_key",
                 "connection_string", "conn_str", "passphrase", "sas", "sas_url", "authorization", "auth_token",
                 "bearer_token")
# values that carry a secret whatever their field is called
_SECRET_VALUE = re.compile(r"AccountKey=|SharedAccessSignature=|SharedAccessKey=|[?&]sig=|://[^/@\s:]*:[^/@\s]*@",
                           re.IGNORECASE)
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
log = logging.getLogger(__name__)
# botocore errors no retry fixes (credentials, configuration)
PERMANENT_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoRegionError",
                    "ParamValidationError", "InvalidConfigError", "ProfileNotFound", "UnknownSignatureVersionError",
                    "InvalidS3AddressingStyleError", "UnknownCredentialError", "ClientConnectorDNSError")
DNS_FAILURES = ("Name or service not known", "Temporary failure in name resolution", "nodename nor servname",
                "No address associated with hostname", "getaddrinfo failed")
TRANSIENT_CODES = ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "503", "500", "502", "504")


class StorageError(EtcError):
    """A storage operation failed (the message names the URL)."""


class StorageNotFound(StorageError):
    """The object or folder does not exist (the storage itself answered)."""


def is_local(url: str) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def _local_path(url: str) -> Path:
    return Path(url[len("file://"):] if url.startswith("file://") else url)


def join(root: str, *parts: str) -> str:
    root = str(root)
    if is_local(root) and not root.startswith("file://"):
        return str(Path(root, *parts))
    return posixpath.join(root.rstrip("/"), *parts)


_FS_CACHE: dict = {}


def get_fs(url: str, storage_options: dict | None = None):
    """(filesystem, path) for a URL. Remote filesystems are kept, one per protocol and options, for
    the life of the process (``os.getpid()`` in the key: a forked DataLoader worker makes its own):
    a shard read reuses the connection pool instead of paying a new S3 session per object, and no
    filesystem is dropped mid-run, whose asyncio clean-up from another thread printed "Task exception
    was never retrieved ... attached to a different loop" (even with ``skip_instance_cache``)."""
    import json

    import fsspec

    s3 = str(url).startswith(("s3://", "s3a://"))
    opts = s3_defaults(storage_options or {}) if s3 else (storage_options or {})
    try:
        protocol = fsspec.core.split_protocol(str(url))[0] or "file"
        cache_key = (os.getpid(), protocol, json.dumps(opts, sort_keys=True, default=repr))
        if protocol != "file" and cache_key in _FS_CACHE:
            fs = _FS_CACHE[cache_key]
            return fs, fs._strip_protocol(str(url))
        fs, path = fsspec.core.url_to_fs(str(url), **opts)
    except (ImportError, ValueError) as e:
        raise StorageError(f"cannot open storage for {url}: {e}") from None
    if s3:
        fs.retries = 1  # s3fs's own retry loop (a class attribute, not an option): ``retry`` retries
    if protocol != "file":
        _FS_CACHE[cache_key] = fs
    return fs, path


def s3_defaults(opts: dict) -> dict:
    """S3 options with the client's own retries off (``retry`` does them, visibly: botocore's and
    s3fs's hidden ones turned a server gone for good into two silent minutes) and a 10 s connect
    timeout; settings the storage config gives win."""
    cfg = dict(opts.get("config_kwargs") or {})
    cfg.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
    cfg.setdefault("connect_timeout", 10)
    return {**opts, "config_kwargs": cfg}


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _described(e: BaseException) -> tuple[set[str], str]:
    """The type names in ``e``'s chain of causes, and their messages (an aiohttp/gcsfs error's too)."""
    chain = list(_chain(e))
    return ({type(x).__name__ for x in chain},
            " ".join(str(x) for x in chain) + " " + str(getattr(e, "kwargs", {}).get("error", "")))


def _transient(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, EtcError)):
        return False
    names, text = _described(e)
    if names & set(PERMANENT_ERRORS) or any(m in text for m in DNS_FAILURES):
        return False
    if type(e).__name__ == "ClientError":
        err = (getattr(e, "response", None) or {}).get("Error", {})
        return str(err.get("Code")) in TRANSIENT_CODES
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) or type(e).__module__.split(".")[0] in (
        "botocore", "aiohttp", "urllib3", "requests", "gcsfs", "s3fs", "aiobotocore")


def _hint(e: BaseException, url: str) -> str:
    """What to do about an error no retry fixes, where the cause is a common setup mistake."""
    names, text = _described(e)
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return ("; no credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile) in the environment "
                "(credentials never go in the storage config)")
    if ".amazonaws.com" in text and str(url).startswith(("s3://", "s3a://")):
        return ("; this went to AWS's public endpoint: for any other S3 server give its endpoint_url in a "
                "--storage-config file (client_kwargs: {endpoint_url: ...})")
    return ""


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def retry(what: str, fn, *args, delays=None, **kwargs):
    """Call fn, retrying transient storage errors with backoff (``RETRY_DELAYS`` seconds unless
    ``delays`` is given), logging each retry; then one StorageError line naming ``what``."""
    delays = RETRY_DELAYS if delays is None else delays
    for attempt in range(len(delays) + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - classified below
            transient = _transient(e)
            if not transient or attempt == len(delays):
                if isinstance(e, EtcError):
                    raise
                tries = f" (after {attempt + 1} attempts)" if transient else ""
                raise StorageError(f"{what}: {_one_line(e)}{tries}{_hint(e, what.rsplit(' ', 1)[-1])}") from e
            log.warning("%s: %s; retrying in %.1f s (retry %d of %d)", what, _one_line(e), delays[attempt],
                        attempt + 1, len(delays))
            time.sleep(delays[attempt])


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write an object atomically: it appears complete under ``url`` or not at all."""
    url = str(url)
    if is_local(url):
        try:
            with atomic_open(url) as f:
                f.write(data)
        except OSError as e:
            raise StorageError(f"cannot write {url}: {e}") from None
        return
    fs, path = get_fs(url, storage_options)

    def put():
        parent = posixpath.dirname(path)
        if parent and not fs.exists(parent) and fs.protocol in ("memory", ("memory",)):
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)

    retry(f"cannot write {url}", put)


@contextmanager
def atomic_open(url: str, storage_options: dict | None = None, block_size: int | None = None):
    """Stream a large object; abort (nothing committed) if the body raises or the upload fails.

    ``block_size``: the remote buffer / multipart part size (s3fs's default is 50 MiB; S3's
    minimum part size is 5 MiB)."""
    url = str(url)
    if is_local(url):
        with atomic_local_file(_local_path(url)) as f:
            yield f
        return
    fs, path = get_fs(url, storage_options)
    f = retry(f"cannot write {url}", fs.open, path, "wb", **({"block_size": block_size} if block_size else {}))
    try:
        yield f
    except BaseException as e:
        _abort(f)
        if isinstance(e, Exception) and not isinstance(e, EtcError) and _transient(e):
            raise StorageError(f"cannot write {url}: upload aborted, nothing committed "
                               f"({type(e).__name__}: {e})") from e
        raise
    try:
        f.close()  # completes the upload: the object appears whole, or not at all
    except Exception as e:  # noqa: BLE001
        _abort(f)  # so that a later close() (e.g. at garbage collection) cannot complete it
        raise StorageError(f"cannot write {url}: completing the upload failed, nothing committed "
                           f"({type(e).__name__}: {e})") from e


@contextmanager
def staged_open(url: str, storage_options: dict | None = None):
    """Stream an object of any size with bounded memory, committed atomically and retried.

    Local: ``atomic_open`` (a hidden temporary file, fsynced and renamed). Object stores: the bytes
    go to a local temporary file first, uploaded on success with ``put_file`` (multipart for large
    objects, visible only when complete) and retried like ``write_bytes``; on any exception nothing
    is uploaded. Memory stays at the writer's own buffer whatever the object's size."""
    url = str(url)
    if is_local(url):
        try:
            with atomic_open(url) as f:
                yield f
        except OSError as e:
            raise StorageError(f"cannot write {url}: {e}") from None
        return
    import tempfile

    fs, path = get_fs(url, storage_options)
    with tempfile.NamedTemporaryFile(prefix="etc-data-", suffix=".part") as tmp:
        yield tmp
        tmp.flush()
        retry(f"cannot write {url}", fs.put_file, tmp.name, path)


@contextmanager
def atomic_local_file(path: Path):
    """Write a local file atomically: into a new temporary file next to it (see ``create_temp``),
    fsynced, then renamed over ``path`` (a symlink at ``path`` is replaced, never followed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty file next to ``path``: a hidden name with 64 random bits, created exclusively
    (``O_EXCL``: an existing file or symlink there is never opened) and not inherited by children."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(16):
        tmp = path.with_name(f".{path.name[:200]}.{secrets.token_hex(8)}.part")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def _abort(f) -> None:
    discard = getattr(f, "discard", None)
    if discard is not None:
        try:
            discard()  # abort the multipart upload
        except Exception:  # noqa: BLE001 - e.g. the server is down: the upload stays uncompleted,
            pass  # which object stores never show under the final name
    f.closed = True  # so that close() in __del__ does not commit what was buffered


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    url = str(url)
    if is_local(url):
        try:
            return _local_path(url).read_bytes()
        except FileNotFoundError:
            raise StorageNotFound(f"{url} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot read {url}: {e}") from None
    fs, path = get_fs(url, storage_options)

    def get():
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            raise StorageNotFound(f"{url} does not exist") from None

    return retry(f"cannot read {url}", get)


@contextmanager
def open_read(url: str, storage_options: dict | None = None):
    """A readable binary file object for streaming an object (opening is retried; errors name the URL)."""
    url = str(url)
    if is_local(url):
        try:
            f = open(_local_path(url), "rb")
        except FileNotFoundError:
            raise StorageNotFound(f"{url} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot read {url}: {e}") from None
    else:
        fs, path = get_fs(url, storage_options)

        def op():
            try:
                return fs.open(path, "rb")
            except FileNotFoundError:
                raise StorageNotFound(f"{url} does not exist") from None

        f = retry(f"cannot read {url}", op)
    try:
        with f:
            yield f
    except OSError as e:  # ConnectionError and TimeoutError included
        raise StorageError(f"cannot read {url}: {type(e).__name__}: {e}") from e


# Local paths are served by os directly here (as by read_bytes, open_read and the writers above):
# fsspec's import alone (it brings asyncio) costs ~0.3 s, paid in the middle of a local run's commit.

def exists(url: str, storage_options: dict | None = None) -> bool:
    if is_local(str(url)):
        return _local_path(str(url)).exists()
    fs, path = get_fs(url, storage_options)
    return bool(retry(f"cannot check {url}", fs.exists, path))


def list_names(url: str, storage_options: dict | None = None) -> list[str]:
    """Base names of the files directly under a folder URL ([] if it does not exist)."""
    if is_local(str(url)):
        try:
            return sorted(os.listdir(_local_path(str(url))))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise StorageError(f"cannot list {url}: {e}") from None
    fs, path = get_fs(url, storage_options)

    def ls():
        try:
            fs.invalidate_cache(path)
        except Exception:  # noqa: BLE001 - not every filesystem caches
            pass
        try:
            return [posixpath.basename(str(p).rstrip("/")) for p in fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    return sorted(retry(f"cannot list {url}", ls))


def remove(url: str, storage_options: dict | None = None) -> None:
    if is_local(str(url)):
        try:
            _local_path(str(url)).unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"cannot remove {url}: {e}") from None
        return
    fs, path = get_fs(url, storage_options)

    def rm():
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    retry(f"cannot remove {url}", rm)


def size(url: str, storage_options: dict | None = None) -> int:
    if is_local(str(url)):
        try:
            return _local_path(str(url)).stat().st_size
        except FileNotFoundError:
            raise StorageNotFound(f"{url} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot stat {url}: {e}") from None
    fs, path = get_fs(url, storage_options)
    return int(retry(f"cannot stat {url}", fs.size, path))


def _is_secret_name(name: str) -> bool:
    n = str(name).lower().replace("-", "_")
    return n in SECRET_FIELDS or any(n.endswith("_" + f) for f in SECRET_FIELDS if f != "key")


def _find_secret(obj: Any, where: str) -> str | None:
    """Dotted path of the first secret-looking field in a nested config, or None."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        here = f"{where}[{k}]" if isinstance(obj, list) else (f"{where}.{k}" if where else str(k))
        if (isinstance(obj, dict) and _is_secret_name(k)) or (isinstance(v, str) and _SECRET_VALUE.search(v)):
            return here
        found = _find_secret(v, here)
        if found:
            return found
    return None


def check_no_secrets(doc: Any, source: str) -> None:
    """Refuse config content with a secret-looking field (credentials come from the environment)."""
    field = _find_secret(doc, "")
    if field:
        raise StorageError(f"{source}: field {field!r} looks like a secret; credentials must come from the "
                           f"environment or the provider's credential chain, never from a config file")


def read_config_yaml(path: str | os.PathLike, what: str, error=None) -> dict:
    """Read a YAML config file that must be a mapping with no secret-looking field; errors are
    ``error`` (default StorageError) naming ``what`` and the file."""
    import yaml

    error = error or StorageError
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise error(f"{what} {p} does not exist") from None
    except yaml.YAMLError as e:
        raise error(f"{what} {p}: invalid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise error(f"{what} {p}: must be a mapping of fields")
    try:
        check_no_secrets(doc, f"{what} {p}")
    except StorageError as e:
        raise error(str(e)) from None
    return doc


def load_storage_config(path: str | os.PathLike) -> dict:
    """Read a storage YAML (``url`` + optional ``storage_options``), refusing secret fields."""
    p = Path(path)
    doc = read_config_yaml(p, "storage config")
    if not isinstance(doc.get("url"), str):
        raise StorageError(f"storage config {p}: field 'url' (a string) is required")
    opts = doc.get("storage_options") or {}
    if not isinstance(opts, dict):
        raise StorageError(f"storage config {p}: field 'storage_options' must be a mapping")
    unknown = set(doc) - {"url", "storage_options"}
    if unknown:
        raise StorageError(f"storage config {p}: unknown field(s) {', '.join(sorted(unknown))}; valid: url, storage_options")
    return {"url": doc["url"], "storage_options": opts}
