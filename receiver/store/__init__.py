"""The store port: where archived objects (assets and their manifests) are written and read back.

What crosses the line between the archiver and a store:

* **Keys** are ``/``-separated paths relative to the store's root (``file://``) or prefix
  (``s3://bucket/prefix``), e.g. ``apex/2026/03/16/<job>/output.png``. Both adapters use the
  same layout. A key has no empty, ``.`` or ``..`` segment and does not start with ``/``; anything
  else is refused with ``ValueError`` before any I/O.
* **Bytes** go in as an async iterable of chunks (``put_stream``) or one ``bytes`` (``put_bytes``,
  for small things such as manifests) and come out as an async iterator of chunks (``read``).
  Neither direction ever holds a whole object in memory.
* **Integrity**: every put computes the object's SHA-256 while streaming, the backend verifies
  what it received where it can (S3 checksums), and the full-object SHA-256 (hex) is recorded with
  the object itself, readable without downloading it: user metadata ``sha256`` when it is known
  before the write (S3 single PUT, local sidecar), an object tag ``sha256`` otherwise (S3
  multipart: metadata is fixed at the start, tags are the one thing S3 lets you add later).
  ``StoredObject`` returns it to the caller, ``head`` reports it from wherever it is kept
  (``ObjectInfo.sha256_source``), and ``read`` lets a verifier recompute it.
* **Metadata** is a small ``str -> str`` map stored with the object (S3 user metadata, or the
  local sidecar). Its rules are S3's, applied to both adapters by ``check_metadata`` so a local
  archive can be moved to S3 unchanged: lower-case ASCII keys, printable ASCII values, at most
  2 KB in total. Anything bigger belongs in a manifest object.
* **Failure**: a put either returns a ``StoredObject`` for a complete object or leaves nothing of
  its own behind (no pending S3 multipart upload of this attempt, no temp file), cancellation
  included: cleanup finishes before the put raises. Cleanup only ever aborts this attempt's own
  upload or removes its own temp file; it **never deletes the final key**, which may hold another
  attempt's copy (or this attempt's, if the step that made it visible had already run when the
  cancellation arrived: then it is complete, with its SHA-256 recorded). Exceptions raised by the
  caller's chunk iterator propagate unchanged; failures of the backend itself are raised as
  ``StoreError`` (``ObjectMissing`` when the key does not exist).
* **No replacing** (``put_stream``): keys are deterministic, so a retried, duplicated or
  taken-over copy lands on the same key, and the first complete object there wins. ``put_stream``
  is a conditional create (S3 ``If-None-Match: *`` on PutObject and CompleteMultipartUpload; a
  hard link locally): if the key is taken it raises ``ObjectExists`` with what is there, and the
  caller compares SHA-256s. ``put_bytes`` (manifests, rewritten as a job progresses) replaces.
* **Incomplete uploads** an attempt could not clean up (killed process) are found with
  ``incomplete_uploads`` and removed with ``abort_upload`` (``receiver verify --repair``); an S3
  put also aborts the earlier incomplete uploads for its own key before it starts one.
* **Erasure** (``delete_all_versions``, for ``receiver forget`` only) removes a key for good:
  every version and delete marker where the bucket keeps versions. What the store refuses to
  remove (Object Lock retention, a legal hold, missing permissions) is reported, not raised.

The composition root (``receiver.app.open_store``) picks the adapter from the URL:
``file:///abs/path``, ``file://./relative`` or ``s3://bucket/prefix``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterable, AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

import anyio

__all__ = [
    "METADATA_LIMIT",
    "Erasure",
    "IncompleteUpload",
    "ObjectExists",
    "ObjectInfo",
    "ObjectMissing",
    "Store",
    "StoreError",
    "StoredObject",
    "check_key",
    "check_metadata",
    "run_to_end",
]

_T = TypeVar("_T")

#: S3's limit on user metadata: the UTF-8 bytes of all keys and values together.
METADATA_LIMIT = 2048

#: An empty, read-only default for ``metadata`` arguments.
NO_METADATA: Mapping[str, str] = MappingProxyType({})

#: The metadata key under which every store records the object's full SHA-256 (hex).
SHA256_KEY = "sha256"

_METADATA_KEY = re.compile(r"[a-z0-9-]+")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
# The sha256 entry the store adds itself: its key plus 64 hex digits.
_SHA256_ENTRY_SIZE = len(SHA256_KEY) + 64


@dataclass(frozen=True)
class StoredObject:
    """A complete object just written by ``put_stream`` / ``put_bytes``."""

    key: str  # relative to the store root/prefix
    uri: str  # "s3://bucket/prefix/key" or "file:///abs/path/key"
    size: int
    sha256: str  # hex, computed over exactly the bytes written
    content_type: str


@dataclass(frozen=True)
class ObjectInfo:
    """What the store has recorded about an existing object (``head``)."""

    key: str
    uri: str
    size: int
    content_type: str | None
    sha256: str | None  # as recorded with the object; None if it never was (foreign objects)
    metadata: dict[str, str]  # user metadata as stored, "sha256" included when present
    #: where ``sha256`` was read: "metadata" (S3 user metadata), "tag" (S3 object tag),
    #: "sidecar" (local), "read" (recomputed from the bytes: the record was missing), or None
    #: when nothing is recorded
    sha256_source: str | None = None


@dataclass(frozen=True)
class IncompleteUpload:
    """An upload that was started and neither completed nor aborted (S3 multipart, local temp)."""

    key: str  # relative to the store root/prefix
    upload_id: str  # the backend's handle: S3 UploadId, or the temp file's name
    initiated: datetime  # aware UTC, as the backend reports it


@dataclass(frozen=True)
class Erasure:
    """What ``delete_all_versions`` did to one key."""

    key: str
    removed: int  # versions (and delete markers) removed; 0 if there was nothing
    kept: tuple[str, ...] = ()  # what could not be removed, and why (one line each)


class StoreError(Exception):
    """The store failed (unreachable, refused, out of space...). Adapters wrap backend errors."""


class ObjectMissing(StoreError):
    """The key does not exist in the store."""


class ObjectExists(StoreError):
    """A put that must not replace anything found the key already taken (a conditional write lost).

    ``sha256`` is the digest of the bytes this put streamed (hex); ``existing`` is what the store
    holds at the key (None if it could not be read back). The caller decides: the same SHA-256
    means another attempt finished the same copy; a different one is a conflict to report.
    Nothing this put wrote is left behind, and the existing object is untouched.
    """

    def __init__(self, key: str, sha256: str, existing: ObjectInfo | None) -> None:
        super().__init__(f"{key!r} already exists in the store")
        self.key = key
        self.sha256 = sha256
        self.existing = existing


class Store(Protocol):
    """A place to archive objects under deterministic keys. See the module docstring."""

    def uri_for(self, key: str) -> str:
        """The full location of ``key`` (it need not exist)."""
        ...

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str,
        metadata: Mapping[str, str],
    ) -> StoredObject:
        """Create ``key`` from ``chunks``, computing SHA-256 on the way, in bounded memory.

        Never replaces: if the key exists (before, or by the time this put commits) it raises
        ``ObjectExists`` and the existing object is untouched. On any failure this put's own
        upload or temp file is cleaned up, the final key is never deleted, and the exception
        propagates (the iterator's own exceptions unchanged, backend errors as ``StoreError``).
        The object records ``metadata`` plus its full SHA-256 (see the module docstring).
        """
        ...

    async def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str] = NO_METADATA,
    ) -> StoredObject:
        """Write ``data`` at ``key``, replacing what is there (manifests; not a create-only put)."""
        ...

    async def head(self, key: str) -> ObjectInfo | None:
        """What is recorded about ``key``, or None if it does not exist."""
        ...

    def read(self, key: str, first: int = 0, last: int | None = None) -> AsyncIterator[bytes]:
        """Stream the object's bytes from ``first`` to ``last`` (inclusive, as HTTP ranges; None:
        to the end), reading only those; raises ``ObjectMissing`` (on first iteration) if absent."""
        ...

    async def presign_get(self, key: str, expires_in: int) -> str | None:
        """A time-limited GET URL (a credential: never log it), or None if the store has none."""
        ...

    def list_keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Keys (relative to the root) starting with ``prefix``, in no guaranteed order."""
        ...

    async def delete_all_versions(self, key: str) -> Erasure:
        """Remove ``key`` for good: every version and delete marker (S3 ListObjectVersions +
        DeleteObject with VersionId), or the file and its sidecar (local).

        A version the store refuses to delete (Object Lock, legal hold, access denied) is listed
        in ``Erasure.kept``; other versions are still removed. Backend failures that stop the
        whole operation raise ``StoreError``.
        """
        ...

    def incomplete_uploads(
        self, prefix: str, initiated_before: datetime
    ) -> AsyncIterator[IncompleteUpload]:
        """Uploads under ``prefix`` started before ``initiated_before`` and never finished."""
        ...

    async def abort_upload(self, upload: IncompleteUpload) -> None:
        """Abort ``upload`` (gone already is fine); never touches a complete object."""
        ...

    async def ping(self) -> None:
        """Raise ``StoreError`` unless the store is reachable and usable (readiness probe)."""
        ...

    async def aclose(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


async def single_chunk(data: bytes) -> AsyncIterator[bytes]:
    """`data` as a stream: `put_bytes` is `put_stream` of one chunk in every adapter."""
    yield data


def check_key(key: str) -> None:
    """Refuse keys that are empty, absolute or have empty/``.``/``..`` segments (ValueError).

    The same rule for every adapter keeps the layouts identical and keeps local keys inside the
    root folder.
    """
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"invalid store key {key!r}: must be a relative '/'-separated path")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid store key {key!r}: empty, '.' or '..' segment")


def check_metadata(metadata: Mapping[str, str]) -> None:
    """Apply S3's user-metadata rules (ValueError), leaving room for the ``sha256`` entry.

    Keys: lower-case ASCII ``[a-z0-9-]`` (S3 lower-cases keys anyway; refusing upper case keeps
    what we read back equal to what we wrote). Values: printable US-ASCII, as HTTP headers carry
    them. Total of keys and values: at most ``METADATA_LIMIT`` bytes including ``sha256``.
    """
    if SHA256_KEY in metadata:
        raise ValueError(f"metadata key {SHA256_KEY!r} is reserved: the store records it")
    total = _SHA256_ENTRY_SIZE
    for name, value in metadata.items():
        if not _METADATA_KEY.fullmatch(name):
            raise ValueError(f"metadata key {name!r}: only lower-case ASCII [a-z0-9-] allowed")
        if not _PRINTABLE_ASCII.fullmatch(value):
            raise ValueError(f"metadata value for {name!r}: only printable US-ASCII allowed")
        total += len(name) + len(value)
    if total > METADATA_LIMIT:
        raise ValueError(
            f"metadata is {total} bytes (sha256 included), over S3's {METADATA_LIMIT}-byte "
            "user metadata limit: put large values in a manifest instead"
        )


async def run_to_end(step: Coroutine[Any, Any, _T]) -> _T:
    """Await ``step`` to its end even if cancelled meanwhile, then re-raise the cancellation.

    For adapters, around the step that makes an object visible (S3 PutObject or
    CompleteMultipartUpload, the local rename): cancelling an await does not stop the work already
    running in a worker thread, so without this the object could appear after the put had
    reported failure. Waiting lets the adapter know the step's outcome before it cleans up: a
    completed step's object is complete and stays (it is never deleted), a refused one's upload
    is aborted.
    """
    task = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # anyio's shield keeps a cancelled scope (level-triggered) from interrupting the wait.
        with anyio.CancelScope(shield=True):
            await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # mark retrieved: the cancellation is what the caller sees
        raise
