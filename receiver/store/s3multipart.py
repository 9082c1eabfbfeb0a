"""The S3 store's requests and its multipart upload path, split from ``s3.py``.

``S3Requests`` is the base of ``S3Store``: the boto3 client's calls, run on the AWS thread pool
with their errors mapped to the store's (``_call``), and the multipart upload: create (FULL_OBJECT
CRC32 where the store offers it), parts in flight, complete with the whole object's CRC32, tag
with its SHA-256, abort. ``s3.py`` decides when an upload is multipart and what a refused one
means; its docstring has the design.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from botocore.exceptions import BotoCoreError, ClientError

from receiver.backends.aws import run_blocking
from receiver.store import SHA256_KEY, ObjectMissing, StoreError, run_to_end
from receiver.store.s3parts import b64, crc32_b64, crc32_combine

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import (
        CompletedPartTypeDef,
        CreateMultipartUploadOutputTypeDef,
        MultipartUploadTypeDef,
    )

_T = TypeVar("_T")

log = logging.getLogger("receiver.store.s3")

#: S3's smallest allowed part (every part but the last).
MIN_PART_SIZE = 5 * 2**20
#: S3's largest part number.
MAX_PARTS = 10_000

# Error codes S3 (and compatible stores) answer for a missing key; HEAD has no body, only "404".
MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
# What a conditional write (If-None-Match: *) answers when the key is taken. 409
# ConditionalRequestConflict: a concurrent write to the same key won the race.
TAKEN_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
# What a store answers for a FULL_OBJECT CRC32 multipart upload it does not offer.
NO_FULL_OBJECT_CODES = frozenset(
    {"NotImplemented", "501", "InvalidArgument", "InvalidRequest", "400"}
)
# What stores answer for an operation they do not implement (or this identity may not use).
UNSUPPORTED_CODES = frozenset(
    {"NotImplemented", "501", "MethodNotAllowed", "405", "InvalidRequest", "AccessDenied"}
)


def _whole_crc32(completed: list[CompletedPartTypeDef], lengths: list[int]) -> str:
    """The object's CRC32 from its parts' CRC32s, in part order (S3's base64)."""
    crc = 0
    for part, length in zip(completed, lengths, strict=True):
        crc = crc32_combine(crc, int.from_bytes(base64.b64decode(part["ChecksumCRC32"])), length)
    return b64(crc.to_bytes(4, "big"))


class S3Requests:
    """Requests to one bucket; ``S3Store`` sets these attributes."""

    bucket: str
    part_size: int
    parts_in_flight: int
    _client: S3Client
    # FULL_OBJECT CRC32 multipart uploads until the store refuses one (_create_upload).
    _full_object: bool

    async def _complete_and_tag(
        self,
        full_key: str,
        upload_id: str,
        completed: list[CompletedPartTypeDef],
        sha256: str,
        condition: dict[str, str],
    ) -> None:
        await self._call(
            self._client.complete_multipart_upload,
            Bucket=self.bucket,
            Key=full_key,
            UploadId=upload_id,
            MultipartUpload={"Parts": completed},
            **condition,  # type: ignore[arg-type]
        )
        await self._tag_sha256(full_key, sha256)

    async def _tag_sha256(self, full_key: str, sha256: str) -> None:
        """Record the full-object SHA-256 of a just-completed multipart object as a tag."""
        try:
            await self._call(
                self._client.put_object_tagging,
                Bucket=self.bucket,
                Key=full_key,
                Tagging={"TagSet": [{"Key": SHA256_KEY, "Value": sha256}]},
            )
        except StoreError as exc:
            raise tags_refused(self.bucket, "PutObjectTagging", exc) from exc

    async def _abort_earlier_uploads(self, full_key: str) -> None:
        """Abort incomplete uploads for exactly ``full_key`` that earlier attempts left behind."""
        for upload in await self._call(self._list_uploads, full_key):
            if upload["Key"] == full_key:
                await self._abort(full_key, upload["UploadId"], [])

    def _list_uploads(self, prefix: str) -> list[MultipartUploadTypeDef]:
        """Every incomplete multipart upload under ``prefix`` (all pages; blocking)."""
        found: list[MultipartUploadTypeDef] = []
        paginator = self._client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            found.extend(page.get("Uploads", []))
        return found

    async def _upload_parts(
        self,
        full_key: str,
        handover: list[bytearray],
        parts: AsyncIterator[bytearray],
        content_type: str,
        metadata: Mapping[str, str],
    ) -> tuple[str, list[CompletedPartTypeDef], int, str | None]:
        """Start a multipart upload and upload the parts in ``handover`` (read ahead, taken out
        as they go) and the rest of ``parts``.

        Returns the upload id, the completed parts, the total size and, for an upload of type
        FULL_OBJECT, the whole object's CRC32 (S3's base64), combined from the parts' own. At
        most ``parts_in_flight`` parts upload concurrently while the next one is read. On any
        failure the upload is aborted once every started part has finished, since a part still
        in flight during the abort could otherwise survive it and keep costing storage.
        """
        created, full_object = await self._create_upload(full_key, content_type, metadata)
        upload_id = created["UploadId"]
        tasks: list[asyncio.Task[CompletedPartTypeDef]] = []
        try:
            in_flight: set[asyncio.Task[CompletedPartTypeDef]] = set()
            lengths: list[int] = []
            part: bytearray | None = handover.pop(0)
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
                lengths.append(len(part))
                task = asyncio.create_task(
                    self._upload_part(full_key, upload_id, number, part, full_object)
                )
                tasks.append(task)
                in_flight.add(task)
                # Drop our reference before reading the next part, so a part whose upload
                # finishes meanwhile is freed at once.
                part = None
                part = handover.pop(0) if handover else await anext(parts, None)
            # asyncio.wait, unlike gather, does not cancel the parts if we are cancelled here.
            await asyncio.wait(in_flight)
            completed = [task.result() for task in tasks]
        except BaseException:
            # Shielded: under anyio (Starlette, task groups) a cancelled scope cancels every later
            # await too, which would skip the abort or let us return before it is done.
            with anyio.CancelScope(shield=True):
                await self._abort(full_key, upload_id, tasks)
            raise
        whole = _whole_crc32(completed, lengths) if full_object else None
        return upload_id, completed, sum(lengths), whole

    async def _create_upload(
        self, full_key: str, content_type: str, metadata: Mapping[str, str]
    ) -> tuple[CreateMultipartUploadOutputTypeDef, bool]:
        """CreateMultipartUpload, FULL_OBJECT CRC32 where the store offers it, else per-part
        SHA-256 (COMPOSITE): Cloudflare R2, for one, has FULL_OBJECT only for CRC64NVME, which
        botocore computes only with the optional CRT. The store's answer is remembered."""
        common: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": full_key,
            "ContentType": content_type,
            "Metadata": dict(metadata),
        }
        if self._full_object:
            try:
                created = await self._call(
                    self._client.create_multipart_upload,
                    **common,
                    ChecksumAlgorithm="CRC32",
                    ChecksumType="FULL_OBJECT",
                )
                return created, True
            except StoreError as exc:
                if error_code(exc.__cause__) not in NO_FULL_OBJECT_CODES:
                    raise
                self._full_object = False
                log.warning(
                    "s3://%s refuses FULL_OBJECT CRC32 multipart uploads (%s): parts carry "
                    "SHA-256 instead, and the whole object has no server-side checksum",
                    self.bucket,
                    error_code(exc.__cause__),
                )
        created = await self._call(
            self._client.create_multipart_upload, **common, ChecksumAlgorithm="SHA256"
        )
        return created, False

    async def _upload_part(
        self, full_key: str, upload_id: str, number: int, data: bytearray, full_object: bool
    ) -> CompletedPartTypeDef:
        # The worker thread takes the part out of this list and so holds the only reference: the
        # executor keeps the callable alive for a moment after the result is delivered, and by
        # then the event loop may already be reading the next part.
        handover = [data]
        del data

        def upload() -> CompletedPartTypeDef:
            body = handover.pop()
            # Computed in the worker thread: zlib and hashlib release the GIL.
            if full_object:
                name, algorithm = "ChecksumCRC32", "CRC32"
                checksum = crc32_b64(body)
            else:
                name, algorithm = "ChecksumSHA256", "SHA256"
                checksum = b64(hashlib.sha256(body).digest())
            response = self._client.upload_part(
                Bucket=self.bucket,
                Key=full_key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,  # type: ignore[arg-type]  # botocore accepts bytearray; saves a copy
                ChecksumAlgorithm=algorithm,  # type: ignore[arg-type]
                **{name: checksum},  # type: ignore[arg-type]
            )
            completed: CompletedPartTypeDef = {"PartNumber": number, "ETag": response["ETag"]}
            completed[name] = checksum  # type: ignore[literal-required]
            return completed

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
            if error_code(exc.__cause__) == "NoSuchUpload":
                return  # it completed after all, or was aborted already
            # The original failure matters more; `receiver verify --repair` (and a bucket
            # lifecycle rule on AWS) finds uploads left behind here.
            log.warning("could not abort multipart upload of s3://%s/%s", self.bucket, full_key)

    async def _call_through(self, fn: Callable[..., _T], **kwargs: Any) -> _T:
        """``_call`` for requests that make or change an object: see ``run_to_end``."""
        return await run_to_end(self._call(fn, **kwargs))

    async def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a blocking boto3 call in a worker thread, raising its errors as ``StoreError``."""
        try:
            # The AWS pool, not asyncio's default one (a few threads on a small machine, which
            # the ledger's reads and DNS lookups share): every copy slot holds a thread here
            # for a whole part, and the manifests and tags of finished copies need theirs.
            return await run_blocking(functools.partial(fn, *args, **kwargs))
        except ClientError as exc:
            if error_code(exc) in MISSING_CODES:
                raise ObjectMissing(f"s3://{self.bucket}: {exc}") from exc
            raise StoreError(f"s3://{self.bucket}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"s3://{self.bucket}: {exc}") from exc


def tags_refused(bucket: str, operation: str, exc: StoreError) -> StoreError:
    """The error for a store that does not keep object tags, which multipart SHA-256s live in."""
    code = error_code(exc.__cause__)
    if code in UNSUPPORTED_CODES:
        return StoreError(
            f"s3://{bucket}: the store refuses object tags ({operation}: {code}); receiver records "
            "the SHA-256 of multipart objects in a tag, so this store cannot hold them verifiably"
        )
    return exc


def error_code(exc: BaseException | None) -> str:
    """S3's error code if ``exc`` is a ``ClientError``, else ""."""
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""
