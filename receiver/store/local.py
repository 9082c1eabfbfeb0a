"""The embedded store: archived objects as files under a local folder (``file://`` URLs).

Same key layout as S3: key ``a/b/c.png`` is the file ``<root>/a/b/c.png``. What S3 keeps as object
metadata lives in a sidecar ``<root>/a/b/c.png.meta.json`` (content type, size, sha256, user
metadata). Both are written to a temp file in the destination folder and fsynced. ``put_stream``
then hard-links the data file into place (``os.link`` fails if the name is taken: the local
``If-None-Match: *``, atomic on POSIX file systems), so an existing object is never replaced and
the put raises ``ObjectExists``; ``put_bytes`` renames over it with ``os.replace``. Either way a
reader sees a whole file, never a half-written one. The sidecar follows with ``os.replace``.
A temp file a killed process left behind is an incomplete upload (``incomplete_uploads``); a data
file it left without its sidecar is completed by the next put of the same bytes.

Blocking file I/O runs in worker threads; data is written in chunks of at most ``_WRITE_SIZE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import filecmp
import hashlib
import json
import os
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio

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

_T = TypeVar("_T")

SIDECAR_SUFFIX = ".meta.json"
_TEMP_SUFFIX = ".tmp"
# Bytes gathered before one write() in a worker thread: amortises the thread hop per chunk.
_WRITE_SIZE = 1 << 20
_READ_SIZE = 1 << 20


class LocalStore:
    """A ``Store`` rooted at an absolute folder (created on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def uri_for(self, key: str) -> str:
        return self._path(key).as_uri()

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
        path = self._path(key)
        check_metadata(metadata)
        await _io(path.parent.mkdir, parents=True, exist_ok=True)
        fd, tmp_name = await _io(
            tempfile.mkstemp, dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX
        )
        tmp = Path(tmp_name)
        hasher = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                pending = bytearray()
                # The caller's iterator runs outside _io so its exceptions are not wrapped.
                async for chunk in chunks:
                    hasher.update(chunk)
                    size += len(chunk)
                    pending += chunk
                    if len(pending) >= _WRITE_SIZE:
                        await _io(out.write, pending)
                        pending = bytearray()
                await _io(_write_and_sync, out, pending)
            digest = hasher.hexdigest()
            sidecar = {
                "content_type": content_type,
                "size": size,
                SHA256_KEY: digest,
                "metadata": {**metadata, SHA256_KEY: digest},
            }
            encoded = json.dumps(sidecar, sort_keys=True).encode()
            # Runs to its end even if cancelled: the object is then complete, and stays. The
            # final name is never removed here, whoever put it there.
            created = await run_to_end(_io(_commit, tmp, path, encoded, create_only))
            if not created:
                raise ObjectExists(key, digest, await self.head(key))
        except BaseException:
            # Shielded: a cancelled anyio scope would otherwise cancel the cleanup's await too.
            with anyio.CancelScope(shield=True):
                await asyncio.to_thread(tmp.unlink, missing_ok=True)
            raise
        return StoredObject(key, path.as_uri(), size, digest, content_type)

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
        path = self._path(key)
        return await _io(self._head_sync, key, path)

    def _head_sync(self, key: str, path: Path) -> ObjectInfo | None:
        try:
            size = path.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        sidecar: dict[str, Any] = {}
        # An object without a sidecar (copied in by hand, or a crash between the two renames) is
        # reported with what the file itself says: its size, nothing recorded.
        with contextlib.suppress(FileNotFoundError):
            try:
                sidecar = json.loads(_sidecar(path).read_bytes())
            except ValueError as exc:
                raise StoreError(f"corrupt sidecar for {path.as_uri()}: {exc}") from exc
        metadata = {str(k): str(v) for k, v in sidecar.get("metadata", {}).items()}
        return ObjectInfo(
            key=key,
            uri=path.as_uri(),
            size=size,
            content_type=sidecar.get("content_type"),
            sha256=sidecar.get(SHA256_KEY),
            metadata=metadata,
            sha256_source="sidecar" if sidecar.get(SHA256_KEY) else None,
        )

    async def read(self, key: str, first: int = 0, last: int | None = None) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectMissing(f"no object at {path.as_uri()}") from exc
        except OSError as exc:
            raise StoreError(f"local store: {exc}") from exc
        try:
            if first:
                await _io(handle.seek, first)
            left = None if last is None else last + 1 - first
            while left is None or left > 0:
                chunk = await _io(
                    handle.read, _READ_SIZE if left is None else min(left, _READ_SIZE)
                )
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk
        finally:
            handle.close()

    async def presign_get(self, key: str, expires_in: int) -> str | None:
        self._path(key)
        return None

    async def list_keys(self, prefix: str = "") -> AsyncIterator[str]:
        # Walk only the folder the prefix fully names ("apex/2026/0" -> <root>/apex/2026) and
        # filter the rest by string prefix, as S3 does.
        folder = prefix.rpartition("/")[0]
        if folder:
            check_key(folder)
        walker = os.walk(self.root / folder)
        while True:
            step = await _io(next, walker, None)
            if step is None:
                return
            dirpath, dirnames, filenames = step
            dirnames.sort()
            relative = Path(dirpath).relative_to(self.root).as_posix()
            for name in sorted(filenames):
                if name.endswith(SIDECAR_SUFFIX) or _is_temp(name):
                    continue
                key = name if relative == "." else f"{relative}/{name}"
                if key.startswith(prefix):
                    yield key

    async def delete_all_versions(self, key: str) -> Erasure:
        path = self._path(key)

        def unlink() -> int:
            existed = path.exists()
            _remove(path)  # a folder keeps no versions: the file and its sidecar are all
            if existed:
                _fsync_dir(path.parent)
            return 1 if existed else 0

        return Erasure(key, await _io(unlink))

    async def incomplete_uploads(
        self, prefix: str, initiated_before: datetime
    ) -> AsyncIterator[IncompleteUpload]:
        folder = prefix.rpartition("/")[0]
        if folder:
            check_key(folder)
        walker = os.walk(self.root / folder)
        cutoff = initiated_before.timestamp()
        while True:
            step = await _io(next, walker, None)
            if step is None:
                return
            dirpath, _, filenames = step
            relative = Path(dirpath).relative_to(self.root).as_posix()
            for name in sorted(filenames):
                if not _is_temp(name):
                    continue
                # ".<target>.<random>.tmp": mkstemp's random part has no dots.
                target = name[1:].rsplit(".", 2)[0]
                key = target if relative == "." else f"{relative}/{target}"
                if not key.startswith(prefix):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    mtime = (await _io(os.stat, Path(dirpath) / name)).st_mtime
                    if mtime < cutoff:
                        yield IncompleteUpload(key, name, datetime.fromtimestamp(mtime, UTC))

    async def abort_upload(self, upload: IncompleteUpload) -> None:
        check_key(upload.key)
        if "/" in upload.upload_id or not _is_temp(upload.upload_id):
            raise ValueError(f"not a temp file of this store: {upload.upload_id!r}")
        folder = upload.key.rpartition("/")[0]
        await _io((self.root / folder / upload.upload_id).unlink, missing_ok=True)

    async def ping(self) -> None:
        def probe() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(f"{self.root} is not writable")

        await _io(probe)

    async def aclose(self) -> None:
        return None

    def _path(self, key: str) -> Path:
        check_key(key)
        name = key.rpartition("/")[2]
        # These names are the store's own bookkeeping files; a key must not collide with them.
        if name.endswith(SIDECAR_SUFFIX) or _is_temp(name):
            raise ValueError(f"invalid store key {key!r}: reserved file name")
        return self.root / key


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _remove(path: Path) -> None:
    """Erasure only (`delete_all_versions`): the data file and its sidecar."""
    _sidecar(path).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(_TEMP_SUFFIX)


async def _io(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run blocking file I/O in a worker thread, raising OS errors as ``StoreError``."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except OSError as exc:
        raise StoreError(f"local store: {exc}") from exc


def _write_and_sync(out: Any, data: bytes | bytearray) -> None:
    out.write(data)
    out.flush()
    os.fsync(out.fileno())


def _commit(tmp: Path, path: Path, sidecar: bytes, create_only: bool) -> bool:
    """Move the finished data file into place, then its sidecar; False if the name is taken.

    ``create_only``: hard-link ``tmp`` to ``path``, which fails if ``path`` exists (the caller
    removes ``tmp``), unless ``path`` is the same bytes without a sidecar (a put killed
    between the renames): then only the sidecar is written. Otherwise the old sidecar goes
    first, so that a crash in between leaves a file without a sidecar (reported as "sha256 not
    recorded") rather than a sidecar describing other bytes. If the sidecar cannot be written
    the error propagates and the data file stays: it is complete, and another attempt may
    already rely on it being there.
    """
    meta = _sidecar(path)
    if create_only:
        try:
            os.link(tmp, path)
        except FileExistsError:
            # A file without its sidecar holding these very bytes is this commit's own first
            # half, left by a process killed between the two renames: finish it. Anything else
            # at the name stays as it is.
            if meta.exists() or not filecmp.cmp(tmp, path, shallow=False):
                return False
        tmp.unlink()
    else:
        meta.unlink(missing_ok=True)
        os.replace(tmp, path)
    fd, meta_tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{meta.name}.", suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as out:
            _write_and_sync(out, sidecar)
        os.replace(meta_tmp, meta)
    except BaseException:
        Path(meta_tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return True


def _fsync_dir(folder: Path) -> None:
    # Makes the renames themselves durable, not just the files' contents.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
