"""The embedded database: one SQLite file (WAL) shared by the ledger and the queue.

All writes of a process go through one writer thread that commits them in groups: concurrent
requests queue their write functions, the writer runs as many as are waiting in one transaction
(each inside a savepoint, so one failure does not sink the others), commits once (one fsync for
the group), and only then resolves every caller's future. That is how a single process
acknowledges thousands of callbacks per second while acknowledging nothing before it is on disk.
Reads use per-thread connections; WAL lets them run beside the writer. Several processes may
share the file: BEGIN IMMEDIATE plus a busy timeout serialises their writers.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    provider TEXT NOT NULL,
    job_id TEXT NOT NULL,
    state TEXT NOT NULL,
    job_type TEXT,
    first_seen_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    completed_at REAL,
    failed_at REAL,
    archived_at REAL,
    deadline REAL,
    error TEXT,
    credits_refunded INTEGER,
    metadata TEXT NOT NULL DEFAULT '{}',
    tracking TEXT,
    UNIQUE (provider, job_id)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    provider TEXT NOT NULL,
    job_id TEXT NOT NULL,
    delivery_id TEXT,
    received_at REAL NOT NULL,
    source TEXT NOT NULL,
    auth TEXT NOT NULL,
    event TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    body BLOB NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_job ON deliveries (provider, job_id, seq);
CREATE INDEX IF NOT EXISTS deliveries_id ON deliveries (provider, delivery_id);
CREATE TABLE IF NOT EXISTS assets (
    provider TEXT NOT NULL,
    job_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    name TEXT NOT NULL,
    key TEXT NOT NULL,
    source_url TEXT NOT NULL,
    content_type TEXT,
    deadline REAL NOT NULL,
    state TEXT NOT NULL,
    uri TEXT,
    size INTEGER,
    sha256 TEXT,
    archived_at REAL,
    error TEXT,
    PRIMARY KEY (provider, job_id, n)
);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    provider TEXT NOT NULL,
    job_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    deadline REAL NOT NULL,
    not_before REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    lease_owner TEXT,
    lease_expires REAL,
    last_error TEXT,
    created_at REAL NOT NULL,
    UNIQUE (provider, job_id, n)
);
CREATE INDEX IF NOT EXISTS tasks_due ON tasks (state, deadline);
CREATE INDEX IF NOT EXISTS tasks_lapsed ON tasks (state, lease_expires);
-- Jobs followed by polling (receiver.polling.schedule.sqlite): when to ask next, why stopped.
CREATE TABLE IF NOT EXISTS tracked (
    provider TEXT NOT NULL,
    job_id TEXT NOT NULL,
    technique TEXT,
    state TEXT NOT NULL,
    next_poll_at REAL NOT NULL,
    polls INTEGER NOT NULL DEFAULT 0,
    not_found INTEGER NOT NULL DEFAULT 0,
    last_status TEXT,
    last_error TEXT,
    stop_reason TEXT,
    registered_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (provider, job_id)
);
CREATE INDEX IF NOT EXISTS tracked_due ON tracked (state, next_poll_at);
-- Jobs erased on request (`receiver forget`): the record path refuses to recreate them.
CREATE TABLE IF NOT EXISTS tombstones (
    provider TEXT NOT NULL,
    job_id TEXT NOT NULL,
    forgotten_at REAL NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (provider, job_id)
);
"""

# Columns added after the first release: (table, column, declaration). `Database` adds the ones an
# older file lacks (ALTER TABLE ADD COLUMN keeps every row; new columns start NULL).
COLUMNS_ADDED = (
    ("deliveries", "body_removed_at", "REAL"),  # payload retention dropped the raw body then
    ("assets", "verified_at", "REAL"),  # last fixity check
    ("assets", "verified_by", "TEXT"),
    ("assets", "fixity_error", "TEXT"),  # what the last check found wrong (NULL: it passed)
)

# Indexes over added columns: created after the columns exist.
INDEXES_ADDED = """
CREATE INDEX IF NOT EXISTS deliveries_body_kept ON deliveries (received_at)
    WHERE body_removed_at IS NULL;
CREATE INDEX IF NOT EXISTS assets_fixity ON assets (COALESCE(verified_at, archived_at))
    WHERE state = 'archived';
CREATE INDEX IF NOT EXISTS jobs_updated ON jobs (updated_at);
"""


def migrate(conn: sqlite3.Connection) -> None:
    """Bring an older file's schema up to date (idempotent)."""
    for table, column, declaration in COLUMNS_ADDED:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
    conn.executescript(INDEXES_ADDED)


_MAX_GROUP = 512
# Checkpoint the WAL when the writer is idle after this many groups, or regardless after the
# second number (sustained load), instead of SQLite's automatic checkpoint inside a COMMIT,
# which fsyncs the main file while every caller of that group waits for its acknowledgment.
_CHECKPOINT_IDLE_AFTER = 50
_CHECKPOINT_FORCE_AFTER = 2000
_STOP = object()


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk (fsync'd WAL) before we acknowledge; group commit pays for it.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.row_factory = sqlite3.Row
    return conn


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Incremental auto-vacuum, so pages freed by retention can go back to the filesystem:
        # it must be chosen before the file's header is written (WAL mode writes it), so on a
        # connection of its own; an older file keeps its mode until `receiver prune` VACUUMs it.
        first = sqlite3.connect(path, isolation_level=None)
        try:
            first.execute("PRAGMA auto_vacuum=INCREMENTAL")
            first.execute("PRAGMA journal_mode=WAL")
        finally:
            first.close()
        with connect(path) as conn:
            conn.executescript(SCHEMA)
            migrate(conn)
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._local = threading.local()
        self._writer: threading.Thread | None = None
        self.groups_committed = 0  # observability for tests/benchmarks: transactions, not writes

    # -- writes -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="sqlite-writer")
            self._writer.daemon = True
            self._writer.start()

    def stop(self) -> None:
        if self._writer is not None:
            self._inbox.put(_STOP)
            self._writer.join()
            self._writer = None

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` inside the next group transaction; return once that group is committed."""
        if self._writer is None:
            raise RuntimeError("the database writer is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._inbox.put((fn, future, loop))
        return await future

    def write_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A write from synchronous code (CLI): its own short transaction."""
        conn = self._reader()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _write_loop(self) -> None:
        conn = connect(self.path)
        conn.execute("PRAGMA wal_autocheckpoint=0")
        # A burst of writes (a retention prune) grows the WAL; once checkpointed, shrink it back
        # to this instead of keeping the high-water mark on disk.
        conn.execute("PRAGMA journal_size_limit=67108864")
        since_checkpoint = 0
        try:
            while True:
                first = self._inbox.get()
                if first is _STOP:
                    return
                group = [first]
                stop_after = False
                while len(group) < _MAX_GROUP:
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop_after = True
                        break
                    group.append(item)
                self._commit_group(conn, group)
                since_checkpoint += 1
                idle = self._inbox.empty()
                if (idle and since_checkpoint >= _CHECKPOINT_IDLE_AFTER) or (
                    since_checkpoint >= _CHECKPOINT_FORCE_AFTER
                ):
                    # PASSIVE: never waits for readers; what it cannot copy now, a later one will.
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    since_checkpoint = 0
                if stop_after:
                    return
        finally:
            conn.close()

    def _commit_group(self, conn: sqlite3.Connection, group: list[Any]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, _future, _loop in group:
                conn.execute("SAVEPOINT item")
                try:
                    outcomes.append((True, fn(conn)))
                    conn.execute("RELEASE item")
                except Exception as exc:  # one bad write must not sink the group
                    conn.execute("ROLLBACK TO item")
                    conn.execute("RELEASE item")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
            self.groups_committed += 1
        except Exception as exc:
            log.error("sqlite_group_commit_failed", error=str(exc), size=len(group))
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(False, exc)] * len(group)
        # One wake-up per event loop for the whole group, not one per caller: each
        # call_soon_threadsafe writes to the loop's self-pipe.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_fn, future, loop), (ok, value) in zip(group, outcomes, strict=True):
            by_loop.setdefault(loop, []).append((future, ok, value))
        for loop, settled in by_loop.items():
            loop.call_soon_threadsafe(_settle_all, settled)

    # -- reads --------------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            self._local.conn = conn
        return conn

    def read_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return fn(self._reader())

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self.read_sync, fn)

    # -- space ----------------------------------------------------------------------------------

    def vacuum(self) -> None:
        """Rewrite the file without free pages (`receiver prune`), then empty the WAL.

        VACUUM needs no other write in progress: run it with the writer stopped (the CLI's).
        It also switches an older file to incremental auto-vacuum (see `__init__`).
        """
        conn = connect(self.path)
        try:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()


def _settle_all(settled: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in settled:
        if future.done():  # the caller went away (client disconnected); the write still stands
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
