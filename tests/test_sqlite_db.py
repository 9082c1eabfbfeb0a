"""The embedded database's group commit: many writers, few transactions, isolated failures."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from receiver.backends.sqlite import Database

pytestmark = pytest.mark.anyio


async def test_concurrent_writes_share_transactions_and_one_failure_stays_alone(
    tmp_path: Path,
) -> None:
    db = Database(tmp_path / "db.sqlite")
    db.start()
    try:

        def insert(i: int) -> int:
            def fn(conn: sqlite3.Connection) -> int:
                if i == 7:
                    conn.execute(
                        "INSERT INTO tasks (provider, job_id, n, deadline, not_before, state, "
                        "created_at) VALUES ('p', 'bad', 0, 0, 0, 'ready', 0)"
                    )
                    raise ValueError("this write fails after touching the table")
                conn.execute(
                    "INSERT INTO tasks (provider, job_id, n, deadline, not_before, state, "
                    "created_at) VALUES ('p', ?, 0, 0, 0, 'ready', 0)",
                    (f"j{i}",),
                )
                return i

            return fn

        results = await asyncio.gather(
            *(db.write(insert(i)) for i in range(200)), return_exceptions=True
        )
    finally:
        db.stop()

    assert isinstance(results[7], ValueError)
    assert [r for r in results if not isinstance(r, Exception)] == [i for i in range(200) if i != 7]
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    ids = {row[0] for row in conn.execute("SELECT job_id FROM tasks")}
    assert "bad" not in ids  # the failed write's partial effects were rolled back
    assert len(ids) == 199
    assert db.groups_committed < 200
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_write_before_start_is_an_error(tmp_path: Path) -> None:
    db = Database(tmp_path / "db.sqlite")
    with pytest.raises(RuntimeError, match="not running"):
        await db.write(lambda conn: None)
