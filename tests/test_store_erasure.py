"""The store port's erasure (`delete_all_versions`, for `receiver forget`): local folder and S3.

S3 runs on moto's server with bucket versioning on (and Object Lock for what must be kept).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from receiver.store.local import LocalStore
from receiver.store.s3 import S3Store
from tests.s3server import admin_client

pytestmark = pytest.mark.anyio


def _versions(bucket: str, key: str) -> list[str]:
    page = admin_client().list_object_versions(Bucket=bucket, Prefix=key)
    return [
        v["VersionId"]
        for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
        if v["Key"] == key
    ]


async def test_local_erasure_removes_the_file_and_its_sidecar(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    await store.put_bytes("a/b/x.png", b"abc", content_type="image/png")
    await store.put_bytes("a/b/x.png.more", b"other", content_type="image/png")

    erased = await store.delete_all_versions("a/b/x.png")

    assert (erased.removed, erased.kept) == (1, ())
    assert await store.head("a/b/x.png") is None
    left = sorted(p.name for p in (tmp_path / "a" / "b").iterdir())
    assert [name for name in left if not name.startswith("x.png.more")] == []
    assert await store.head("a/b/x.png.more") is not None
    assert (await store.delete_all_versions("a/b/x.png")).removed == 0  # idempotent
    with pytest.raises(ValueError):
        await store.delete_all_versions("../escape")


async def test_s3_erasure_removes_every_version_and_delete_marker(s3_bucket: str) -> None:
    admin = admin_client()
    admin.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    store = S3Store(s3_bucket, "archive")
    try:
        await store.put_bytes("apex/j/out.png", b"v1", content_type="image/png")
        await store.put_bytes("apex/j/out.png", b"v2", content_type="image/png")
        admin.delete_object(Bucket=s3_bucket, Key="archive/apex/j/out.png")  # a delete marker
        await store.put_bytes("apex/j/out.png2", b"neighbour", content_type="image/png")
        assert len(_versions(s3_bucket, "archive/apex/j/out.png")) == 3

        erased = await store.delete_all_versions("apex/j/out.png")

        assert (erased.removed, erased.kept) == (3, ())
        assert _versions(s3_bucket, "archive/apex/j/out.png") == []
        assert len(_versions(s3_bucket, "archive/apex/j/out.png2")) == 1  # same prefix, kept
        assert (await store.delete_all_versions("apex/j/out.png")).removed == 0
    finally:
        await store.aclose()


async def test_s3_erasure_on_an_unversioned_bucket(s3_bucket: str) -> None:
    store = S3Store(s3_bucket, "")
    try:
        await store.put_bytes("k/obj", b"data", content_type="application/octet-stream")
        erased = await store.delete_all_versions("k/obj")
        assert (erased.removed, erased.kept) == (1, ())
        assert await store.head("k/obj") is None
    finally:
        await store.aclose()


async def test_s3_erasure_reports_versions_object_lock_keeps(moto_s3: str) -> None:
    bucket = f"locked-{uuid.uuid4().hex[:12]}"
    admin = admin_client()
    admin.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    admin.put_object(
        Bucket=bucket,
        Key="apex/j/locked.png",
        Body=b"kept by law",
        ObjectLockMode="COMPLIANCE",
        ObjectLockRetainUntilDate=datetime.now(UTC) + timedelta(days=1),
    )
    store = S3Store(bucket, "")
    try:
        await store.put_bytes("apex/j/locked.png", b"newer, unlocked", content_type="image/png")
        erased = await store.delete_all_versions("apex/j/locked.png")
        assert erased.removed == 1  # the unlocked version went
        assert len(erased.kept) == 1
        assert erased.kept[0].startswith("version ")
        assert "AccessDenied" in erased.kept[0]
        assert len(_versions(bucket, "apex/j/locked.png")) == 1
    finally:
        await store.aclose()
