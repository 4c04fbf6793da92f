"""SQLite's files read as bytes, without SQLite: the database header, the write-ahead log and its index.

Formats: https://www.sqlite.org/fileformat2.html (database header, WAL) and https://www.sqlite.org/walformat.html
(the `-shm` index and its locks). Reading them before SQLite opens the database matters: SQLite treats
a damaged log as empty and then overwrites it.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

SQLITE_MAGIC = b"SQLite format 3\x00"
WAL_MAGICS = (0x377F0682, 0x377F0683)  # the low bit says the checksums' byte order (1: big-endian)
WAL_VERSION = 3007000
WAL_HEADER_BYTES = 32
WAL_FRAME_HEADER_BYTES = 24
SHM_HEADER = struct.Struct("=IIIBBHII2I8s2I")  # WalIndexHdr, in this machine's byte order
SHM_DMS_LOCK_BYTE = 128  # every open connection holds a read lock on it (SQLite's unix VFS)
_FLOCK = "hhqqi4x"  # Linux's struct flock


@dataclass(frozen=True)
class DbHeader:
    page_size: int
    pages: int | None  # the size the header records, when SQLite marked that field current
    wal_mode: bool  # SQLite reads a -wal beside the file only when this is set


@dataclass(frozen=True)
class WalScan:
    """What SQLite would make of a write-ahead log: how many of its frames it would use."""

    page_size: int
    salts: bytes
    frames: int  # valid frames, in order, before the first invalid one
    committed: int  # the last valid frame that ends a transaction: SQLite uses frames 1..committed
    whole: bool  # the file ends on a frame boundary
    first_page: bytes | None  # the database's page 1 as of the last commit that wrote it


def sidecar(path: Path, suffix: str) -> Path:
    """`state.db-wal` and `state.db-shm`: SQLite's names for a database's log and its index."""
    return path.with_name(path.name + suffix)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def read_db_header(path: Path) -> DbHeader | None:
    """The header of a SQLite database file; None when the file does not start with one."""
    with path.open("rb") as file:
        header = file.read(100)
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        return None
    page_size = page_size_of(struct.unpack(">H", header[16:18])[0])
    if page_size is None:
        return None
    current = header[24:28] == header[92:96]  # change counter == version-valid-for
    pages = struct.unpack(">I", header[28:32])[0] if current else None
    return DbHeader(page_size, pages, wal_mode=header[18:20] == b"\x02\x02")


def scan_wal(wal: Path) -> WalScan | None:
    """Walk the log as SQLite does (salts, then cumulative checksums); None when its header is unusable."""
    with wal.open("rb") as file:
        header = file.read(WAL_HEADER_BYTES)
        if len(header) < WAL_HEADER_BYTES:
            return None
        magic, version, raw_page_size = struct.unpack(">III", header[:12])
        page_size = page_size_of(raw_page_size)
        if magic not in WAL_MAGICS or version != WAL_VERSION or page_size is None:
            return None
        order = ">" if magic & 1 else "<"
        checksum = wal_checksum(header[:24], (0, 0), order)
        if checksum != struct.unpack(">II", header[24:32]):
            return None
        salts, frames, committed = header[16:24], 0, 0
        first_page = pending_first_page = None
        frame_bytes = WAL_FRAME_HEADER_BYTES + page_size
        while len(frame := file.read(frame_bytes)) == frame_bytes:
            if frame[8:16] != salts:
                break
            checksum = wal_checksum(frame[24:], wal_checksum(frame[:8], checksum, order), order)
            if checksum != struct.unpack(">II", frame[16:24]):
                break
            frames += 1
            page_no, size_after_commit = struct.unpack(">II", frame[:8])
            if page_no == 1:
                pending_first_page = frame[WAL_FRAME_HEADER_BYTES:]
            if size_after_commit:  # 0 inside a transaction
                committed, first_page = frames, pending_first_page or first_page
    whole = (file_size(wal) - WAL_HEADER_BYTES) % frame_bytes == 0
    return WalScan(page_size, salts, frames, committed, whole, first_page)


def wal_checksum(data: bytes, seed: tuple[int, int], order: str) -> tuple[int, int]:
    """SQLite's WAL checksum of data (a multiple of 8 bytes), continued from seed."""
    s0, s1 = seed
    words = struct.unpack(f"{order}{len(data) // 4}I", data)
    for first, second in zip(words[::2], words[1::2], strict=True):
        s0 = (s0 + first + s1) & 0xFFFFFFFF
        s1 = (s1 + second + s0) & 0xFFFFFFFF
    return s0, s1


def shm_committed_frames(shm: Path, salts: bytes) -> int | None:
    """The last committed frame the index recorded for this generation of the log; None if unknown."""
    try:
        with shm.open("rb") as file:
            raw = file.read(2 * SHM_HEADER.size)
    except OSError:
        return None
    if len(raw) < 2 * SHM_HEADER.size or raw[: SHM_HEADER.size] != raw[SHM_HEADER.size :]:
        return None  # torn or never written: SQLite rebuilds it from the log
    fields = SHM_HEADER.unpack(raw[: SHM_HEADER.size])
    is_init, max_frame, shm_salts = fields[3], fields[6], fields[10]
    return max_frame if is_init and shm_salts == salts else None


def in_use(shm: Path) -> bool:
    """Whether another process has the database open: it holds a lock in the index file."""
    try:
        fd = os.open(shm, os.O_RDONLY)
    except OSError:
        return False  # no index: no process has the database open in WAL mode
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, SHM_DMS_LOCK_BYTE, 1, 0)
        return struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))[0] != fcntl.F_UNLCK
    except OSError:
        return True  # cannot tell: leave the files alone and let SQLite read them
    finally:
        os.close(fd)


def page_size_of(raw: int) -> int | None:
    size = 65536 if raw == 1 else raw
    return size if 512 <= size <= 65536 and size & (size - 1) == 0 else None
