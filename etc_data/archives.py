"""Archives that hold plain images: reading zip members by name, and extracting tar archives once.

``ZipArchive`` parses a zip's central directory in one pass (zipfile builds a ``ZipInfo`` per
member, about 4x slower on CIFAR-10's 60,000) and reads members with ``os.pread`` at their
offsets: no memory map, so an archive truncated while it is read gives an error naming the
member instead of killing the process with SIGBUS. Archives it does not handle (zip64,
multi-disk, data before the archive) go through ``zipfile``. A member is never inflated past its
declared size, and a declared size past ``ImageLimits.max_bytes`` is refused before inflating (a
3 MB zip can hold a 3 GiB member); a member name that appears twice and a password-protected
member are errors naming them.

``extract_archive`` unpacks a ``.tar``/``.tgz``/``.tar.gz`` once into a cache folder, under a
file lock, because the planner and every pool worker may open the same source at once; tar's
``data`` filter refuses links and paths that leave the folder, and a member past
``ImageLimits.max_bytes`` stops the extraction.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .errors import SourceError
from .images import DEFAULT_LIMITS, ImageLimits

# a central directory header (46 bytes): signature, flags, method, crc, sizes, name/extra/comment
# lengths and the local header's offset (versions, times, disk and attributes skipped)
_CD_ENTRY = struct.Struct("<4s4x2H4x3L3H8xL")


def _end_record(f) -> tuple[bytes, int, int]:
    """(the file's last bytes, where the end-of-central-directory record starts in them, where
    those bytes start in the file); the record's position is -1 when there is none."""
    f.seek(0, 2)
    size = f.tell()
    start = size - min(size, 65536 + 22)
    f.seek(start)
    tail = f.read()
    i = tail.rfind(b"PK\x05\x06")
    return tail, (i if i >= 0 and len(tail) - i >= 22 else -1), start


def read_zip_directory(path: Path) -> dict[str, tuple] | None:
    """A zip's central directory as {member: (header offset, compressed size, method, crc, flags,
    uncompressed size)}, or None for what this reader does not handle (zipfile then reads it)."""
    with open(path, "rb") as f:
        tail, i, start = _end_record(f)
        if i < 0:
            raise zipfile.BadZipFile("no end of central directory record")
        _, disk, cd_disk, _, n_total, cd_size, cd_off, _ = struct.unpack_from("<4sHHHHIIH", tail, i)
        eocd = start + i
        if (disk or cd_disk or n_total == 0xFFFF or 0xFFFFFFFF in (cd_size, cd_off)
                or tail[max(0, i - 20):max(0, i - 16)] == b"PK\x06\x07" or eocd - cd_size != cd_off):
            return None
        f.seek(cd_off)
        cd = f.read(cd_size)
    out, pos, unpack = {}, 0, _CD_ENTRY.unpack_from
    while pos + 46 <= len(cd):
        sig, flags, method, crc, csize, usize, nlen, xlen, clen, hoff = unpack(cd, pos)
        if sig != b"PK\x01\x02":
            raise zipfile.BadZipFile(f"bad central directory entry at byte {cd_off + pos}")
        raw = cd[pos + 46:pos + 46 + nlen]
        if b"\0" in raw:
            raw = raw[:raw.index(b"\0")]
        pos += 46 + nlen + xlen + clen
        if 0xFFFFFFFF in (csize, usize, hoff):
            return None
        # (ASCII names read the same in cp437 and UTF-8; UTF-8's decoder is the fast one)
        name = raw.decode("utf-8" if flags & 0x800 or raw.isascii() else "cp437")
        if name in out:
            raise zipfile.BadZipFile(f"member {name} appears twice")
        out[name] = (hoff, csize, method, crc, flags, usize)
    return out if len(out) == n_total else None


def zip_entry_count(path: Path) -> int | None:
    """How many entries (files and folders) a zip's end record declares, read from its last bytes
    without listing it; None when it cannot tell (not a zip, zip64)."""
    try:
        with open(path, "rb") as f:
            tail, i, _ = _end_record(f)
    except OSError:
        return None
    if i < 0:
        return None
    n = struct.unpack_from("<H", tail, i + 10)[0]
    return None if n == 0xFFFF else n


_HEAD_SLACK = 512  # bytes read past a member's 30-byte local header in the same call (its name and extra field)


class ZipArchive:
    """Members of one zip file, read by name (thread-safe: ``pread`` keeps no file position)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._fd: int | None = None
        try:
            infos = read_zip_directory(self.path)
            if infos is None:  # zip64, prepended data, ...: zipfile's general reader
                self._zip = zipfile.ZipFile(self.path)
                listed = self._zip.infolist()
                infos = {i.filename: (i.header_offset, i.compress_size, i.compress_type, i.CRC, i.flag_bits,
                                      i.file_size) for i in listed}
                if len(infos) != len(listed):
                    dup = next(n for n in infos if sum(i.filename == n for i in listed) > 1)
                    raise zipfile.BadZipFile(f"member {dup} appears twice")
        except (zipfile.BadZipFile, OSError) as e:
            raise SourceError(f"{self.path} is not a readable .zip file ({e})") from None
        # kept compact: name -> row of one int64 table (a tuple of 6 ints per member is ~200 bytes)
        self._rows = {n: i for i, n in enumerate(infos)}
        self._table = np.array(list(infos.values()), np.int64).reshape(-1, 6)

    @property
    def names(self) -> list[str]:
        """Member names of files (not folders)."""
        return [n for n in self._rows if not n.endswith("/")]

    def _info(self, name: str) -> tuple | None:
        """(header offset, compressed size, method, crc, flags, size) of a member, or None."""
        i = self._rows.get(name)
        return None if i is None else tuple(self._table[i].tolist())

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self._fd

    def _pread(self, n: int, off: int) -> bytes:
        data = os.pread(self._file(), n, off)
        if len(data) != n:
            raise OSError(f"archive ends {n - len(data)} bytes early (truncated or changed while being read)")
        return data

    def _read_fast(self, name: str, info: tuple) -> bytes | None:
        """A stored or deflated member (``info``: its ``_info``) straight from its offset (zipfile's
        per-member open costs ~50 us, this ~5 us), never inflated past its declared size; None when
        the member needs zipfile's general path."""
        if self._zip is not None:
            return None
        off, csize, method, crc, _, usize = info
        if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            return None
        # one read for the local header, its name and extra field (guessed to fit in _HEAD_SLACK
        # bytes) and the data: a system call per member, not two (~10 % of a 32 px run)
        buf = os.pread(self._file(), 30 + _HEAD_SLACK + csize, off)
        if len(buf) < 30 or buf[:4] != b"PK\x03\x04":
            return None
        start = 30 + sum(struct.unpack("<HH", buf[26:30]))
        data = buf[start:start + csize]
        if len(data) < csize:  # a longer name or extra field than guessed, or the archive ends early
            data = self._pread(csize, off + start)
        if method == zipfile.ZIP_DEFLATED:
            inflater = zlib.decompressobj(-15)
            data = inflater.decompress(data, usize + 1)
            if len(data) > usize or inflater.unconsumed_tail:
                raise SourceError(f"{self.path}:{name}: inflates past its declared size of {usize:,} bytes "
                                  f"(a decompression bomb or a corrupt archive)")
        if zlib.crc32(data) != crc:
            raise SourceError(f"cannot read {self.path}:{name}: CRC check failed (corrupt archive)")
        return data

    def read(self, name: str, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
        """The bytes of member ``name``; a SourceError naming ``path:name`` when it cannot be read,
        is password-protected, or declares more than ``limits.max_bytes`` uncompressed bytes."""
        info = self._info(name)
        if info is None:
            raise SourceError(f"cannot read {self.path}:{name}: no such member")
        if info[4] & 0x1:
            raise SourceError(f"{self.path}:{name}: the member is encrypted (password-protected zip members "
                              f"are not supported; extract it first)")
        limits.check_bytes(max(info[1], info[5]), f"{self.path}:{name}", "member")
        try:
            data = self._read_fast(name, info)
            if data is None:
                if self._zip is None:
                    self._zip = zipfile.ZipFile(self.path)
                with self._zip.open(name) as f:  # zipfile reads no more than the declared size
                    data = f.read(limits.max_bytes + 1)
                limits.check_bytes(len(data), f"{self.path}:{name}", "member")
            return data
        except (OSError, KeyError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError) as e:
            raise SourceError(f"cannot read {self.path}:{name}: {e}") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._zip is not None:
            self._zip.close()

    def __getstate__(self):  # a process that receives this opens its own file
        state = dict(self.__dict__)
        state["_fd"], state["_zip"] = None, None
        return state


def _member_filter(limits: ImageLimits):
    """tar's ``data`` filter (no links or paths out of the folder), plus the per-member size limit."""
    import tarfile

    def check(member, dest):
        member = tarfile.data_filter(member, dest)
        if member.size > limits.max_bytes:
            raise tarfile.FilterError(f"member {member.name} is {member.size:,} bytes, over the limit of "
                                      f"{limits.max_bytes:,} (raise it with --max-image-bytes)")
        return member
    return check


def extract_archive(path: Path, limits: ImageLimits = DEFAULT_LIMITS) -> Path:
    """Extract a .tar/.tgz/.tar.gz once into ~/.cache/etc-data/extracted (or $ETC_DATA_CACHE)."""
    import fcntl
    import hashlib
    import shutil
    import tarfile

    st = path.stat()
    tag = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    base = Path(os.environ.get("ETC_DATA_CACHE", Path.home() / ".cache" / "etc-data")) / "extracted"
    dest = base / f"{path.name.split('.')[0]}-{tag}"
    if (dest / ".complete").exists():
        return dest
    base.mkdir(parents=True, exist_ok=True)
    # one extraction at a time: the planner and every pool worker open the source at once
    with open(base / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / ".complete").exists():
            tmp = dest.with_name(dest.name + ".part")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                with tarfile.open(path) as t:
                    t.extractall(tmp, filter=_member_filter(limits))
            except (tarfile.TarError, OSError, EOFError) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise SourceError(f"{path}: cannot extract archive ({e})") from None
            (tmp / ".complete").touch()
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
    return dest
