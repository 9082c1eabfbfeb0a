"""The S3 adapter's own tests, against SeaweedFS (see ``tests/s3server.py``): what it sends and
what the server verifies, conditional creates, cleanup, tags, memory. The port's contract for
both adapters is in ``test_store.py``, whose fixtures these reuse."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import threading
import time
import tracemalloc
import uuid
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders
from botocore.exceptions import ClientError

import receiver.store.s3multipart as s3multipart
from receiver.app import open_store
from receiver.settings import PARTS_IN_FLIGHT
from receiver.store import ObjectExists, StoreError
from receiver.store.s3 import S3Store
from tests.s3server import admin_client
from tests.test_store import (
    IN_FLIGHT,
    KEY,
    PART,
    S3_KINDS,
    Backend,
    MiB,
    chunked,
    open_backend,
    payload,
    read_all,
    s3_env,  # noqa: F401  (a fixture)
    sha,
)


@pytest.fixture(params=S3_KINDS)
async def s3_backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Backend]:
    opened = open_backend(request.param, request, tmp_path, monkeypatch)
    yield opened
    await opened.store.aclose()


@pytest.fixture
def s3_store(s3_backend: Backend) -> S3Store:
    assert isinstance(s3_backend.store, S3Store)
    return s3_backend.store


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def b64crc32(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def uploads(bucket: str) -> list[str]:
    listed = admin_client().list_multipart_uploads(Bucket=bucket)
    return sorted(u["Key"] for u in listed.get("Uploads", []))


@pytest.mark.anyio
async def test_s3_single_put_carries_verified_sha256(s3_store: S3Store) -> None:
    data = payload(1000)
    await s3_store.put_stream(KEY, chunked(data), content_type="image/png", metadata={})
    head = admin_client().head_object(
        Bucket=s3_store.bucket, Key=f"archive/{KEY}", ChecksumMode="ENABLED"
    )
    assert head["ChecksumSHA256"] == b64sha(data)  # the server's own full-object checksum
    assert head["Metadata"] == {"sha256": sha(data)}
    assert s3_store.uri_for(KEY) == f"s3://{s3_store.bucket}/archive/{KEY}"


@pytest.mark.anyio
async def test_s3_multipart_is_full_object_crc32_and_sha256_tag(s3_store: S3Store) -> None:
    data = payload(11 * MiB)
    await s3_store.put_stream(KEY, chunked(data), content_type="video/mp4", metadata={"a": "b"})
    client = admin_client()
    head = client.head_object(Bucket=s3_store.bucket, Key=f"archive/{KEY}", ChecksumMode="ENABLED")
    # Verified by the server on completion, over the whole object; no "-N" composite.
    assert (head["ChecksumType"], head["ChecksumCRC32"]) == ("FULL_OBJECT", b64crc32(data))
    assert "ChecksumSHA256" not in head
    assert head["Metadata"] == {"a": "b"}
    tags = client.get_object_tagging(Bucket=s3_store.bucket, Key=f"archive/{KEY}")["TagSet"]
    assert tags == [{"Key": "sha256", "Value": sha(data)}]
    # Written once: no CopyObject rewrote it (one version even on a versioned bucket: below).


def corrupt(s3_store: S3Store, monkeypatch: pytest.MonkeyPatch, operation: str) -> None:
    """Make `operation` send a wrong checksum for what it uploads, as a corrupted body would."""
    real = getattr(s3_store._client, operation)
    wrong_sha, wrong_crc = b64sha(b"not these bytes"), b64crc32(b"not these bytes")

    def lying(**kwargs: Any) -> Any:
        if "ChecksumSHA256" in kwargs:
            kwargs["ChecksumSHA256"] = wrong_sha
        if "ChecksumCRC32" in kwargs and kwargs.get("PartNumber", 2) == 2:
            kwargs["ChecksumCRC32"] = wrong_crc
        return real(**kwargs)

    monkeypatch.setattr(s3_store._client, operation, lying)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("operation", "size"),
    [
        ("put_object", 1000),
        ("upload_part", 11 * MiB),
        ("complete_multipart_upload", 11 * MiB),
    ],
    ids=["single-put", "part", "whole-object"],
)
async def test_s3_server_refuses_bytes_that_do_not_match_their_checksum(
    s3_backend: Backend,
    s3_store: S3Store,
    monkeypatch: pytest.MonkeyPatch,
    operation: str,
    size: int,
) -> None:
    """SeaweedFS checks what we send: a wrong checksum is BadDigest, and nothing is stored."""
    corrupt(s3_store, monkeypatch, operation)
    with pytest.raises(StoreError, match="BadDigest"):
        await s3_store.put_stream(KEY, chunked(payload(size)), content_type="x/y", metadata={})
    assert s3_backend.leftovers() == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("event", "size", "checksum"),
    [
        ("PutObject", 1000, "x-amz-checksum-sha256"),
        ("UploadPart", 11 * MiB, "x-amz-checksum-crc32"),
    ],
    ids=["single-put", "part"],
)
async def test_s3_body_is_bound_to_the_signature_by_its_signed_checksum(
    s3_backend: Backend, s3_store: S3Store, event: str, size: int, checksum: str
) -> None:
    """No second SHA-256 of every byte just to sign it (UNSIGNED-PAYLOAD, over plain HTTP too):
    the body's checksum header is signed and the server verifies the body against it, so bytes
    altered after signing are refused all the same, and nothing is stored."""
    seen: list[tuple[str, str]] = []

    def alter_after_signing(request: Any, **_: Any) -> None:
        body = request.body if isinstance(request.body, bytes | bytearray) else request.body.read()
        altered = bytearray(body)
        altered[len(altered) // 2] ^= 0xFF
        request.body = bytes(altered)
        headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        seen.append((headers["X-Amz-Content-SHA256"], headers["Authorization"]))

    s3_store._client.meta.events.register(f"before-send.s3.{event}", alter_after_signing)
    with pytest.raises(StoreError, match="BadDigest"):
        await s3_store.put_stream(KEY, chunked(payload(size)), content_type="x/y", metadata={})
    assert seen, f"no {event} was sent"
    for content_sha256, authorization in seen:
        assert content_sha256 == "UNSIGNED-PAYLOAD"
        signed = authorization.split("SignedHeaders=")[1].split(",")[0].split(";")
        assert checksum in signed
    assert s3_backend.leftovers() == []


@pytest.mark.anyio
async def test_s3_store_without_full_object_crc32_gets_per_part_sha256(
    s3_backend: Backend, s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on R2 (FULL_OBJECT only for CRC64NVME): parts carry SHA-256, still verified."""
    real_create = s3_store._client.create_multipart_upload
    refused = []

    def no_full_object(**kwargs: Any) -> Any:
        if kwargs.get("ChecksumType") == "FULL_OBJECT":
            refused.append(kwargs["Key"])
            raise ClientError({"Error": {"Code": "NotImplemented", "Message": "no"}}, "Create")
        return real_create(**kwargs)

    monkeypatch.setattr(s3_store._client, "create_multipart_upload", no_full_object)
    data = payload(11 * MiB)
    await s3_store.put_stream(KEY, chunked(data), content_type="x/y", metadata={})
    await s3_store.put_stream("second", chunked(data), content_type="x/y", metadata={})
    assert refused == [f"archive/{KEY}"]  # asked once, remembered
    head = admin_client().head_object(
        Bucket=s3_store.bucket, Key=f"archive/{KEY}", ChecksumMode="ENABLED"
    )
    assert head["ChecksumType"] == "COMPOSITE" and head["ChecksumSHA256"].endswith("-3")
    info = await s3_store.head(KEY)
    assert info is not None and (info.sha256, info.sha256_source) == (sha(data), "tag")
    corrupt(s3_store, monkeypatch, "upload_part")
    with pytest.raises(StoreError, match="BadDigest"):
        await s3_store.put_stream("third", chunked(data), content_type="x/y", metadata={})
    assert sorted(s3_backend.leftovers()) == [f"archive/{KEY}", "archive/second"]


@pytest.mark.anyio
async def test_s3_access_denied_is_not_taken_for_a_missing_feature(
    s3_backend: Backend, s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(**kwargs: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "Create")

    monkeypatch.setattr(s3_store._client, "create_multipart_upload", denied)
    with pytest.raises(StoreError, match="AccessDenied"):
        await s3_store.put_stream(KEY, chunked(payload(11 * MiB)), content_type="x/y", metadata={})
    assert s3_store._full_object  # still FULL_OBJECT CRC32 once permissions are fixed
    assert s3_backend.leftovers() == []


@pytest.mark.anyio
@pytest.mark.parametrize("size", [1000, 11 * MiB], ids=["single-put", "multipart"])
async def test_s3_object_exists_even_when_it_cannot_be_read_back(
    s3_backend: Backend, s3_store: S3Store, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    await s3_store.put_bytes(KEY, b"first", content_type="x/y")

    def refused(**kwargs: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "HeadObject")

    monkeypatch.setattr(s3_store._client, "head_object", refused)
    data = payload(size)
    with pytest.raises(ObjectExists) as raised:
        await s3_store.put_stream(KEY, chunked(data), content_type="x/y", metadata={})
    assert (raised.value.sha256, raised.value.existing) == (sha(data), None)
    assert s3_backend.leftovers() == [f"archive/{KEY}"]  # no upload left either


@pytest.mark.anyio
async def test_s3_retried_put_aborts_earlier_uploads_for_its_key(
    s3_backend: Backend, s3_store: S3Store
) -> None:
    earlier = [s3_backend.start_upload(KEY), s3_backend.start_upload(KEY)]
    s3_backend.start_upload(KEY + ".other")  # same prefix, another key: not ours to abort
    assert len(earlier) == 2 and uploads(s3_backend.bucket or "") == [f"archive/{KEY}"] * 2 + [
        f"archive/{KEY}.other"
    ]
    data = payload(11 * MiB)
    await s3_store.put_stream(KEY, chunked(data), content_type="x/y", metadata={})
    assert uploads(s3_backend.bucket or "") == [f"archive/{KEY}.other"]
    assert await read_all(s3_store, KEY) == data


@pytest.mark.anyio
async def test_s3_store_refusing_tags_is_named(
    s3_backend: Backend, s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(**kwargs: Any) -> Any:
        raise ClientError({"Error": {"Code": "NotImplemented", "Message": "no"}}, "Tagging")

    monkeypatch.setattr(s3_store._client, "put_object_tagging", refused)
    data = payload(11 * MiB)
    with pytest.raises(StoreError, match=r"refuses object tags \(PutObjectTagging: NotImplemented"):
        await s3_store.put_stream(KEY, chunked(data), content_type="x/y", metadata={})
    # The object itself is complete and verified: kept, never deleted; no upload left.
    assert s3_backend.leftovers() == [f"archive/{KEY}"]
    monkeypatch.setattr(s3_store._client, "get_object_tagging", refused)
    with pytest.raises(StoreError, match=r"refuses object tags \(GetObjectTagging"):
        await s3_store.head(KEY)


@pytest.mark.anyio
@pytest.mark.parametrize("server", ["seaweedfs", "moto"])
async def test_s3_versioned_bucket_keeps_one_version(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, server: str
) -> None:
    """On a versioned bucket (as infra/receiver.yaml makes) a copy is one version, and a second
    attempt on the same key adds none: no CopyObject, no overwrite."""
    bucket = request.getfixturevalue("s3_bucket" if server == "seaweedfs" else "moto_bucket")
    client = admin_client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    store = open_store(f"s3://{bucket}/archive", part_size=PART)
    try:
        data = payload(11 * MiB)
        await store.put_stream(KEY, chunked(data), content_type="x/y", metadata={})
        with pytest.raises(ObjectExists):
            await store.put_stream(KEY, chunked(data), content_type="x/y", metadata={})
        info = await store.head(KEY)
        assert info is not None and info.sha256 == sha(data)
    finally:
        await store.aclose()
    versions = client.list_object_versions(Bucket=bucket).get("Versions", [])
    assert [v["Key"] for v in versions] == [f"archive/{KEY}"]
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


@pytest.mark.anyio
async def test_s3_too_many_parts_aborts(
    s3_backend: Backend, s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3multipart, "MAX_PARTS", 2)
    with pytest.raises(StoreError, match="exceeds 2 parts"):
        await s3_store.put_stream(KEY, chunked(payload(11 * MiB)), content_type="x/y", metadata={})
    assert s3_backend.leftovers() == []


@pytest.mark.anyio
async def test_s3_failed_part_upload_aborts(
    s3_backend: Backend, s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_upload_part = s3_store._client.upload_part

    def flaky_upload_part(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 2:
            kwargs["UploadId"] = "no-such-upload"  # S3 answers NoSuchUpload
        return real_upload_part(**kwargs)

    monkeypatch.setattr(s3_store._client, "upload_part", flaky_upload_part)
    with pytest.raises(StoreError):
        await s3_store.put_stream(KEY, chunked(payload(16 * MiB)), content_type="x/y", metadata={})
    assert s3_backend.leftovers() == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("operation", "size", "fault"),
    [
        ("put_object", 1000, "cancelled"),
        ("complete_multipart_upload", 11 * MiB, "cancelled"),
        ("put_object_tagging", 11 * MiB, "cancelled"),
        ("put_object", 1000, "refused"),
        ("complete_multipart_upload", 11 * MiB, "refused"),
    ],
)
async def test_s3_failure_while_committing(
    s3_backend: Backend,
    s3_store: S3Store,
    monkeypatch: pytest.MonkeyPatch,
    operation: str,
    size: int,
    fault: str,
) -> None:
    """A request that makes the object visible runs to its end, and its object is never deleted.

    Cancelled: the object is complete, with its SHA-256 recorded (tag included). Refused: nothing
    is left, and no multipart upload either.
    """
    entered = threading.Event()
    real_operation = getattr(s3_store._client, operation)
    data = payload(size)

    def slow_operation(**kwargs: Any) -> Any:
        entered.set()
        time.sleep(0.3)  # still running in its thread when the cancellation arrives
        return real_operation(**kwargs)

    def refused_operation(**kwargs: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, operation)

    put = s3_store.put_stream(KEY, chunked(data), content_type="x/y", metadata={})
    if fault == "cancelled":
        monkeypatch.setattr(s3_store._client, operation, slow_operation)
        task = asyncio.create_task(put)
        await anyio.to_thread.run_sync(entered.wait)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert s3_backend.leftovers() == [f"archive/{KEY}"]
        info = await s3_store.head(KEY)
        assert info is not None and info.sha256 == sha(data)
    else:
        monkeypatch.setattr(s3_store._client, operation, refused_operation)
        with pytest.raises(StoreError, match="AccessDenied"):
            await put
        assert s3_backend.leftovers() == []


@pytest.mark.anyio
async def test_s3_parts_in_flight_bound(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s3_store = open_store(f"s3://{s3_bucket}", part_size=PART)  # the default parts in flight
    assert isinstance(s3_store, S3Store)
    real_upload_part = s3_store._client.upload_part
    lock = threading.Lock()
    running, most = 0, 0

    def slow_upload_part(**kwargs: Any) -> Any:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            time.sleep(0.05)
            return real_upload_part(**kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(s3_store._client, "upload_part", slow_upload_part)
    data = payload(21 * MiB)  # five parts: one more than a single PUT takes
    stored = await s3_store.put_stream(KEY, chunked(data), content_type="x/y", metadata={})
    await s3_store.aclose()
    assert stored.sha256 == sha(data)
    assert most == s3_store.parts_in_flight == PARTS_IN_FLIGHT == 4


def count_requests(store: S3Store) -> dict[str, int]:
    """How many requests of each operation ``store`` sends from now on."""
    sent: dict[str, int] = {}

    def count(model: Any, **_: Any) -> None:
        sent[model.name] = sent.get(model.name, 0) + 1

    store._client.meta.events.register("before-call.s3", count)
    return sent


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("size", "requests"),
    [
        (PART + 1, {"PutObject": 1}),
        (PARTS_IN_FLIGHT * PART, {"PutObject": 1}),
        (
            PARTS_IN_FLIGHT * PART + 1,
            {
                "ListMultipartUploads": 1,
                "CreateMultipartUpload": 1,
                "UploadPart": PARTS_IN_FLIGHT + 1,
                "CompleteMultipartUpload": 1,
                "PutObjectTagging": 1,
            },
        ),
    ],
    ids=["two-parts", "four-parts", "four-parts-and-a-byte"],
)
async def test_s3_object_of_up_to_parts_in_flight_parts_is_one_verified_put(
    s3_bucket: str, size: int, requests: dict[str, int]
) -> None:
    """Up to the parts a multipart upload would hold in memory anyway (parts in flight x part
    size), an object goes as one PUT: one request instead of five or more, and a full-object
    SHA-256 the server verifies, instead of a CRC32 plus a tag."""
    store = open_store(f"s3://{s3_bucket}/archive", part_size=PART)  # the defaults otherwise
    assert isinstance(store, S3Store)
    sent = count_requests(store)
    data = payload(size)
    stored = await store.put_stream(KEY, chunked(data), content_type="x/y", metadata={})
    await store.aclose()
    assert (stored.size, stored.sha256) == (size, sha(data))
    assert sent == requests
    head = admin_client().head_object(
        Bucket=s3_bucket, Key=f"archive/{KEY}", ChecksumMode="ENABLED"
    )
    if "PutObject" in requests:
        assert head["ChecksumSHA256"] == b64sha(data)
        assert head["Metadata"] == {"sha256": sha(data)}
    else:
        assert (head["ChecksumType"], head["ChecksumCRC32"]) == ("FULL_OBJECT", b64crc32(data))
    assert (await read_all(store, KEY)) == data


@pytest.mark.anyio
async def test_s3_single_put_of_several_parts_is_resent_whole_after_a_retry(
    s3_store: S3Store,
) -> None:
    """botocore retries a 500; the second try must send the body from its first byte again
    (the parts are read back to back, not joined): the server's SHA-256 check would refuse a
    body that resumed where the failed try stopped."""
    tries: list[int] = []

    def fail_the_first_try(request: Any, **_: Any) -> Any:  # an AWSResponse ends the try
        tries.append(1)
        if len(tries) > 1:
            return None
        request.body.read(3 * MiB)  # the failed try got this far
        return AWSResponse(
            request.url, 500, HTTPHeaders(), _Raw(b"<Error><Code>InternalError</Code></Error>")
        )

    s3_store._client.meta.events.register("before-send.s3.PutObject", fail_the_first_try)
    data = payload(2 * PART)  # two parts: one PUT with the fixture's two parts in flight
    stored = await s3_store.put_stream(KEY, chunked(data), content_type="x/y", metadata={})
    assert len(tries) == 2
    assert stored.sha256 == sha(data)
    assert (await read_all(s3_store, KEY)) == data


class _Raw:
    """A canned HTTP body for AWSResponse."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Any:
        yield self._body

    def read(self, *_: Any) -> bytes:
        body, self._body = self._body, b""
        return body


@pytest.mark.anyio
@pytest.mark.usefixtures("s3_env")
async def test_s3_ping_missing_bucket() -> None:
    store = open_store(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}")
    with pytest.raises(StoreError, match="not found"):
        await store.ping()
    await store.aclose()


@pytest.mark.usefixtures("s3_env")
def test_s3_part_size_minimum() -> None:
    with pytest.raises(ValueError, match="minimum"):
        open_store("s3://bucket", part_size=PART - 1)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "total", [64 * MiB, IN_FLIGHT * PART], ids=["multipart", "one-put-of-several-parts"]
)
async def test_s3_upload_memory_is_bounded(s3_bucket: str, total: int) -> None:
    """64 MiB through put_stream, and the largest single PUT (its parts sent back to back, never
    joined): Python allocations stay within (parts_in_flight + 1) parts.

    SeaweedFS is a child process, so what it keeps is not counted. tracemalloc
    sees only Python-level allocations, which is where any buffering of ours would show. Half a
    part of slack covers botocore's per-request objects and the first part's over-allocation; one
    part more than the bound (let alone the whole object) fails the test.
    """
    block, in_flight = payload(MiB), IN_FLIGHT

    async def source() -> AsyncIterator[bytes]:
        for _ in range(total // len(block)):
            yield block

    store = open_store(f"s3://{s3_bucket}", part_size=PART, parts_in_flight=in_flight)
    # Warm-up: botocore loads models and builds caches on first use of each operation (both
    # upload paths: a single PUT, then a multipart upload).
    for n, size in enumerate([PART + 1, in_flight * PART + 1]):
        await store.put_stream(f"warm{n}", chunked(payload(size)), content_type="x/y", metadata={})
    gc.collect()
    tracemalloc.start()
    try:
        stored = await store.put_stream("big", source(), content_type="x/y", metadata={})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await store.aclose()
    assert (stored.size, stored.sha256) == (total, sha(block * (total // len(block))))
    print(f"peak Python allocations streaming {total // MiB} MiB: {peak / MiB:.1f} MiB")
    assert peak < (in_flight + 1.5) * PART


@pytest.mark.anyio
@pytest.mark.parametrize("same", [True, False], ids=["same-bytes", "other-bytes"])
async def test_s3_untagged_object_of_a_killed_attempt_is_hashed_and_its_record_repaired(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch, same: bool
) -> None:
    # An attempt killed (or frozen) between CompleteMultipartUpload and PutObjectTagging leaves
    # a complete object without its SHA-256 tag. The next attempt's conditional completion
    # loses; the store reads the object back, so the worker can tell "the same copy" from "a
    # different object", and a same-bytes object gets the tag it should have had.
    first = payload(11 * MiB, seed=1)
    real_tag = s3_store._tag_sha256

    async def killed_before_tagging(full_key: str, sha256: str) -> None:
        raise asyncio.CancelledError  # the process died here

    monkeypatch.setattr(s3_store, "_tag_sha256", killed_before_tagging)
    with pytest.raises(asyncio.CancelledError):
        await s3_store.put_stream(KEY, chunked(first), content_type="video/mp4", metadata={})
    monkeypatch.setattr(s3_store, "_tag_sha256", real_tag)
    client = admin_client()
    full_key = f"archive/{KEY}"
    assert client.get_object_tagging(Bucket=s3_store.bucket, Key=full_key)["TagSet"] == []
    assert (await s3_store.head(KEY)).sha256 is None  # type: ignore[union-attr]

    second = first if same else payload(11 * MiB, seed=2)
    with pytest.raises(ObjectExists) as raised:
        await s3_store.put_stream(KEY, chunked(second), content_type="video/mp4", metadata={})
    existing = raised.value.existing
    assert existing is not None
    assert (existing.sha256, existing.sha256_source) == (sha(first), "read")
    assert (raised.value.sha256 == existing.sha256) is same
    tags = client.get_object_tagging(Bucket=s3_store.bucket, Key=full_key)["TagSet"]
    assert tags == ([{"Key": "sha256", "Value": sha(first)}] if same else [])
    assert await read_all(s3_store, KEY) == first  # never replaced
    assert uploads(s3_store.bucket) == []
