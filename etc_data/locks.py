"""One writer per dataset: the lock a prepare run holds on its output root.

Two prepare runs into one output would write shards of the same names over each other and commit
manifests listing each other's half-replaced shards. ``dataset_lock(root)`` is held from planning
to the commit; a second writer gets a ``LockError`` naming the holder (user@host, pid, since when).

- Local disk: ``ROOT/.etc-data.lock``, an ``flock`` on an open file. The kernel releases it when
  the process dies, however it dies, so a killed run never blocks the next one. The file carries
  the holder's description for the error; it is removed on release.
- Object storage (s3://, gs://, ...): an object ``ROOT/.etc-data.lock`` created with a conditional
  write (``If-None-Match: *``, GCS ``ifGenerationMatch=0``) holding the holder, a run id and an
  expiry (``LEASE_S``), renewed by a background thread every ``LEASE_S / 4`` seconds. A lock whose
  holder is gone (same host and its pid is dead, or its lease expired) is stale: it is deleted only
  if it is still that exact object (S3 ``If-Match`` on its ETag, a GCS generation), then created
  anew, so two runs taking over one stale lock cannot both win. ``check()`` before the commit
  confirms the lock is still this run's.

The commit also checks that each manifest it replaces is the one the run planned from
(``prepare.commit_split``), which catches any writer that bypassed the lock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import EtcError
from .storage import StorageError, _local_path, get_fs, is_local, join, read_bytes, write_bytes

LOCK_NAME = ".etc-data.lock"
LEASE_S = 300.0


class LockError(EtcError):
    """Another run holds the dataset's lock, or this run lost it (the message names the holder)."""


def _holder() -> dict:
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return {"holder": f"{user}@{socket.gethostname()} pid {os.getpid()}", "host": socket.gethostname(),
            "pid": os.getpid(), "run": uuid.uuid4().hex, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _busy(root: str, doc: dict | None) -> LockError:
    if not doc:
        return LockError(f"{root} is being written by another prepare run (its lock {LOCK_NAME} names no holder "
                         f"yet); wait for it to finish")
    until = f", lease until {time.strftime('%H:%M:%SZ', time.gmtime(doc['expires']))}" if "expires" in doc else ""
    return LockError(f"{root} is being written by another prepare run ({doc.get('holder', '?')}, since "
                     f"{doc.get('since', '?')}{until}); wait for it to finish")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def is_stale(doc: dict, now: float | None = None) -> bool:
    """A lock whose holder is gone: its lease expired, or it is on this host and its pid is dead."""
    now = time.time() if now is None else now
    if float(doc.get("expires", 0)) < now:
        return True
    return doc.get("host") == socket.gethostname() and not _pid_alive(doc.get("pid"))


class _LocalLock:
    def __init__(self, root: Path):
        self.root, self.path, self.fd = root, root / LOCK_NAME, None

    def acquire(self, doc: dict) -> None:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        while True:
            fd = os.open(self.path, flags, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 4096, 0)
                os.close(fd)
                raise _busy(str(self.root), _parse(text)) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder removed the file between our open and flock: try the new one
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(doc).encode(), 0)
        self.fd = fd

    def check(self) -> None:
        pass  # a held flock cannot be taken away

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # still locked: nobody can lock the removed file meanwhile
            os.close(self.fd)
            self.fd = None


def _parse(raw: bytes) -> dict | None:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


class _ObjectLock:
    """The lock object on an object store (see the module docstring)."""

    def __init__(self, root: str, storage_options: dict | None):
        self.root, self.url, self.opts = root, join(root, LOCK_NAME), storage_options
        self.fs, self.path = get_fs(self.url, storage_options)
        self.doc: dict | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, doc: dict) -> None:
        for _ in range(3):
            body = dict(doc, expires=time.time() + LEASE_S)
            if self._create(body):
                self.doc = body
                self._thread = threading.Thread(target=self._renew, name="etc-data-lock", daemon=True)
                self._thread.start()
                return
            current, token = self._read()
            if current is not None and not is_stale(current):
                raise _busy(self.root, current)
            if current is not None:
                self._remove_if(token)
        raise LockError(f"{self.root}: could not take the stale lock {LOCK_NAME} (another run is taking it over)")

    def _create(self, body: dict) -> bool:
        try:
            self.fs.pipe_file(self.path, json.dumps(body).encode(), mode="create")
            return True
        except Exception as e:  # noqa: BLE001 - "exists" looks different on every store
            try:
                if self.fs.exists(self.path):
                    return False
            except Exception:  # noqa: BLE001
                pass
            raise StorageError(f"cannot create {self.url}: {type(e).__name__}: {e}") from None

    def _read(self) -> tuple[dict | None, object]:
        """The lock's content and its version token (S3 ETag, GCS generation; None elsewhere)."""
        try:
            self.fs.invalidate_cache(self.path)
            info = self.fs.info(self.path)
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        return _parse(raw) or {}, info.get("ETag") or info.get("generation")

    def _remove_if(self, token) -> None:
        """Delete the lock only if it is still the version ``token`` names."""
        proto = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        try:
            if proto in ("s3", "s3a") and token:
                bucket, key, _ = self.fs.split_path(self.path)
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=token)
            elif proto in ("gs", "gcs") and token:
                from fsspec.asyn import sync

                bucket, key, _ = self.fs.split_path(self.path)
                sync(self.fs.loop, self.fs._call, "DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(token))
            else:
                self.fs.rm_file(self.path)
            self.fs.invalidate_cache(self.path)
        except (FileNotFoundError, OSError):
            pass  # changed or gone since we read it: the next attempt reads it again

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_S / 4):
            try:
                current, _ = self._read()
                if not current or current.get("run") != self.doc["run"]:
                    self.lost = (current or {}).get("holder", "nobody")
                    return
                self.doc = dict(self.doc, expires=time.time() + LEASE_S)
                write_bytes(self.url, json.dumps(self.doc).encode(), self.opts)
            except (StorageError, OSError):
                continue  # the next renewal retries; the lease has time left

    def check(self) -> None:
        current, _ = self._read()
        if self.lost or not current or current.get("run") != self.doc["run"]:
            holder = self.lost or (current or {}).get("holder", "nobody")
            raise LockError(f"{self.root}: this run's lock {LOCK_NAME} was taken over (now held by {holder}; this "
                            f"run was stalled past its lease); nothing was committed, run prepare again")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            current, token = self._read()
            if current and current.get("run") == self.doc["run"]:
                self._remove_if(token)
        except (StorageError, OSError):
            pass  # it expires on its own


@contextmanager
def dataset_lock(root: str, storage_options: dict | None = None):
    """Hold the write lock of dataset ``root`` for the block; yields an object whose ``check()``
    raises LockError if the lock is no longer this run's."""
    root = str(root)
    lock = _LocalLock(_local_path(root)) if is_local(root) \
        else _ObjectLock(root, storage_options)
    lock.acquire(_holder())
    try:
        yield lock
    finally:
        lock.release()


def read_lock(root: str, storage_options: dict | None = None) -> dict | None:
    """The holder description in ``root``'s lock (None when there is none): for messages and tests."""
    try:
        return _parse(read_bytes(join(root, LOCK_NAME), storage_options))
    except StorageError:
        return None
