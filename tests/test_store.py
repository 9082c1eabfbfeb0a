"""Contract tests for the store port, run against both adapters, plus local-specific ones (the
S3 adapter's own tests are in ``test_store_s3.py``).

The S3 adapter runs against SeaweedFS (a real S3-compatible server that verifies checksums and
honours conditional writes; ``tests/s3server.py``), under both of boto3's request checksum modes
(``when_supported``, the default since 1.36, and ``when_required``). moto's S3 is a second target
only for the versioned-bucket check (the CloudFormation stack's bucket is versioned).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import receiver.store.local as local_module
from receiver.app import open_store
from receiver.store import (
    METADATA_LIMIT,
    IncompleteUpload,
    ObjectExists,
    ObjectMissing,
    Store,
    StoreError,
    check_metadata,
)
from receiver.store.local import LocalStore
from receiver.store.s3 import S3Store
from tests.s3server import admin_client, point_s3_at

MiB = 2**20
PART = 5 * MiB  # S3's minimum part size
# The S3 stores here keep two parts in flight, so an object of up to two parts is one PUT and the
# 11 MiB objects of the multipart tests are three parts (at the defaults, one PUT takes up to
# four parts: test_store_s3 tests that boundary).
IN_FLIGHT = 2
KEY = "apex/2026/03/16/job-1/output.png"


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def chunked(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def read_all(store: Store, key: str) -> bytes:
    return b"".join([chunk async for chunk in store.read(key)])


async def all_keys(store: Store, prefix: str = "") -> list[str]:
    return sorted([key async for key in store.list_keys(prefix)])


class Boom(Exception):
    """Raised by a test's chunk iterator."""


@dataclass
class Backend:
    """A store under test plus a raw view of everything it has left in its backend."""

    kind: str  # "local" or "s3"
    store: Store
    root: Path | None = None
    bucket: str | None = None

    def leftovers(self) -> list[str]:
        """Every file under the local root, or every S3 object and pending multipart upload."""
        if self.root is not None:
            if not self.root.exists():
                return []
            return sorted(
                str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file()
            )
        assert self.bucket is not None
        client = admin_client()
        objects = client.list_objects_v2(Bucket=self.bucket).get("Contents", [])
        uploads = client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        return sorted([o["Key"] for o in objects] + [f"upload:{u['Key']}" for u in uploads])

    def start_upload(self, key: str) -> str:
        """Leave an incomplete upload for `key`, as a killed process would; its id."""
        if self.root is not None:
            folder = self.root / key.rpartition("/")[0]
            folder.mkdir(parents=True, exist_ok=True)
            name = f".{key.rpartition('/')[2]}.k1ll3d_x.tmp"
            (folder / name).write_bytes(b"partial")
            return name
        assert self.bucket is not None
        created = admin_client().create_multipart_upload(Bucket=self.bucket, Key=f"archive/{key}")
        return str(created["UploadId"])


def open_backend(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Backend:
    if kind == "local":
        root = tmp_path / "archive"
        return Backend("local", open_store(root.as_uri(), part_size=PART), root=root)
    bucket = request.getfixturevalue("s3_bucket")
    mode = kind.removeprefix("s3-")
    # Set before the client is created: botocore reads it once, at client creation.
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", mode)
    store = open_store(f"s3://{bucket}/archive", part_size=PART, parts_in_flight=IN_FLIGHT)
    assert isinstance(store, S3Store)
    config = store._client.meta.config
    assert config.request_checksum_calculation == mode  # type: ignore[attr-defined]  # stubs lag
    return Backend("s3", store, bucket=bucket)


S3_KINDS = ["s3-when_supported", "s3-when_required"]


@pytest.fixture(params=["local", *S3_KINDS])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Backend]:
    opened = open_backend(request.param, request, tmp_path, monkeypatch)
    yield opened
    await opened.store.aclose()


@pytest.fixture
def s3_env(seaweedfs: str, monkeypatch: pytest.MonkeyPatch) -> None:
    point_s3_at(monkeypatch, seaweedfs)


# --- the contract, for every adapter ---------------------------------------------------------


@pytest.mark.anyio
async def test_small_object_round_trip(backend: Backend) -> None:
    data = payload(300_000)
    stored = await backend.store.put_stream(
        KEY, chunked(data), content_type="image/png", metadata={"provider": "apex"}
    )
    assert stored.key == KEY
    assert stored.uri == backend.store.uri_for(KEY)
    assert (stored.size, stored.sha256, stored.content_type) == (len(data), sha(data), "image/png")
    assert await read_all(backend.store, KEY) == data
    info = await backend.store.head(KEY)
    assert info is not None
    assert (info.key, info.uri, info.size) == (KEY, stored.uri, len(data))
    assert (info.content_type, info.sha256) == ("image/png", sha(data))
    assert info.metadata == {"provider": "apex", "sha256": sha(data)}


@pytest.mark.anyio
async def test_multipart_object_round_trip(backend: Backend) -> None:
    data = payload(12 * MiB + 12345)  # three parts of 5 MiB, the last one short
    stored = await backend.store.put_stream(
        KEY, chunked(data, 1_000_003), content_type="video/mp4", metadata={"job": "job-1"}
    )
    assert (stored.size, stored.sha256) == (len(data), sha(data))
    info = await backend.store.head(KEY)
    assert info is not None
    assert (info.size, info.content_type, info.sha256) == (len(data), "video/mp4", sha(data))
    if backend.kind == "s3":  # known only after the last part: recorded as a tag
        assert (info.metadata, info.sha256_source) == ({"job": "job-1"}, "tag")
    else:
        assert (info.metadata, info.sha256_source) == (
            {"job": "job-1", "sha256": sha(data)},
            "sidecar",
        )
    assert await read_all(backend.store, KEY) == data


@pytest.mark.anyio
async def test_put_bytes_and_empty_object(backend: Backend) -> None:
    manifest = b'{"job": "job-1"}'
    stored = await backend.store.put_bytes(
        "m/manifest.json", manifest, content_type="application/json"
    )
    assert (stored.size, stored.sha256) == (len(manifest), sha(manifest))
    empty = await backend.store.put_bytes("m/empty", b"", content_type="text/plain")
    assert (empty.size, empty.sha256) == (0, sha(b""))
    assert await read_all(backend.store, "m/empty") == b""
    info = await backend.store.head("m/manifest.json")
    assert info is not None and info.metadata == {"sha256": sha(manifest)}


@pytest.mark.anyio
@pytest.mark.parametrize("first_size", [100, 11 * MiB], ids=["first-small", "first-multipart"])
@pytest.mark.parametrize(
    "second_size",
    [200, 6 * MiB, 11 * MiB],
    ids=["then-small", "then-one-put-of-two-parts", "then-multipart"],
)
async def test_put_stream_never_replaces(
    backend: Backend, first_size: int, second_size: int
) -> None:
    first, second = payload(first_size, seed=1), payload(second_size, seed=2)
    await backend.store.put_stream(KEY, chunked(first), content_type="a/b", metadata={"try": "1"})
    before = backend.leftovers()
    with pytest.raises(ObjectExists) as raised:
        await backend.store.put_stream(
            KEY, chunked(second), content_type="c/d", metadata={"try": "2"}
        )
    assert (raised.value.key, raised.value.sha256) == (KEY, sha(second))
    existing = raised.value.existing
    assert existing is not None
    assert (existing.size, existing.sha256, existing.content_type) == (
        len(first),
        sha(first),
        "a/b",
    )
    # The first object is intact, and the loser left nothing (no upload, no temp file).
    assert await read_all(backend.store, KEY) == first
    assert backend.leftovers() == before


@pytest.mark.anyio
async def test_put_bytes_replaces(backend: Backend) -> None:
    """Manifests are rewritten as a job progresses: put_bytes is not create-only."""
    await backend.store.put_bytes(KEY, b"v1", content_type="a/b", metadata={"try": "1"})
    await backend.store.put_bytes(KEY, b"v2", content_type="c/d", metadata={"try": "2"})
    assert await read_all(backend.store, KEY) == b"v2"
    info = await backend.store.head(KEY)
    assert info is not None
    assert info.metadata == {"try": "2", "sha256": sha(b"v2")}
    assert await all_keys(backend.store) == [KEY]


async def failing_source(data: bytes, fail_at: int, error: Exception) -> AsyncIterator[bytes]:
    async for chunk in chunked(data[:fail_at], 512 * 1024):
        yield chunk
    raise error


@pytest.mark.anyio
@pytest.mark.parametrize(
    "fail_at",
    [300_000, 7 * MiB, 17 * MiB],
    # S3: the first two fail while the parts are read ahead (before any request), the third
    # once the multipart upload is under way (IN_FLIGHT + 1 parts read, the first ones sent).
    ids=["in-first-part", "while-reading-ahead", "mid-multipart"],
)
async def test_failing_iterator_leaves_nothing(backend: Backend, fail_at: int) -> None:
    error = Boom("source broke")
    with pytest.raises(Boom) as raised:
        await backend.store.put_stream(
            KEY,
            failing_source(payload(22 * MiB), fail_at, error),
            content_type="image/png",
            metadata={},
        )
    assert raised.value is error  # propagated unchanged, not wrapped
    assert await backend.store.head(KEY) is None
    assert backend.leftovers() == []


@pytest.mark.anyio
@pytest.mark.parametrize("fault", ["source-fails", "cancelled"])
async def test_failed_put_keeps_existing_object(backend: Backend, fault: str) -> None:
    """A failed or cancelled multipart put on a taken key aborts its own upload, nothing else."""
    old = payload(1000)
    await backend.store.put_bytes(KEY, old, content_type="image/png")
    before = backend.leftovers()
    stalled = anyio.Event()

    async def stalling_source() -> AsyncIterator[bytes]:
        async for chunk in chunked(payload(11 * MiB), MiB):
            yield chunk
        stalled.set()
        await anyio.sleep_forever()
        yield b""  # never reached

    if fault == "source-fails":
        with pytest.raises(Boom):
            await backend.store.put_stream(
                KEY,
                failing_source(payload(12 * MiB), 11 * MiB, Boom()),
                content_type="image/png",
                metadata={},
            )
    else:
        task = asyncio.create_task(
            backend.store.put_stream(KEY, stalling_source(), content_type="x/y", metadata={})
        )
        await stalled.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await read_all(backend.store, KEY) == old
    assert backend.leftovers() == before


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["anyio-scope", "task-cancel"])
async def test_cancelled_put_leaves_nothing(backend: Backend, how: str) -> None:
    stalled = anyio.Event()

    async def stalling_source() -> AsyncIterator[bytes]:
        async for chunk in chunked(payload(11 * MiB), MiB):
            yield chunk
        stalled.set()
        await anyio.sleep_forever()
        yield b""  # never reached

    put = backend.store.put_stream(KEY, stalling_source(), content_type="x/y", metadata={})
    if how == "anyio-scope":  # level cancellation: every later await in the scope is cancelled
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: put)
            await stalled.wait()
            group.cancel_scope.cancel()
    else:  # plain asyncio: one CancelledError, as asyncio.wait_for / timeout deliver
        task = asyncio.create_task(put)
        await stalled.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert backend.leftovers() == []


@pytest.mark.anyio
async def test_metadata_limit(backend: Backend) -> None:
    room = METADATA_LIMIT - len("sha256") - 64 - len("x")  # what is left for one value
    await backend.store.put_bytes(KEY, b"ok", content_type="text/plain", metadata={"x": "v" * room})
    info = await backend.store.head(KEY)
    assert info is not None and info.metadata["x"] == "v" * room
    with pytest.raises(ValueError, match="2048-byte"):
        await backend.store.put_bytes(
            "other", b"no", content_type="text/plain", metadata={"x": "v" * (room + 1)}
        )
    assert await backend.store.head("other") is None


@pytest.mark.parametrize(
    "metadata",
    [
        {"Provider": "apex"},
        {"provider_id": "x"},
        {"note": "caf\u00e9"},
        {"note": "a\nb"},
        {"sha256": "0"},
    ],
)
def test_metadata_rules(metadata: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        check_metadata(metadata)


@pytest.mark.anyio
async def test_list_keys(backend: Backend) -> None:
    keys = ["apex/2026/03/16/j1/output.png", "apex/2026/04/01/j2/output.mp4", "fliki/2026/x.mp3"]
    for key in keys:
        await backend.store.put_bytes(key, key.encode(), content_type="text/plain")
    assert await all_keys(backend.store) == keys
    assert await all_keys(backend.store, "apex/") == keys[:2]
    assert await all_keys(backend.store, "apex/2026/0") == keys[:2]
    assert await all_keys(backend.store, "apex/2026/04") == keys[1:2]
    assert await all_keys(backend.store, "vividflow/") == []


@pytest.mark.anyio
async def test_read_a_byte_range_fetches_only_that_range(backend: Backend) -> None:
    """How the console seeks in a video: bytes first..last (inclusive, as HTTP ranges)."""
    data = payload(300_000)
    await backend.store.put_stream(KEY, chunked(data), content_type="video/mp4", metadata={})
    fetched: list[int] = []
    if backend.kind == "s3":
        assert isinstance(backend.store, S3Store)
        backend.store._client.meta.events.register(
            "after-call.s3.GetObject",
            lambda parsed, **_: fetched.append(parsed["ContentLength"]),
        )
    cases = [(0, 0), (5, 9), (299_990, None), (1_000, 299_999), (0, None), (123_456, 123_456)]
    for first, last in cases:
        got = b"".join([c async for c in backend.store.read(KEY, first, last)])
        assert got == data[first : None if last is None else last + 1], (first, last)
    if backend.kind == "s3":  # the server sent the range, not the object from its start
        assert fetched == [1, 5, 10, 299_000, 300_000, 1]


@pytest.mark.anyio
async def test_missing_key(backend: Backend) -> None:
    assert await backend.store.head("nope/missing.png") is None
    with pytest.raises(ObjectMissing):
        await read_all(backend.store, "nope/missing.png")


@pytest.mark.anyio
@pytest.mark.parametrize("key", ["", "../escape", "a/../../escape", "/etc/passwd", "a//b", "a/./b"])
async def test_bad_keys_refused(backend: Backend, key: str) -> None:
    with pytest.raises(ValueError):
        await backend.store.put_bytes(key, b"x", content_type="text/plain")
    with pytest.raises(ValueError):
        backend.store.uri_for(key)
    assert backend.leftovers() == []


@pytest.mark.anyio
async def test_ping_and_presign(backend: Backend) -> None:
    await backend.store.ping()
    await backend.store.put_bytes(KEY, b"hello", content_type="text/plain")
    url = await backend.store.presign_get(KEY, 60)
    if backend.kind == "local":
        assert url is None
    else:
        assert url is not None
        assert "X-Amz-Signature=" in url and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url  # SigV4
        assert "Signature=" not in url.replace("X-Amz-Signature=", "")  # no SigV2 parameter
        assert httpx.get(url, trust_env=False).content == b"hello"


@pytest.mark.anyio
async def test_incomplete_uploads_listed_and_aborted(backend: Backend) -> None:
    """What `receiver verify` finds and `--repair` removes: uploads nobody finished."""
    started = backend.start_upload("apex/2026/03/16/job-9/output.mp4")
    backend.start_upload("fliki/2026/x/output.mp3")
    now = datetime.now(UTC)
    stale = [u async for u in backend.store.incomplete_uploads("apex/", now + timedelta(minutes=1))]
    assert [u.key for u in stale] == ["apex/2026/03/16/job-9/output.mp4"]
    assert stale[0].upload_id == started
    assert abs(stale[0].initiated - now) < timedelta(minutes=5)
    # Younger than the cut-off: not listed (an upload in progress is not stale).
    assert [u async for u in backend.store.incomplete_uploads("", now - timedelta(hours=1))] == []
    await backend.store.abort_upload(stale[0])
    await backend.store.abort_upload(stale[0])  # gone already: fine
    left = [u.key async for u in backend.store.incomplete_uploads("", now + timedelta(minutes=1))]
    assert left == ["fliki/2026/x/output.mp3"]


# --- local specifics -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_local_layout_and_reserved_names(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    stored = await store.put_bytes("a/b.png", b"png", content_type="image/png")
    assert stored.uri == (tmp_path / "a" / "b.png").as_uri()
    assert (tmp_path / "a" / "b.png").read_bytes() == b"png"
    assert (tmp_path / "a" / "b.png.meta.json").is_file()
    assert sorted(os.listdir(tmp_path / "a")) == ["b.png", "b.png.meta.json"]  # no temp files
    for key in ["a/b.png.meta.json", "a/.b.png.x1y2.tmp"]:
        with pytest.raises(ValueError, match="reserved"):
            await store.put_bytes(key, b"x", content_type="text/plain")
    (tmp_path / "a" / ".c.png.abc.tmp").write_bytes(b"crash debris")
    assert await all_keys(store) == ["a/b.png"]


@pytest.mark.anyio
async def test_local_cancel_during_commit_keeps_the_complete_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered = threading.Event()
    real_commit = local_module._commit

    def slow_commit(*args: Any) -> bool:
        entered.set()
        time.sleep(0.3)  # still linking in its thread when the cancellation arrives
        return real_commit(*args)

    monkeypatch.setattr(local_module, "_commit", slow_commit)
    store = LocalStore(tmp_path)
    put = store.put_stream("a/b.png", chunked(b"png"), content_type="image/png", metadata={})
    task = asyncio.create_task(put)
    await anyio.to_thread.run_sync(entered.wait)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The commit ran to its end: a complete object with its record, never deleted; no temp file.
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "b.png",
        "b.png.meta.json",
    ]
    info = await store.head("a/b.png")
    assert info is not None and info.sha256 == sha(b"png")


@pytest.mark.anyio
async def test_local_sidecar_failure_keeps_the_data_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the link the object is claimed: a failed sidecar write never removes it again."""
    real_write = local_module._write_and_sync
    calls = 0

    def failing_second_write(out: Any, data: bytes | bytearray) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first flushes the data file, the second writes the sidecar
            raise OSError(28, "No space left on device")
        real_write(out, data)

    monkeypatch.setattr(local_module, "_write_and_sync", failing_second_write)
    store = LocalStore(tmp_path)
    with pytest.raises(StoreError, match="No space left"):
        await store.put_stream("a/b.png", chunked(b"png"), content_type="image/png", metadata={})
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["b.png"]
    info = await store.head("a/b.png")
    assert info is not None and (info.size, info.sha256, info.sha256_source) == (3, None, None)


@pytest.mark.anyio
async def test_local_put_completes_a_commit_a_kill_interrupted(tmp_path: Path) -> None:
    """A process killed between the data link and the sidecar leaves the object without its
    record (seen in tests/test_onward_crash.py: the next attempt's put found the name taken,
    "sha256 not recorded", and the job ended dead). The same bytes put again complete that
    commit; other bytes are still refused."""
    store = LocalStore(tmp_path)
    await store.put_stream("a/b.png", chunked(b"png"), content_type="image/png", metadata={})
    (tmp_path / "a" / "b.png.meta.json").unlink()  # the state a SIGKILL there leaves
    stored = await store.put_stream(
        "a/b.png", chunked(b"png"), content_type="image/png", metadata={"job": "1"}
    )
    assert stored.sha256 == sha(b"png")
    info = await store.head("a/b.png")
    assert info is not None
    assert (info.sha256, info.content_type, info.metadata["job"]) == (sha(b"png"), "image/png", "1")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "b.png",
        "b.png.meta.json",
    ]

    (tmp_path / "a" / "b.png.meta.json").unlink()
    with pytest.raises(ObjectExists) as refused:
        await store.put_stream("a/b.png", chunked(b"PNG"), content_type="image/png", metadata={})
    assert refused.value.existing is not None and refused.value.existing.sha256 is None
    assert (tmp_path / "a" / "b.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["b.png"]


@pytest.mark.anyio
async def test_local_abort_upload_refuses_what_is_not_its_temp_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await store.put_bytes("a/b.png", b"png", content_type="image/png")
    for upload_id in ["b.png", "../a/b.png", ".b.png.meta.json"]:
        with pytest.raises(ValueError, match="not a temp file"):
            await store.abort_upload(IncompleteUpload("a/b.png", upload_id, datetime.now(UTC)))
    assert (tmp_path / "a" / "b.png").read_bytes() == b"png"


@pytest.mark.anyio
async def test_local_ping_refuses_unusable_root(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError):
        await LocalStore(tmp_path / "file" / "archive").ping()


# --- open_store ------------------------------------------------------------------------------


@pytest.mark.usefixtures("s3_env")
def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("file://./var/archive")
    assert isinstance(relative, LocalStore) and relative.root == tmp_path / "var" / "archive"
    absolute = open_store(f"file://{tmp_path}/x")
    assert isinstance(absolute, LocalStore) and absolute.root == tmp_path / "x"
    s3 = open_store("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert s3.uri_for("k") == "s3://bucket/some/prefix/k"
    assert open_store("s3://bucket").uri_for("k") == "s3://bucket/k"
    for bad in ["ftp://host/x", "s3:///prefix", "file://host/x", "file://"]:
        with pytest.raises(ValueError):
            open_store(bad)
