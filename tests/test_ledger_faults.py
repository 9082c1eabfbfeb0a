"""The ledger's writer under real faults: a full file system, a locked file, a failed checkpoint.

Every caller gets an answer within a bound (a 503 that says why, never a false 2xx), the writer
thread survives, `/readyz` reports the unusable ledger, and everything recovers without a
restart once the cause goes away. The full-disk test mounts a 2 MiB tmpfs when it may (root
with mount rights); where it may not, it is skipped and the injected-fault tests below still
cover the same code paths.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Harness, post_signed
from tests.payloads import APEX_SECRET, apex_completed

pytestmark = pytest.mark.anyio


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; injected-fault tests cover the writer")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(folder: Path) -> Path:
    """Write a filler file until the file system says ENOSPC."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)
    return filler


async def post(h: Harness, job_id: str, *, big: bool = False) -> Any:
    payload = apex_completed(job_id)
    if big:  # ~300 KB: more than the WAL's existing frames can hold, so the file must grow
        payload["data"]["metadata"] = {f"part{i}": "x" * 60_000 for i in range(5)}
    # Bounded: a hang fails the test instead of blocking it.
    return await asyncio.wait_for(post_signed(h, "apex", payload, APEX_SECRET), timeout=20)


async def test_full_disk_answers_503_then_recovers_without_restart(
    small_fs: Path, harness_factory: Any
) -> None:
    h: Harness = await harness_factory(ledger_url=f"sqlite:///{small_fs / 'state' / 'r.db'}")
    h.parts.db.checkpoint_every = (1, 1)  # checkpoint after every group: it must fail too
    assert (await post(h, "before")).status_code == 202
    writer = h.parts.db._writer
    filler = fill(small_fs)

    answers = [await post(h, f"full-{i}", big=True) for i in range(5)]
    assert [a.status_code for a in answers] == [503] * 5, [a.text for a in answers]
    assert answers[0].json()["error"]["code"] == "ledger_unavailable"
    assert "full" in answers[0].text.lower()  # says why: "database or disk is full"
    ready = await h.client.get("/readyz")
    assert ready.status_code == 503
    assert "ledger" in ready.json()["checks"] and ready.json()["checks"]["ledger"] != "ok"
    assert h.parts.db._writer is writer and writer is not None and writer.is_alive()

    filler.unlink()  # the operator frees space; no restart
    assert (await h.client.get("/readyz")).status_code == 200
    again = await post(h, "after", big=True)
    assert again.status_code == 202, again.text
    assert h.parts.db.write_error is None
    jobs = {row["job_id"] for row in h.rows("jobs")}
    assert jobs == {"before", "after"}  # no 503'd delivery was half-written
    # The failed checkpoints are retried: the WAL is copied back once there is room.
    assert h.parts.db._writer is writer


class FlakyConnection:
    """A writer connection whose chosen statements fail while `failing` is set."""

    def __init__(self, conn: sqlite3.Connection, failing: dict[str, bool]) -> None:
        self._conn = conn
        self._failing = failing

    def execute(self, sql: str, *args: Any) -> Any:
        for marker, on in self._failing.items():
            if on and marker in sql:
                raise sqlite3.OperationalError("disk I/O error")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_failed_checkpoint_and_commit_never_kill_the_writer(harness: Harness) -> None:
    from receiver.backends.sqlite import connect

    failing = {"wal_checkpoint": False, "COMMIT": False}
    db = harness.parts.db
    db.connect_writer = lambda path: FlakyConnection(connect(path), failing)  # type: ignore[assignment,return-value]
    db.checkpoint_every = (1, 1)
    db.stop()  # restart the writer so it opens the flaky connection
    db.start()

    failing["wal_checkpoint"] = True
    assert (await post(harness, "a")).status_code == 202  # committed; the checkpoint failed
    assert db.write_error is not None and "checkpoint" in db.write_error
    failing["COMMIT"] = True
    refused = await post(harness, "b")
    assert refused.status_code == 503 and "I/O" in refused.text
    assert (await harness.client.get("/readyz")).status_code == 503

    failing.update(wal_checkpoint=False, COMMIT=False)
    assert (await harness.client.get("/readyz")).status_code == 200
    assert (await post(harness, "c")).status_code == 202
    assert {row["job_id"] for row in harness.rows("jobs")} == {"a", "c"}


async def test_a_locked_file_answers_503_within_the_bound_and_recovers(harness: Harness) -> None:
    db = harness.parts.db
    db.write_timeout = 1.0
    other = sqlite3.connect(db.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        started = asyncio.get_running_loop().time()
        answer = await post(harness, "locked")
        elapsed = asyncio.get_running_loop().time() - started
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "ledger_unavailable"
        assert elapsed < 5
    finally:
        other.execute("ROLLBACK")
        other.close()
    db.write_timeout = 20.0
    assert (await post(harness, "free")).status_code == 202


async def test_ledger_files_and_state_folder_are_owner_only(tmp_path: Path) -> None:
    from receiver.backends.sqlite import Database

    old = os.umask(0o022)  # the usual umask, which would give 0644 / 0755
    try:
        db = Database(tmp_path / "state" / "receiver.db")
        db.start()
        try:
            await db.probe_write()  # creates -wal and -shm (removed again on close)
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "state").iterdir()}
        finally:
            db.stop()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert {"receiver.db", "receiver.db-wal", "receiver.db-shm"} <= set(modes), modes
    assert all(mode == 0o600 for mode in modes.values()), modes


async def test_an_existing_world_readable_ledger_is_tightened(tmp_path: Path) -> None:
    from receiver.backends.sqlite import Database

    path = tmp_path / "receiver.db"
    sqlite3.connect(path).close()
    path.chmod(0o644)
    Database(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
