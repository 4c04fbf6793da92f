"""`--state-repair` for SQLite: move the damaged files aside, copy every row that still reads into a
fresh store, and say per table what was kept and what was dropped.

Python's sqlite3 has no `.recover`; this reads a copy of the damaged files row by row instead. A row
is read by its rowid, so one damaged page costs the rows on it, not the rest of the table; a run of
rowids that cannot be reached at all is skipped and counted.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from octoflux.state.sqlite_files import read_db_header, scan_wal, sidecar
from octoflux.state.sqlite_store import SqliteStateStore
from octoflux.state.store import StateStoreError

MAX_ROWID = 2**63 - 1
SIDECARS = ("-wal", "-shm")


@dataclass
class TableSalvage:
    """What became of one table's rows."""

    name: str
    kept: int = 0
    unreadable: int = 0  # rows that were found but did not read back whole
    skipped_rowids: int = 0  # at most this many more rows in pages that could not be reached
    rest_lost: bool = False  # a damaged page stopped the scan: the rows after it are gone

    def dropped(self) -> str | None:
        parts = []
        if self.unreadable:
            parts.append(f"{self.unreadable} unreadable rows")
        if self.skipped_rowids:
            parts.append(f"up to {self.skipped_rowids} rows in damaged pages")
        if self.rest_lost:
            parts.append("every row after the last one read" if self.kept else "all its rows")
        return f"{self.name}: {', '.join(parts)}" if parts else None


@dataclass
class RepairReport:
    moved_to: Path
    started: Path
    tables: list[TableSalvage] = field(default_factory=list)
    schema_lost: bool = False

    def lines(self) -> list[str]:
        """What the log says: where the damaged files went, what was kept, what was dropped."""
        lines = [
            f"moved the damaged files to {self.moved_to}; a fresh store at {self.started} holds what read"
        ]
        if self.schema_lost:
            return [*lines, "dropped everything: the damaged file's list of tables could not be read"]
        if not self.tables:
            return [*lines, "kept nothing: the damaged file held no tables of its own"]
        lines.append("kept " + ", ".join(f"{t.name} {t.kept}" for t in self.tables))
        dropped = [text for t in self.tables if (text := t.dropped())]
        if dropped:
            lines.append("dropped " + "; ".join(dropped) + " (damaged pages)")
        else:
            lines.append("dropped no row it could find; the damage named above is all that was lost")
        return lines


def repair_sqlite(path: Path) -> RepairReport:
    """Move `path` (with its -wal and -shm) aside, start a fresh store there, copy what reads into it.

    A repair that fails half way puts the damaged files back, so the next start refuses again rather
    than serving a half-copied store; StateStoreError says why.
    """
    aside = move_aside(path)
    try:
        return salvage_into(aside, path)
    except (OSError, sqlite3.Error, StateStoreError) as exc:
        for suffix in ("", *SIDECARS):
            sidecar(path, suffix).unlink(missing_ok=True)
            if sidecar(aside, suffix).exists():
                sidecar(aside, suffix).rename(sidecar(path, suffix))
        raise StateStoreError(
            f"--state-repair of {path} failed, the damaged files are back in place: {exc}"
        ) from None


def salvage_into(aside: Path, path: Path) -> RepairReport:
    with tempfile.TemporaryDirectory(prefix=".repair-", dir=path.parent) as scratch:
        source = Path(scratch) / "damaged.db"
        for suffix in ("", "-wal"):  # not -shm: SQLite rebuilds the index from the log
            if sidecar(aside, suffix).exists():
                shutil.copyfile(sidecar(aside, suffix), sidecar(source, suffix))
        if sidecar(source, "-wal").exists():
            source.touch()  # a missing file beside a log: page 1 comes back from the log
        if source.exists():
            make_readable(source)
        SqliteStateStore(path).close()
        report = RepairReport(aside, path)
        with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(path)) as dst:
            try:
                tables = _table_names(src)
            except sqlite3.DatabaseError:
                report.schema_lost = True
                return report
            for table in _table_names(dst):
                if table in tables:
                    report.tables.append(copy_table(src, dst, table))
    return report


def move_aside(path: Path) -> Path:
    """`state.db` -> `state.db.damaged-<UTC time>`, its -wal and -shm along (SQLite's names for them)."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    for suffix in ("", *SIDECARS):
        if sidecar(path, suffix).exists():
            sidecar(path, suffix).rename(sidecar(aside, suffix))
    return aside


def make_readable(source: Path) -> None:
    """Give the scratch copy what SQLite needs to read it at all: page 1 taken back from the log when
    the file lost its header (an empty file over a whole log loses nothing), and zeros where a
    truncated file ends short of the size its header records (those pages then read as damaged)."""
    wal = sidecar(source, "-wal")
    scan = scan_wal(wal) if wal.exists() else None
    if read_db_header(source) is None and scan is not None and scan.first_page is not None:
        with source.open("r+b") as file:
            file.write(scan.first_page)
    header = read_db_header(source)
    if header is not None and header.pages is not None:
        os.truncate(source, max(source.stat().st_size, header.pages * header.page_size))


def copy_table(src: sqlite3.Connection, dst: sqlite3.Connection, table: str) -> TableSalvage:
    salvage = TableSalvage(table)
    columns = [c for c in _columns(dst, table) if c in set(_columns(src, table))]
    names = ", ".join(f'"{c}"' for c in columns)
    insert = f'INSERT OR IGNORE INTO "{table}" ({names}) VALUES ({", ".join("?" * len(columns))})'
    rows = (
        _rows_by_rowid(src, table, names, salvage)
        if _has_rowid(src, table)
        else _rows(src, table, names, salvage)
    )
    with dst:
        for row in rows:
            try:
                dst.execute(insert, row)
                salvage.kept += 1
            except sqlite3.Error:  # a garbled value that breaks a constraint
                salvage.unreadable += 1
    return salvage


def _rows_by_rowid(src: sqlite3.Connection, table: str, names: str, salvage: TableSalvage) -> Iterator[tuple]:
    for rowid in known_rowids(src, table, salvage):
        try:
            row = src.execute(f'SELECT {names} FROM "{table}" WHERE rowid = ?', (rowid,)).fetchone()
        except sqlite3.DatabaseError:  # a damaged page under the row (its big value's overflow pages)
            row = None
        if row is None:
            salvage.unreadable += 1
        else:
            yield row


def known_rowids(src: sqlite3.Connection, table: str, salvage: TableSalvage) -> list[int]:
    """The rowids the table's own b-tree and its indexes still list; an index read to its end lists
    them all, so no row goes uncounted; otherwise the gaps the table scan skipped are counted."""
    from_table, gaps, complete = _table_rowids(src, table)
    found = set(from_table)
    for (index,) in src.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", (table,)
    ):
        try:  # a partial index cannot list every row: "no query solution"
            found.update(
                rowid for (rowid,) in src.execute(f'SELECT rowid FROM "{table}" INDEXED BY "{index}"')
            )
            complete = True
        except sqlite3.DatabaseError:
            pass
    if not complete:
        closed = [(lo, hi) for lo, hi in gaps if hi != MAX_ROWID]
        salvage.skipped_rowids = sum(hi - lo + 1 - sum(lo <= r <= hi for r in found) for lo, hi in closed)
        salvage.rest_lost = gaps[-1][1] == MAX_ROWID
    return sorted(found)


def _table_rowids(src: sqlite3.Connection, table: str) -> tuple[list[int], list[tuple[int, int]], bool]:
    """Rowids in the table's b-tree, the runs skipped over damaged pages, and whether none was skipped."""
    rowids: list[int] = []
    gaps: list[tuple[int, int]] = []
    after = 0
    while True:
        try:
            for (rowid,) in src.execute(
                f'SELECT rowid FROM "{table}" WHERE rowid > ? ORDER BY rowid', (after,)
            ):
                rowids.append(rowid)
                after = rowid
            return rowids, gaps, not gaps
        except sqlite3.DatabaseError:
            resume = _next_reachable(src, table, after)
            gaps.append((after + 1, MAX_ROWID if resume is None else resume - 1))
            if resume is None:
                return rowids, gaps, False
            after = resume - 1


def _next_reachable(src: sqlite3.Connection, table: str, after: int) -> int | None:
    """The first rowid past a damaged page: seek ever further past `after` until a seek reads."""
    step = 1
    while after + step < MAX_ROWID:
        try:
            row = src.execute(
                f'SELECT rowid FROM "{table}" WHERE rowid > ? ORDER BY rowid LIMIT 1', (after + step,)
            ).fetchone()
        except sqlite3.DatabaseError:
            step *= 2
            continue
        return None if row is None else row[0]
    return None


def _rows(src: sqlite3.Connection, table: str, names: str, salvage: TableSalvage) -> Iterator[tuple]:
    """A table without rowids (progress events): read in order until a damaged page stops the scan."""
    try:
        yield from src.execute(f'SELECT {names} FROM "{table}"')
    except sqlite3.DatabaseError:
        salvage.rest_lost = True


def _table_names(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    return [name for (name,) in rows]


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')]


def _has_rowid(conn: sqlite3.Connection, table: str) -> bool:
    try:
        conn.execute(f'SELECT rowid FROM "{table}" LIMIT 0')
        return True
    except sqlite3.OperationalError:
        return False
