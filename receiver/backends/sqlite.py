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
import contextlib
import contextvars
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from receiver.errors import LedgerUnavailable

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
    outcome TEXT NOT NULL,
    body_mismatch INTEGER NOT NULL DEFAULT 0
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
-- Tasks that gave their slot up with progress made (SqliteQueue.requeue): leased in `rank`
-- order (behind every task that waited when they gave it up) instead of by their deadline.
CREATE TABLE IF NOT EXISTS task_yields (
    id INTEGER PRIMARY KEY,
    rank REAL NOT NULL
);
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
-- One row rewritten by the readiness probe: proof that the writer can write again.
CREATE TABLE IF NOT EXISTS write_probe (id INTEGER PRIMARY KEY, at REAL NOT NULL);
-- Jobs erased on request (`receiver forget`): the record path refuses to recreate them.
CREATE TABLE IF NOT EXISTS tombstones (
    provider TEXT NOT NULL,
    job_id TEXT NOT NULL,
    forgotten_at REAL NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (provider, job_id)
);
-- Onward events (receiver/ledger/events.py), each written in the transaction of the state
-- change it reports; a send per subscribed endpoint, every attempt, each endpoint's health.
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    provider TEXT NOT NULL,
    job_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (provider, job_id, seq);
CREATE INDEX IF NOT EXISTS events_created ON events (created_at);
CREATE TABLE IF NOT EXISTS event_sends (
    event_seq INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    provider TEXT NOT NULL,
    job_id TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    lease_owner TEXT,
    lease_expires REAL,
    delivered_at REAL,
    last_error TEXT,
    PRIMARY KEY (event_seq, endpoint)
);
CREATE INDEX IF NOT EXISTS event_sends_due ON event_sends (endpoint, state, next_at);
CREATE INDEX IF NOT EXISTS event_sends_job
    ON event_sends (endpoint, provider, job_id, state, event_seq);
CREATE TABLE IF NOT EXISTS event_attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_seq INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    at REAL NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER,
    duration_ms REAL NOT NULL,
    response TEXT NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS event_attempts_send ON event_attempts (event_seq, endpoint, id);
CREATE TABLE IF NOT EXISTS endpoints (
    name TEXT PRIMARY KEY,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    last_attempt_at REAL,
    last_success_at REAL,
    last_error TEXT
);
"""

# Columns added after the first release: (table, column, declaration). `Database` adds the ones an
# older file lacks (ALTER TABLE ADD COLUMN keeps every row; new columns start NULL).
COLUMNS_ADDED = (
    # same delivery id as an earlier delivery, different body (1): flagged in the history
    ("deliveries", "body_mismatch", "INTEGER NOT NULL DEFAULT 0"),
    ("deliveries", "body_removed_at", "REAL"),  # payload retention dropped the raw body then
    ("assets", "verified_at", "REAL"),  # last fixity check
    ("assets", "verified_by", "TEXT"),
    ("assets", "fixity_error", "TEXT"),  # what the last check found wrong (NULL: it passed)
    ("tasks", "traceparent", "TEXT"),  # the queuing request's trace context (receiver.tracing)
    ("events", "traceparent", "TEXT"),  # the trace of the change it reports (the onward span's)
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
# How long a caller waits for its group's commit before it is answered 503: a locked file
# (another process's busy timeout is 30 s) or a stuck disk must never hold a request forever.
WRITE_TIMEOUT_SECONDS = 45.0
MIN_FREE_BYTES = 1024 * 1024


def create_private(path: Path) -> None:
    """Create the state folder (0700) and the database file (0600) before SQLite opens it.

    The ledger holds raw payloads with full signed URLs. SQLite creates the `-wal` and `-shm`
    files with the main file's mode, so a 0600 database keeps them owner-only too. Existing
    files are tightened as well (a ledger created 0644 by an older version).
    """
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        path.parent.chmod(0o700)  # mkdir's mode is filtered by the umask
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk (fsync'd WAL) before we acknowledge; group commit pays for it.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.row_factory = sqlite3.Row
    return conn


class Database:
    def __init__(self, path: Path, *, write_timeout: float = WRITE_TIMEOUT_SECONDS) -> None:
        self.path = path
        create_private(path)
        # Incremental auto-vacuum, so pages freed by retention can go back to the filesystem:
        # it must be chosen before the file's header is written (WAL mode writes it), so on a
        # connection of its own; an older file keeps its mode until `receiver prune` VACUUMs it.
        first = sqlite3.connect(path, isolation_level=None)
        try:
            first.execute("PRAGMA auto_vacuum=INCREMENTAL")
            first.execute("PRAGMA journal_mode=WAL")
        finally:
            first.close()
        conn = connect(path)
        try:
            conn.executescript(SCHEMA)
            migrate(conn)
        finally:
            conn.close()
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._local = threading.local()
        self._writer: threading.Thread | None = None
        self.write_timeout = write_timeout
        # Below this much free space the ledger reports itself not ready: a delivery (up to the
        # body limit, written to the WAL and later checkpointed) may no longer fit.
        self.min_free_bytes = MIN_FREE_BYTES
        self.groups_committed = 0  # observability for tests/benchmarks: transactions, not writes
        # Why the last write or checkpoint failed (None: the last one succeeded). `/readyz`
        # reports it; the next successful commit clears it.
        self.write_error: str | None = None
        self.checkpoint_every = (_CHECKPOINT_IDLE_AFTER, _CHECKPOINT_FORCE_AFTER)
        self.connect_writer: Callable[[Path], sqlite3.Connection] = connect  # tests inject faults

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
        """Run `fn` inside the next group transaction; return once that group is committed.

        A group that cannot be committed (disk full, I/O error, locked file) raises
        `LedgerUnavailable` (503) in every caller, as does a commit that takes longer than
        `write_timeout`: no caller waits without a bound, and none is told "done" for a write
        that is not on disk.
        """
        if self._writer is None:
            raise RuntimeError("the database writer is not running")
        if not self._writer.is_alive():  # never expected: the loop catches everything
            log.error("sqlite_writer_restarted")
            self._writer = None
            self.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        # Retrieve a late outcome nobody awaits any more (after a timeout): no asyncio warning.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        # The caller's context goes with the write (its trace, structlog's bound values), so
        # what the write builds inside the writer thread (an onward event's traceparent) sees it.
        self._inbox.put((fn, future, loop, contextvars.copy_context()))
        try:
            # shield: a timeout answers the caller; the write itself stays queued and may
            # still commit (a retried delivery is then a duplicate, never a loss).
            return await asyncio.wait_for(asyncio.shield(future), self.write_timeout)
        except TimeoutError:
            raise LedgerUnavailable(
                f"the ledger did not commit within {self.write_timeout:g} s; nothing was "
                "acknowledged, retry later",
                {"error": self.write_error},
            ) from None

    def free_bytes(self) -> int:
        """Free space on the ledger's file system (for unprivileged users)."""
        stats = os.statvfs(self.path.parent)
        return stats.f_bavail * stats.f_frsize

    async def probe_write(self) -> None:
        """A real write through the writer (readiness): proves the file takes writes again."""
        await self.write(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO write_probe (id, at) VALUES (1, ?)", (time.time(),)
            )
        )

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
        """The writer thread. Nothing ends it but `stop()`: every failure (opening the file,
        a commit, a checkpoint) is answered to the callers concerned, remembered in
        `write_error` for `/readyz`, and the next group starts on a fresh connection."""
        conn: sqlite3.Connection | None = None
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
                try:
                    if conn is None:
                        conn = self.connect_writer(self.path)
                        conn.execute("PRAGMA wal_autocheckpoint=0")
                        # A burst of writes (a retention prune) grows the WAL; once checkpointed,
                        # shrink it back to this instead of keeping the high-water mark on disk.
                        conn.execute("PRAGMA journal_size_limit=67108864")
                except Exception as exc:
                    self._failed("open", exc)
                    self._settle(group, [(False, _unavailable(exc))] * len(group))
                else:
                    if not self._commit_group(conn, group):
                        _discard(conn)
                        conn = None  # a fresh connection for the next group
                    else:
                        since_checkpoint += 1
                        idle_after, force_after = self.checkpoint_every
                        if (idle_after <= since_checkpoint and self._inbox.empty()) or (
                            since_checkpoint >= force_after
                        ):
                            since_checkpoint = 0
                            if not self._checkpoint(conn):
                                _discard(conn)
                                conn = None
                if stop_after:
                    return
        finally:
            if conn is not None:
                conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> bool:
        try:
            # PASSIVE: never waits for readers; what it cannot copy now, a later one will.
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except Exception as exc:  # a full disk fails here too; the WAL keeps the data
            self._failed("checkpoint", exc)
            return False
        return True

    def _failed(self, step: str, exc: BaseException) -> None:
        self.write_error = f"{step}: {type(exc).__name__}: {exc}"
        log.error("sqlite_write_failed", step=step, error=f"{type(exc).__name__}: {exc}")

    def _commit_group(self, conn: sqlite3.Connection, group: list[Any]) -> bool:
        outcomes: list[tuple[bool, Any]] = []
        committed = False
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, _future, _loop, context in group:
                conn.execute("SAVEPOINT item")
                try:
                    outcomes.append((True, context.run(fn, conn)))
                    conn.execute("RELEASE item")
                except sqlite3.OperationalError:
                    raise  # disk full, I/O error, locked: the whole group fails, below
                except Exception as exc:  # one bad write must not sink the group
                    conn.execute("ROLLBACK TO item")
                    conn.execute("RELEASE item")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
            self.groups_committed += 1
            self.write_error = None
            committed = True
        except Exception as exc:
            self._failed("commit", exc)
            with contextlib.suppress(Exception):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            outcomes = [(False, _unavailable(exc))] * len(group)
        self._settle(group, outcomes)
        return committed

    def _settle(self, group: list[Any], outcomes: list[tuple[bool, Any]]) -> None:
        # One wake-up per event loop for the whole group, not one per caller: each
        # call_soon_threadsafe writes to the loop's self-pipe.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_fn, future, loop, _context), (ok, value) in zip(group, outcomes, strict=True):
            by_loop.setdefault(loop, []).append((future, ok, value))
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting
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


def _discard(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(Exception):
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    with contextlib.suppress(Exception):
        conn.close()


def _unavailable(exc: BaseException) -> LedgerUnavailable:
    return LedgerUnavailable(
        "the ledger cannot be written right now; nothing was acknowledged, retry later",
        {"error": f"{type(exc).__name__}: {exc}"},
    )


def _settle_all(settled: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in settled:
        if future.done():  # the caller went away (client disconnected); the write still stands
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
