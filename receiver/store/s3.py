"""The S3 store: archived objects in ``s3://bucket/prefix`` on AWS or any S3-compatible endpoint.

The client is configured only the way boto3 always is (``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``,
``AWS_REGION``, profiles, credentials chain), plus SigV4 for every request and presigned link;
this module adds no endpoint settings of its own. boto3 is synchronous, so every call runs on the
AWS thread pool (``backends.aws.run_blocking``) and the event loop never blocks on the network.

Uploads are driven part by part rather than through ``upload_fileobj``: on a non-seekable stream
s3transfer buffers about (10 + 5) parts, whereas here memory is bounded by
``(parts_in_flight + 1) * part_size``: the parts being uploaded plus the one being read (or, for a
single PUT, the parts read ahead to find out that the object is small enough for one).

**Integrity, without rewriting anything** (no CopyObject):

* A stream of up to ``parts_in_flight`` parts (32 MiB at the defaults) is a single PutObject
  carrying its full-object SHA-256 (``x-amz-checksum-sha256``), which the server verifies and
  keeps; the hex digest is also user metadata ``sha256``.
* Longer streams are multipart uploads of type ``FULL_OBJECT`` with CRC32: every part carries its
  own CRC32, and CompleteMultipartUpload carries the CRC32 of the whole object, so the server
  checks each part as it arrives and the assembled object as a whole. The whole-object CRC32 is
  combined from the parts' own (``s3parts.crc32_combine``), so each byte is CRC32-hashed once.
  S3 has no full-object SHA-256 for multipart uploads (SHA-256 there is only ``COMPOSITE``, a
  hash of the parts' hashes), and CRC64NVME/CRC32C need ``botocore[crt]``; CRC32 comes with the
  standard library. A store that
  refuses FULL_OBJECT CRC32 (R2 offers FULL_OBJECT only for CRC64NVME) gets per-part SHA-256
  instead, with a warning: each part is still verified, the assembly is not. The object's
  full SHA-256 is known only after the last part, when its metadata is already fixed, so it goes
  into an object **tag** ``sha256`` right after completion. A store that refuses tags fails the put
  with an error that says so (the object stays: it is complete and verified).
* What servers do with this (checked with the tests' servers): SeaweedFS 4.x verifies SHA-256 on
  PutObject and UploadPart, CRC32 on UploadPart and the full-object CRC32 on completion (all
  ``BadDigest``), honours ``If-None-Match: *`` on both PutObject and CompleteMultipartUpload
  (``PreconditionFailed``) and keeps tags. moto 5 records and echoes checksums without verifying
  any, and honours ``If-None-Match`` on PutObject.
* **Single-PUT threshold**: ``parts_in_flight`` parts (``single_put_parts``), the memory a
  multipart upload holds anyway: the put reads up to that many parts ahead (and one more, to know
  the stream goes on) before it picks the path, and sends a small object's parts back to back as
  one body (``PartsBody``), never joined into a copy. Decided by measuring
  (``BENCH_ONLY=threshold make bench``: ``put_stream`` as a multipart upload with 8 MiB parts, 4
  in flight, against one PUT of the same parts; medians of 5). On SeaweedFS, the server that
  verifies, with 1 GiB volumes, two runs: multipart / one PUT 1.12x and 1.10x at 9 MiB, 1.03x and
  1.36x at 16 MiB, 1.07x and 1.07x at 32 MiB, 0.93x and 1.08x at 64 MiB (one PUT of a single
  bytearray: 1.35x, 1.28x, 1.15x, 0.93x; the parts read back to back cost about 6 ms more at
  9 MiB); moto: 2.37x/2.25x, 1.86x/1.96x, 1.19x/1.03x, 0.99x/1.10x. Beyond
  the gain in time, one PUT is one request instead of the six to eight of a multipart upload
  (list, create, parts, complete, tag), and a full-object SHA-256 that the server verifies,
  where a multipart object has a CRC32 and the SHA-256 only as a tag. Earlier measurements with
  the tests' 32 MB volumes were noise (SeaweedFS grew a volume every 32 MB and stalled). An
  aws-chunked PUT with a trailing checksum would need the length up front, unknown for a
  download without Content-Length, so beyond the threshold there is one path: multipart.

**Never replace, never delete another attempt's copy**: PutObject and CompleteMultipartUpload are
sent with ``If-None-Match: *``; a taken key raises ``ObjectExists``. Cleanup after a failure or a
cancellation aborts only this attempt's own multipart upload and never deletes the key. Before it
starts a multipart upload, a put aborts the incomplete uploads earlier attempts left for its key
(a killed process cannot clean up after itself).

This module is the store's API and its decisions; ``s3multipart.py`` (its base class) runs the
requests and the multipart upload; ``s3parts.py`` regroups the stream into parts and hashes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio
import boto3
from botocore.config import Config

from receiver.backends.aws import POOL_SIZE
from receiver.settings import PART_SIZE, PARTS_IN_FLIGHT
from receiver.store import (
    NO_METADATA,
    SHA256_KEY,
    Erasure,
    IncompleteUpload,
    ObjectExists,
    ObjectInfo,
    ObjectMissing,
    StoredObject,
    StoreError,
    check_key,
    check_metadata,
    run_to_end,
    single_chunk,
)
from receiver.store.s3multipart import (
    MIN_PART_SIZE,
    TAKEN_CODES,
    S3Requests,
    error_code,
    tags_refused,
)
from receiver.store.s3parts import PartsBody, b64, hold_parts, split_parts

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import (
        CompletedPartTypeDef,
    )

log = logging.getLogger(__name__)

_READ_SIZE = 1 << 20


class S3Store(S3Requests):
    """A ``Store`` over one bucket, optionally under a key prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        part_size: int = PART_SIZE,
        parts_in_flight: int = PARTS_IN_FLIGHT,
        single_put_parts: int | None = None,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size {part_size} is below S3's minimum of {MIN_PART_SIZE}")
        if parts_in_flight < 1:
            raise ValueError("parts_in_flight must be at least 1")
        single_put_parts = parts_in_flight if single_put_parts is None else single_put_parts
        if not 1 <= single_put_parts <= parts_in_flight:
            raise ValueError("single_put_parts must be between 1 and parts_in_flight")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = part_size
        self.parts_in_flight = parts_in_flight
        # Objects of up to this many parts go as one PUT (see the module docstring).
        self.single_put_parts = single_put_parts
        # FULL_OBJECT CRC32 multipart uploads until the store refuses one (_create_upload).
        self._full_object = True
        # A session of our own: boto3's default session is shared module state and not thread-safe
        # to create clients from. The client itself is thread-safe. SigV4 explicitly: for S3 with
        # a custom endpoint botocore would otherwise presign links with SigV2. No payload signing:
        # every body we send carries its checksum in a signed header, which the server verifies
        # against the body, so signing the payload too would only hash every byte a second time
        # (botocore does it over plain HTTP, and for every non-streamed body over HTTPS).
        self._client: S3Client = boto3.session.Session().client(
            "s3",
            config=Config(
                signature_version="s3v4",
                max_pool_connections=POOL_SIZE,
                s3={"payload_signing_enabled": False},
            ),
        )

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full_key(key)}"

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str,
        metadata: Mapping[str, str],
    ) -> StoredObject:
        return await self._put(key, chunks, content_type, metadata, create_only=True)

    async def _put(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        content_type: str,
        metadata: Mapping[str, str],
        *,
        create_only: bool,
    ) -> StoredObject:
        full_key = self._full_key(key)
        check_metadata(metadata)
        sha256 = hashlib.sha256()
        condition: dict[str, str] = {"IfNoneMatch": "*"} if create_only else {}
        async with contextlib.aclosing(split_parts(chunks, self.part_size, sha256)) as parts:
            held, ended = await hold_parts(parts, self.single_put_parts, self.part_size)
            if ended:
                # The stream fits in the parts a multipart upload would hold anyway: a single
                # PUT, whose SHA-256 checksum S3 verifies and keeps as the object's full-object
                # checksum. Several parts are sent back to back, not joined into a copy.
                size = sum(len(part) for part in held)
                body = held[0] if len(held) == 1 else PartsBody(held) if held else b""
                del held
                digest = sha256.digest()
                try:
                    await self._call_through(
                        self._client.put_object,
                        Bucket=self.bucket,
                        Key=full_key,
                        Body=body,  # type: ignore[arg-type]  # a bytearray saves a copy
                        ContentLength=size,
                        ContentType=content_type,
                        Metadata={**metadata, SHA256_KEY: digest.hex()},
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=b64(digest),
                        **condition,  # type: ignore[arg-type]
                    )
                except StoreError as exc:
                    if error_code(exc.__cause__) in TAKEN_CODES:
                        raise ObjectExists(key, digest.hex(), await self._existing(key)) from exc
                    raise
            else:
                # Handed over in a list the callee empties: a local name here would keep the
                # first parts alive for the whole upload, over the memory bound.
                handover, held = held, []
                await self._abort_earlier_uploads(full_key)
                upload_id, completed, size, whole_crc32 = await self._upload_parts(
                    full_key, handover, parts, content_type, metadata
                )
                digest = sha256.digest()
                extra = dict(condition)
                if whole_crc32 is not None:  # the server checks it on completion
                    extra["ChecksumCRC32"] = whole_crc32
                    extra["ChecksumType"] = "FULL_OBJECT"
                await self._complete(key, upload_id, completed, digest.hex(), extra)
        return StoredObject(key, self.uri_for(key), size, digest.hex(), content_type)

    async def _complete(
        self,
        key: str,
        upload_id: str,
        completed: list[CompletedPartTypeDef],
        sha256: str,
        condition: dict[str, str],
    ) -> None:
        """Complete the upload (the server checks the whole object's CRC32), then tag it.

        Both steps run to their end even if the put is cancelled meanwhile: a completed object
        without its tag would look foreign. A refused or interrupted completion aborts this
        upload, and only it: whatever is at the key stays.
        """
        full_key = self._full_key(key)
        try:
            await run_to_end(
                self._complete_and_tag(full_key, upload_id, completed, sha256, condition)
            )
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._abort(full_key, upload_id, [])  # NoSuchUpload if it completed
                if isinstance(exc, StoreError) and error_code(exc.__cause__) in TAKEN_CODES:
                    existing = await self._existing(key)
                    if existing is not None and existing.sha256 is None:
                        existing = await self._untagged(key, existing, sha256)
                    raise ObjectExists(key, sha256, existing) from exc
            raise

    async def _existing(self, key: str) -> ObjectInfo | None:
        """What holds ``key`` after a conditional write lost, or None if it cannot be read."""
        try:
            return await self.head(key)
        except StoreError:
            log.warning("could not read back s3://%s/%s", self.bucket, self._full_key(key))
            return None

    async def _untagged(self, key: str, existing: ObjectInfo, ours: str) -> ObjectInfo:
        """A multipart object without its SHA-256 tag: an earlier attempt completed it and was
        killed or frozen before tagging it. Hash its bytes (rare: only that crash window); the
        same digest as ours is that attempt's copy of the same bytes, so its record is repaired
        with the tag it should have had. Either way the caller sees what the key really holds."""
        digest = hashlib.sha256()
        try:
            async for chunk in self.read(key):
                digest.update(chunk)
        except StoreError:
            return existing
        found = digest.hexdigest()
        if found == ours:
            with contextlib.suppress(StoreError):
                await self._tag_sha256(self._full_key(key), found)
        return dataclasses.replace(existing, sha256=found, sha256_source="read")

    async def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str] = NO_METADATA,
    ) -> StoredObject:
        return await self._put(key, single_chunk(data), content_type, metadata, create_only=False)

    async def head(self, key: str) -> ObjectInfo | None:
        full_key = self._full_key(key)
        try:
            response = await self._call(self._client.head_object, Bucket=self.bucket, Key=full_key)
        except ObjectMissing:
            return None
        metadata = dict(response.get("Metadata", {}))
        sha256 = metadata.get(SHA256_KEY)
        source = "metadata" if sha256 is not None else None
        if sha256 is None:
            # Multipart objects carry the digest as a tag (see the module docstring).
            try:
                tagging = await self._call(
                    self._client.get_object_tagging, Bucket=self.bucket, Key=full_key
                )
            except ObjectMissing:
                return None  # deleted between the two requests
            except StoreError as exc:
                raise tags_refused(self.bucket, "GetObjectTagging", exc) from exc
            tags = {tag["Key"]: tag["Value"] for tag in tagging["TagSet"]}
            sha256 = tags.get(SHA256_KEY)
            source = "tag" if sha256 is not None else None
        return ObjectInfo(
            key=key,
            uri=self.uri_for(key),
            size=response["ContentLength"],
            content_type=response.get("ContentType"),
            sha256=sha256,
            metadata=metadata,
            sha256_source=source,
        )

    async def read(self, key: str, first: int = 0, last: int | None = None) -> AsyncIterator[bytes]:
        full_key = self._full_key(key)
        ranged: dict[str, str] = {}
        if first or last is not None:
            ranged["Range"] = f"bytes={first}-{'' if last is None else last}"
        response = await self._call(
            self._client.get_object, Bucket=self.bucket, Key=full_key, **ranged
        )
        body = response["Body"]
        try:
            while chunk := await self._call(body.read, _READ_SIZE):
                yield chunk
        finally:
            body.close()

    async def presign_get(self, key: str, expires_in: int) -> str | None:
        # No network, but it may have to resolve or refresh credentials, which can block.
        return await self._call(
            self._client.generate_presigned_url,
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._full_key(key)},
            ExpiresIn=expires_in,
        )

    async def list_keys(self, prefix: str = "") -> AsyncIterator[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        pages = iter(
            self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root + prefix
            )
        )
        # Each next() fetches one page over the network, so it runs in a worker thread.
        while (page := await self._call(next, pages, None)) is not None:
            for item in page.get("Contents", []):
                yield item["Key"][len(root) :]

    async def delete_all_versions(self, key: str) -> Erasure:
        full_key = self._full_key(key)
        pages = iter(
            self._client.get_paginator("list_object_versions").paginate(
                Bucket=self.bucket, Prefix=full_key
            )
        )
        versions: list[str] = []
        while (page := await self._call(next, pages, None)) is not None:
            for entry in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                if entry["Key"] == full_key:  # the prefix also matches longer keys
                    versions.append(entry.get("VersionId") or "null")
        removed = 0
        kept: list[str] = []
        for version in versions:
            try:
                await self._call_through(
                    self._client.delete_object,
                    Bucket=self.bucket,
                    Key=full_key,
                    VersionId=version,
                )
                removed += 1
            except StoreError as exc:
                # Object Lock retention or a legal hold answers AccessDenied: say so, go on.
                code = error_code(exc.__cause__) or type(exc.__cause__).__name__
                kept.append(f"version {version}: {code}")
        return Erasure(key, removed, tuple(kept))

    async def incomplete_uploads(
        self, prefix: str, initiated_before: datetime
    ) -> AsyncIterator[IncompleteUpload]:
        root = f"{self.prefix}/" if self.prefix else ""
        for upload in await self._call(self._list_uploads, root + prefix):
            if upload["Initiated"] < initiated_before:
                yield IncompleteUpload(
                    key=upload["Key"][len(root) :],
                    upload_id=upload["UploadId"],
                    initiated=upload["Initiated"].astimezone(UTC),
                )

    async def abort_upload(self, upload: IncompleteUpload) -> None:
        full_key = self._full_key(upload.key)
        try:
            await self._call(
                self._client.abort_multipart_upload,
                Bucket=self.bucket,
                Key=full_key,
                UploadId=upload.upload_id,
            )
        except StoreError as exc:
            if error_code(exc.__cause__) != "NoSuchUpload":
                raise

    async def ping(self) -> None:
        try:
            await self._call(self._client.head_bucket, Bucket=self.bucket)
        except ObjectMissing as exc:
            raise StoreError(f"bucket {self.bucket!r} not found") from exc

    async def aclose(self) -> None:
        await asyncio.to_thread(self._client.close)

    def _full_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key
