"""The S3 store: archived objects in ``s3://bucket/prefix`` on AWS or any S3-compatible endpoint.

The client is configured only the way boto3 always is (``AWS_ENDPOINT_URL``, ``AWS_REGION``,
profiles, credentials chain); this module adds no endpoint settings of its own. boto3 is
synchronous, so every call runs in a worker thread (``asyncio.to_thread``) and the event loop never
blocks on the network.

Uploads are driven part by part rather than through ``upload_fileobj``: on a non-seekable stream
s3transfer buffers about (10 + 5) parts, whereas here memory is bounded by
``(parts_in_flight + 1) * part_size``: the parts being uploaded plus the one being read.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import boto3
from botocore.exceptions import BotoCoreError, ClientError

from receiver.store import (
    NO_METADATA,
    SHA256_KEY,
    Erasure,
    ObjectInfo,
    ObjectMissing,
    StoredObject,
    StoreError,
    check_key,
    check_metadata,
    run_to_end,
    single_chunk,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

_T = TypeVar("_T")

log = logging.getLogger(__name__)

#: S3's smallest allowed part (every part but the last).
MIN_PART_SIZE = 5 * 2**20
#: S3's largest part number.
MAX_PARTS = 10_000
#: S3's CopyObject limit: larger objects can only be copied with UploadPartCopy.
MAX_COPY_SIZE = 5 * 2**30

_READ_SIZE = 1 << 20
# Error codes S3 (and compatible stores) answer for a missing key; HEAD has no body, only "404".
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})


class S3Store:
    """A ``Store`` over one bucket, optionally under a key prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        part_size: int = 8 * 2**20,
        parts_in_flight: int = 2,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size {part_size} is below S3's minimum of {MIN_PART_SIZE}")
        if parts_in_flight < 1:
            raise ValueError("parts_in_flight must be at least 1")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = part_size
        self.parts_in_flight = parts_in_flight
        # A session of our own: boto3's default session is shared module state and not thread-safe
        # to create clients from. The client itself is thread-safe.
        self._client: S3Client = boto3.session.Session().client("s3")

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
        full_key = self._full_key(key)
        check_metadata(metadata)
        hasher = hashlib.sha256()
        async with contextlib.aclosing(_parts(chunks, self.part_size, hasher)) as parts:
            first = await anext(parts, None)
            if first is None or len(first) < self.part_size:
                # The stream ended before one part filled up: a single PUT, whose SHA-256 checksum
                # S3 verifies and keeps as the object's full-object checksum.
                body = first or b""
                digest = hasher.digest()
                try:
                    await self._call_through(
                        self._client.put_object,
                        Bucket=self.bucket,
                        Key=full_key,
                        Body=body,
                        ContentType=content_type,
                        Metadata={**metadata, SHA256_KEY: digest.hex()},
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=_b64(digest),
                    )
                except asyncio.CancelledError:
                    # _call_through let the PUT finish: the object may exist now.
                    await self._delete_quietly(full_key)
                    raise
                size = len(body)
            else:
                # Handed over in a list the callee empties: a local name here would keep the first
                # part alive for the whole upload, one part over the memory bound.
                handover = [first]
                del first
                upload_id, completed, size = await self._upload_parts(
                    full_key, handover, parts, content_type, metadata
                )
                digest = hasher.digest()
                is_object = False
                try:
                    await self._call_through(
                        self._client.complete_multipart_upload,
                        Bucket=self.bucket,
                        Key=full_key,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": completed},
                    )
                    is_object = True
                    await self._record_sha256(full_key, size, content_type, metadata, digest.hex())
                except BaseException as exc:
                    # A refused completion leaves the upload (and any older object at the key);
                    # after a cancellation we cannot tell which happened, so clean up both.
                    if not is_object:
                        with anyio.CancelScope(shield=True):
                            await self._abort(full_key, upload_id, [])
                    if is_object or isinstance(exc, asyncio.CancelledError):
                        await self._delete_quietly(full_key)
                    raise
        return StoredObject(key, self.uri_for(key), size, digest.hex(), content_type)

    async def _upload_parts(
        self,
        full_key: str,
        handover: list[bytearray],
        parts: AsyncIterator[bytearray],
        content_type: str,
        metadata: Mapping[str, str],
    ) -> tuple[str, list[CompletedPartTypeDef], int]:
        """Start a multipart upload and upload the part in ``handover`` and the rest of ``parts``.

        Returns the upload id, the completed parts and the total size. At most
        ``parts_in_flight`` parts upload concurrently while the next one is read. On any failure
        the upload is aborted once every started part has finished, since a part still in flight
        during the abort could otherwise survive it and keep costing storage.
        """
        created = await self._call(
            self._client.create_multipart_upload,
            Bucket=self.bucket,
            Key=full_key,
            ContentType=content_type,
            Metadata=dict(metadata),
            ChecksumAlgorithm="SHA256",
        )
        upload_id = created["UploadId"]
        tasks: list[asyncio.Task[CompletedPartTypeDef]] = []
        try:
            in_flight: set[asyncio.Task[CompletedPartTypeDef]] = set()
            size = 0
            part: bytearray | None = handover.pop()
            while part is not None:
                number = len(tasks) + 1
                if number > MAX_PARTS:
                    raise StoreError(
                        f"object exceeds {MAX_PARTS} parts of {self.part_size} bytes: "
                        "raise part_size"
                    )
                if len(in_flight) >= self.parts_in_flight:
                    done, in_flight = await asyncio.wait(
                        in_flight, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done:
                        task.result()  # raise the first part failure, if any
                size += len(part)
                task = asyncio.create_task(self._upload_part(full_key, upload_id, number, part))
                tasks.append(task)
                in_flight.add(task)
                # Drop our reference before reading the next part, so a part whose upload
                # finishes meanwhile is freed at once.
                part = None
                part = await anext(parts, None)
            # asyncio.wait, unlike gather, does not cancel the parts if we are cancelled here.
            await asyncio.wait(in_flight)
            completed = [task.result() for task in tasks]
        except BaseException:
            # Shielded: under anyio (Starlette, task groups) a cancelled scope cancels every later
            # await too, which would skip the abort or let us return before it is done.
            with anyio.CancelScope(shield=True):
                await self._abort(full_key, upload_id, tasks)
            raise
        return upload_id, completed, size

    async def _upload_part(
        self, full_key: str, upload_id: str, number: int, data: bytearray
    ) -> CompletedPartTypeDef:
        # The worker thread takes the part out of this list and so holds the only reference: the
        # executor keeps the callable alive for a moment after the result is delivered, and by
        # then the event loop may already be reading the next part.
        handover = [data]
        del data

        def upload() -> CompletedPartTypeDef:
            body = handover.pop()
            # Hashed in the worker thread: hashlib releases the GIL, the event loop stays free.
            checksum = _b64(hashlib.sha256(body).digest())
            response = self._client.upload_part(
                Bucket=self.bucket,
                Key=full_key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,  # type: ignore[arg-type]  # botocore accepts bytearray; saves a copy
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=checksum,
            )
            return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}

        return await self._call(upload)

    async def _abort(
        self, full_key: str, upload_id: str, tasks: list[asyncio.Task[CompletedPartTypeDef]]
    ) -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self._call(
                self._client.abort_multipart_upload,
                Bucket=self.bucket,
                Key=full_key,
                UploadId=upload_id,
            )
        except StoreError as exc:
            if _error_code(exc.__cause__) == "NoSuchUpload":
                return  # it completed after all, or was aborted already
            # The original failure matters more; a bucket lifecycle rule
            # (AbortIncompleteMultipartUpload) is the backstop for uploads left behind here.
            log.warning("could not abort multipart upload of s3://%s/%s", self.bucket, full_key)

    async def _delete_quietly(self, full_key: str) -> None:
        """Best-effort removal of an object a failed put may have left behind."""
        with anyio.CancelScope(shield=True), contextlib.suppress(StoreError):
            await self._call(self._client.delete_object, Bucket=self.bucket, Key=full_key)

    async def _record_sha256(
        self,
        full_key: str,
        size: int,
        content_type: str,
        metadata: Mapping[str, str],
        sha256: str,
    ) -> None:
        """Attach the full-object SHA-256 to a just-completed multipart object.

        It is known only after the last part, but S3 metadata is fixed at
        create_multipart_upload and immutable afterwards. An in-place CopyObject with
        MetadataDirective=REPLACE rewrites the metadata, and with ChecksumAlgorithm=SHA256 S3
        recomputes the copy's checksum over the whole object, so the object's own S3 checksum
        becomes the full-object SHA-256 instead of the composite per-part one (``<base64>-N``).
        CopyObject stops at 5 GiB; larger objects get the digest as an object tag instead, the one
        thing S3 lets us change after upload.
        """
        if size <= MAX_COPY_SIZE:
            await self._call_through(
                self._client.copy_object,
                Bucket=self.bucket,
                Key=full_key,
                CopySource={"Bucket": self.bucket, "Key": full_key},
                MetadataDirective="REPLACE",
                Metadata={**metadata, SHA256_KEY: sha256},
                ContentType=content_type,
                ChecksumAlgorithm="SHA256",
            )
        else:
            await self._call_through(
                self._client.put_object_tagging,
                Bucket=self.bucket,
                Key=full_key,
                Tagging={"TagSet": [{"Key": SHA256_KEY, "Value": sha256}]},
            )

    async def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str] = NO_METADATA,
    ) -> StoredObject:
        return await self.put_stream(
            key, single_chunk(data), content_type=content_type, metadata=metadata
        )

    async def head(self, key: str) -> ObjectInfo | None:
        full_key = self._full_key(key)
        try:
            response = await self._call(self._client.head_object, Bucket=self.bucket, Key=full_key)
        except ObjectMissing:
            return None
        metadata = dict(response.get("Metadata", {}))
        sha256 = metadata.get(SHA256_KEY)
        if sha256 is None:
            # Objects over MAX_COPY_SIZE carry the digest as a tag (see _record_sha256).
            tagging = await self._call(
                self._client.get_object_tagging, Bucket=self.bucket, Key=full_key
            )
            tags = {tag["Key"]: tag["Value"] for tag in tagging["TagSet"]}
            sha256 = tags.get(SHA256_KEY)
        return ObjectInfo(
            key=key,
            uri=self.uri_for(key),
            size=response["ContentLength"],
            content_type=response.get("ContentType"),
            sha256=sha256,
            metadata=metadata,
        )

    async def read(self, key: str) -> AsyncIterator[bytes]:
        full_key = self._full_key(key)
        response = await self._call(self._client.get_object, Bucket=self.bucket, Key=full_key)
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
                code = _error_code(exc.__cause__) or type(exc.__cause__).__name__
                kept.append(f"version {version}: {code}")
        return Erasure(key, removed, tuple(kept))

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

    async def _call_through(self, fn: Callable[..., _T], **kwargs: Any) -> _T:
        """``_call`` for requests that make or change an object: see ``run_to_end``."""
        return await run_to_end(self._call(fn, **kwargs))

    async def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a blocking boto3 call in a worker thread, raising its errors as ``StoreError``."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise ObjectMissing(f"s3://{self.bucket}: {exc}") from exc
            raise StoreError(f"s3://{self.bucket}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"s3://{self.bucket}: {exc}") from exc


def _error_code(exc: BaseException | None) -> str:
    """S3's error code if ``exc`` is a ``ClientError``, else ""."""
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


async def _parts(
    chunks: AsyncIterable[bytes], part_size: int, hasher: hashlib._Hash
) -> AsyncGenerator[bytearray, None]:
    """Regroup ``chunks`` into parts of exactly ``part_size`` bytes (the last may be shorter).

    Every chunk goes into ``hasher`` as it arrives. A short part is only ever yielded at the end
    of the stream, which is how the caller knows a single PUT will do. Nothing is yielded for an
    empty stream.
    """
    # The first buffer grows with the data, so a small object costs only its size. Once a part
    # has filled up the stream is known to be big, and later buffers are allocated at exactly
    # part_size: a growing bytearray over-allocates by up to 1/8, which would add up over the
    # parts in flight.
    buffer = bytearray()
    filled = 0
    async for chunk in chunks:
        hasher.update(chunk)
        view = memoryview(chunk)
        while view:
            take = min(part_size - filled, len(view))
            buffer[filled : filled + take] = view[:take]
            filled += take
            view = view[take:]
            if filled == part_size:
                yield buffer
                buffer = bytearray(part_size)
                filled = 0
    if filled:
        del buffer[filled:]
        yield buffer


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")
