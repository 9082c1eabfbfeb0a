"""Archived assets as the browser reads them: streamed from the store, with byte ranges.

A video element seeks with ``Range: bytes=N-``; the answer is a 206 with ``Content-Range``. The
store port reads whole objects, so a range skips the bytes before it while streaming (no more
than one chunk in memory); a ``read`` from an offset in the port would make seeks in long
videos cheaper.

Archived objects come from providers, so they are never trusted as active content on the
console's origin: only images (not SVG), video and audio are shown inline, everything else is
a download, and every answer carries ``nosniff`` and a sandboxing CSP.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from starlette.responses import Response, StreamingResponse

from receiver.ledger import AssetRecord
from receiver.store import Store

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_INLINE = re.compile(r"(image/(png|jpeg|gif|webp|avif)|video/[a-z0-9.+-]+|audio/[a-z0-9.+-]+)")


def preview_kind(content_type: str | None) -> str | None:
    """ "image", "video" or "audio" when the console may show the asset inline, else None."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if not _INLINE.fullmatch(media):
        return None
    return media.split("/", 1)[0]


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """The single byte range asked for, as (first, last) inclusive; None for the whole object;
    "unsatisfiable" when it lies outside it. Several ranges are answered with the whole object
    (RFC 9110 lets a server ignore Range)."""
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    first_raw, last_raw = match.groups()
    if not first_raw:  # "bytes=-N": the last N bytes
        length = int(last_raw)
        if length == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - length), size - 1
    first = int(first_raw)
    last = min(int(last_raw), size - 1) if last_raw else size - 1
    if first >= size or last < first:
        return "unsatisfiable"
    return first, last


def _filename(name: str) -> str:
    ascii_name = name.encode("ascii", "replace").decode().replace("?", "_").replace('"', "_")
    return f"filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"


def asset_response(
    store: Store, asset: AssetRecord, range_header: str | None, *, download: bool
) -> Response:
    size = asset.size or 0
    content_type = asset.content_type or "application/octet-stream"
    inline = not download and preview_kind(content_type) is not None
    headers = {
        "accept-ranges": "bytes",
        "content-disposition": ("inline; " if inline else "attachment; ") + _filename(asset.name),
        "x-content-type-options": "nosniff",
        "content-security-policy": "sandbox; default-src 'none'",
        "cache-control": "private, max-age=300",
    }
    if asset.sha256:
        headers["etag"] = f'"{asset.sha256}"'
        headers["x-content-sha256"] = asset.sha256
    wanted = parse_range(range_header, size)
    if wanted == "unsatisfiable":
        return Response(status_code=416, headers={**headers, "content-range": f"bytes */{size}"})
    if wanted is None:
        headers["content-length"] = str(size)
        return StreamingResponse(store.read(asset.key), media_type=content_type, headers=headers)
    assert isinstance(wanted, tuple)
    first, last = wanted
    headers["content-length"] = str(last - first + 1)
    headers["content-range"] = f"bytes {first}-{last}/{size}"
    return StreamingResponse(
        store.read(asset.key, first, last),  # only the range: a seek near the end stays cheap
        status_code=206,
        media_type=content_type,
        headers=headers,
    )
