"""The domain: jobs, the events that move them, the state machine and deadline arithmetic.

Pure code: no I/O, no clock. Every function that needs "now" takes it as an argument.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

Clock = Callable[[], datetime]  # injected time (invariant 5): tests pass a fake one


class EventKind(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    PROGRESS = "progress"  # the provider says it is still working (Fliki sends its status shape)


class JobState(enum.StrEnum):
    TRACKING = "tracking"  # registered for polling, the provider has not finished yet
    PROCESSING = "processing"  # the provider told us it is still working
    QUEUED = "queued"  # completed by the provider; archive tasks pending
    ARCHIVED = "archived"  # every output copied and verified
    FAILED = "failed"  # the provider failed the job
    EXPIRED = "expired"  # the link died before we copied it
    DEAD = "dead"  # we kept failing to copy it for another reason (dead-lettered)
    FORGOTTEN = "forgotten"  # erased on request (`receiver forget`): only a tombstone remains


FINAL_STATES = frozenset({JobState.ARCHIVED, JobState.FAILED, JobState.EXPIRED, JobState.DEAD})


class DeliveryOutcome(enum.StrEnum):
    """What one delivery (webhook or poll result) did to its job. Stored with the delivery."""

    ACCEPTED = "accepted"  # new information: job created or moved, tasks queued if completed
    DUPLICATE = "duplicate"  # the same information again (redelivery, replayed webhook id)
    REFRESHED = "refreshed"  # same job, new download links while not yet archived: tasks use them
    IGNORED = "ignored"  # contradicts a final state (e.g. failed after archived); kept as history
    FORGOTTEN = "forgotten"  # the job was erased on request: acknowledged, nothing recorded


@dataclass(frozen=True)
class Output:
    """One file the provider produced: where to fetch it and what to call it."""

    url: str
    name: str
    content_type: str | None = None


@dataclass(frozen=True)
class JobEvent:
    """A provider-neutral event, parsed from a webhook or a status poll."""

    provider: str
    job_id: str
    kind: EventKind
    job_type: str | None = None
    outputs: tuple[Output, ...] = ()
    completed_at: datetime | None = None  # provider's completion time, when it says
    failed_at: datetime | None = None
    error: str | None = None
    credits_refunded: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """What recording an event does: the delivery's outcome and the job's next state."""

    outcome: DeliveryOutcome
    state: JobState
    queue_outputs: bool = False  # create archive tasks for the event's outputs
    refresh_outputs: bool = False  # replace pending tasks' links with the event's


def decide(
    current: JobState | None,
    current_urls: tuple[str, ...],
    event: JobEvent,
    *,
    seen_id: bool,
    forgotten: bool = False,
) -> Decision:
    """The job state machine: one place that says what an event does to a job.

    `current` is None for a job we have never seen; `current_urls` are the links already recorded
    for it; `seen_id` is true when this delivery's id was recorded before (a replay);
    `forgotten` is true when the job was erased on request and a tombstone stands for it.
    """
    if forgotten:
        # Erasure outranks everything: a redelivery must neither re-archive the job nor keep
        # its payload. The sender gets its acknowledgment and stops retrying.
        return Decision(DeliveryOutcome.FORGOTTEN, JobState.FORGOTTEN)
    if seen_id and current is not None:
        return Decision(DeliveryOutcome.DUPLICATE, current)
    if event.kind is EventKind.PROGRESS:
        if current is None or current in (JobState.TRACKING, JobState.PROCESSING):
            return Decision(DeliveryOutcome.ACCEPTED, JobState.PROCESSING)
        # Progress after completion or failure is stale news.
        return Decision(DeliveryOutcome.IGNORED, current)
    if event.kind is EventKind.FAILED:
        if current is None or current in (JobState.TRACKING, JobState.PROCESSING):
            return Decision(DeliveryOutcome.ACCEPTED, JobState.FAILED)
        if current is JobState.FAILED:
            return Decision(DeliveryOutcome.DUPLICATE, current)
        # Failed after completed: the output exists (or existed); keep copying or keep the copy.
        return Decision(DeliveryOutcome.IGNORED, current)
    # COMPLETED
    urls = tuple(o.url for o in event.outputs)
    if current is None or current in (JobState.TRACKING, JobState.PROCESSING, JobState.FAILED):
        # Completed after failed: the provider changed its mind; the output is what matters.
        return Decision(DeliveryOutcome.ACCEPTED, JobState.QUEUED, queue_outputs=True)
    if urls == current_urls:
        return Decision(DeliveryOutcome.DUPLICATE, current)
    if current is JobState.QUEUED:
        # A fresher link for work still pending: use it (the old one may expire sooner).
        return Decision(DeliveryOutcome.REFRESHED, current, refresh_outputs=True)
    # Archived, expired or dead: never re-archive; the delivery stays in the history.
    return Decision(DeliveryOutcome.IGNORED, current)


# --- what a state change implies: settling, manifests, completion time ------------------------

#: The task number of a job's manifest-only task: a job the provider failed has no outputs to
#: copy, but its manifest is still written (so `receiver reindex` restores it). The archiver
#: reads such a task as "write this job's manifest", not as an output.
MANIFEST_TASK = -1
#: How long a manifest-only task may wait (it has no provider deadline of its own).
MANIFEST_TASK_WINDOW = timedelta(hours=24)
#: The task whose lease rewrites an ended job's manifest: an archived job's first asset task,
#: a failed job's manifest-only task (the archiver rewrites the manifest, copies nothing).
_MANIFEST_REWRITE = {JobState.ARCHIVED: 0, JobState.FAILED: MANIFEST_TASK}


@dataclass(frozen=True)
class ManifestWork:
    """The manifest task a recorded delivery needs: a new manifest-only task for a job that just
    failed (`new`), or task `n` handed back so the archiver rewrites an ended job's manifest."""

    n: int
    new: bool


def manifest_work(current: JobState | None, decision: Decision) -> ManifestWork | None:
    """What a delivery does to the job's manifest (both ledgers apply it in the same write)."""
    if decision.outcome is DeliveryOutcome.ACCEPTED and decision.state is JobState.FAILED:
        # Nothing to copy, but the job's manifest is still written (reindex restores it).
        return ManifestWork(MANIFEST_TASK, new=True)
    if current in _MANIFEST_REWRITE and not decision.queue_outputs:
        # The manifest of an ended job must list this delivery too. Outputs queued now (a
        # completion after a failure) write their manifest when copied.
        return ManifestWork(_MANIFEST_REWRITE[current], new=False)
    return None


def completion_time(event: JobEvent, received_at: datetime) -> datetime:
    """When the provider finished: its own time, or (Fliki gives none) our receipt of it."""
    return event.completed_at or received_at


#: The states an asset can end in; "pending" is the only other. "invalid": the source served
#: something that is not the media it claimed to be (an error page, a truncated file), kept as
#: evidence, never reported as archived.
ASSET_FINAL_STATES = frozenset({"archived", "expired", "dead", "invalid"})


def settle(current: JobState, asset_states: Iterable[str]) -> JobState | None:
    """After an asset ends, the job ends too once no asset is pending: archived if all were,
    else expired if any link expired, else dead (an invalid output included). None: the job's
    state does not change."""
    states = list(asset_states)
    if current in FINAL_STATES or "pending" in states:
        return None
    if all(s == "archived" for s in states):
        return JobState.ARCHIVED
    return JobState.EXPIRED if "expired" in states else JobState.DEAD


def settled_error(errors: Iterable[str | None], previous: str | None) -> str | None:
    """The error an ended job shows: its assets' errors in order, else the one it had."""
    return "; ".join(e for e in errors if e) or previous


# --- onward events: what receiver tells the team's application ------------------------------


class EventType(enum.StrEnum):
    """The events receiver delivers onward (receiver/onward); each written with its state change."""

    ASSET_ARCHIVED = "asset.archived"  # one output copied, verified and recorded
    ASSET_INVALID = "asset.invalid"  # one output ended as not the media it claimed to be
    JOB_ARCHIVED = "job.archived"  # every output archived
    JOB_FAILED = "job.failed"  # the provider failed the job
    JOB_EXPIRED = "job.expired"  # a link died before we copied it
    JOB_DEAD = "job.dead"  # we gave up copying for another reason


_ENDED_EVENT = {
    JobState.ARCHIVED: EventType.JOB_ARCHIVED,
    JobState.FAILED: EventType.JOB_FAILED,
    JobState.EXPIRED: EventType.JOB_EXPIRED,
    JobState.DEAD: EventType.JOB_DEAD,
}


def asset_event(before: str | None, after: str) -> EventType | None:
    """The event an asset's change emits: only its first move to archived or to invalid (a
    second record of the same copy, by an attempt that died before its ack, says nothing new)."""
    if after == before:
        return None
    return {"archived": EventType.ASSET_ARCHIVED, "invalid": EventType.ASSET_INVALID}.get(after)


def ended_event(new_state: JobState | None) -> EventType | None:
    """The event a job's move into `new_state` emits (None: the move emits none)."""
    return _ENDED_EVENT.get(new_state) if new_state is not None else None


# --- deadlines -------------------------------------------------------------------------------


def signed_url_expiry(url: str) -> datetime | None:
    """The expiry a signed URL carries in its query string, if any.

    AWS SigV4 (and R2): X-Amz-Date + X-Amz-Expires. Google V4: X-Goog-Date + X-Goog-Expires.
    CloudFront and similar: Expires=<unix seconds>. Unparseable values count as no expiry.
    """
    query = {k.lower(): v for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True)}
    for prefix in ("x-amz-", "x-goog-"):
        date, expires = query.get(prefix + "date"), query.get(prefix + "expires")
        if date and expires:
            try:
                start = datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
                return start + timedelta(seconds=int(expires))
            except (ValueError, OverflowError):
                return None
    expires = query.get("expires")
    if expires and expires.isdigit():
        try:
            return datetime.fromtimestamp(int(expires), tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def compute_deadline(
    *,
    window: timedelta | None,
    window_start: datetime,
    url: str,
    margin: timedelta,
) -> datetime:
    """deadline = min(provider window from its start, the signed URL's own expiry) - margin.

    With neither a window nor a signed expiry there is no known limit; we still want the copy
    soon, so such outputs get a nominal 24 h window and sort behind anything more urgent.
    """
    try:
        candidates = [window_start + (window if window is not None else timedelta(hours=24))]
    except OverflowError:  # a completion time near year 9999: only the link's expiry limits it
        candidates = [datetime.max.replace(tzinfo=UTC)]
    expiry = signed_url_expiry(url)
    if expiry is not None:
        candidates.append(expiry)
    return min(candidates) - margin


# Letters, digits, "_", "." and "-" survive in object keys; anything else could change a path.
_UNSAFE_IN_NAME = re.compile(r"[^\w.-]")


# Every store must accept every key: a path segment of at most 255 bytes (local file systems),
# a whole key of at most 1024 bytes (S3). Our segments stay well inside: the provider's name,
# the date, the job id (at most `MAX_SEGMENT_BYTES`) and the output's name (the same).
MAX_SEGMENT_BYTES = 200
MAX_KEY_BYTES = 1024
_DIGEST_CHARS = 16
# Names the stores keep for themselves beside each object (the local store's metadata sidecar)
# or that the archive writes beside each job's outputs.
RESERVED_SUFFIXES = (".meta.json",)
#: The job's manifest, beside its assets (receiver/archive/manifest.py writes it).
MANIFEST_NAME = "manifest.json"
RESERVED_NAMES = frozenset({MANIFEST_NAME})


def manifest_key(asset_key: str) -> str:
    """The key of the manifest beside an asset's key."""
    return f"{asset_key.rsplit('/', 1)[0]}/{MANIFEST_NAME}"


def fit_segment(text: str, *, keep_suffix: bool = False) -> str:
    """`text` (already path-safe ASCII or UTF-8) made to fit in `MAX_SEGMENT_BYTES` bytes.

    A text that fits is returned as it is; a longer one becomes a readable prefix, "~", and a
    digest of the whole text (deterministic: a retried copy lands on the same key; distinct texts
    stay distinct). With `keep_suffix`, a short extension (".mp4") survives at the end.
    """
    if len(text.encode()) <= MAX_SEGMENT_BYTES:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_CHARS]
    stem, dot, ext = text.rpartition(".")
    suffix = f".{ext}" if keep_suffix and dot and stem and len(ext.encode()) <= 16 else ""
    room = MAX_SEGMENT_BYTES - len(digest) - 1 - len(suffix.encode())
    prefix = text.encode()[:room].decode("utf-8", "ignore")
    # Never end the prefix inside a percent escape ("%2" would read as another character).
    cut = prefix.rfind("%", max(0, len(prefix) - 2))
    if cut != -1:
        prefix = prefix[:cut]
    return f"{prefix}~{digest}{suffix}"


def fit_name(name: str) -> str:
    """An output name every store accepts: not reserved, not hidden, at most 200 bytes."""
    name = name.lstrip(".")
    lowered = name.lower()
    if lowered in RESERVED_NAMES or lowered.endswith(RESERVED_SUFFIXES):
        # "x.meta.json" is the local store's sidecar of "x": keep it readable, not reserved.
        stem, _, ext = name.rpartition(".")
        name = f"{stem}_{ext}"
    return fit_segment(name, keep_suffix=True)


def source_name(url: str) -> str:
    """The output's name as the provider gave it: the URL's last path segment ("" if none).
    Kept in the object's metadata and the manifest, since the key may carry a fitted name."""
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1])


def output_name(url: str, index: int, content_type: str | None) -> str:
    """A safe file name for an output: the URL's last path segment, else output-N.ext."""
    last = urlsplit(url).path.rsplit("/", 1)[-1]
    safe = fit_name(_UNSAFE_IN_NAME.sub("", last).lstrip("."))
    if safe:
        return safe
    return f"output-{index}{_extension(content_type)}"


_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "video/mp4": ".mp4",
    "audio/wav": ".wav",
    "audio/mpeg": ".mp3",
}


def _extension(content_type: str | None) -> str:
    return _EXTENSIONS.get((content_type or "").split(";")[0].strip().lower(), "")


def job_folder(job_id: str) -> str:
    """The key segment of a job's folder (`archive_key`'s fifth segment), from its id alone."""
    # Percent-encoding keeps distinct job ids distinct ("a/b" and "a:b" must not share a
    # folder) and the key ASCII; "." and ".." would be path segments, so they are encoded too.
    safe_job = quote(job_id, safe="")
    if set(safe_job) <= {"."}:
        safe_job = safe_job.replace(".", "%2E")
    # Long ids (percent-encoding triples non-ASCII bytes) keep a readable prefix plus a digest;
    # the id itself stays in the ledger, the object's metadata and the manifest.
    return fit_segment(safe_job)


def job_prefix(*, prefix: str, provider: str, job_id: str, completed_at: datetime) -> str:
    """The folder of a job's objects: `[prefix/]provider/YYYY/MM/DD/<job folder>`."""
    day = completed_at.astimezone(UTC)
    date = [f"{day.year:04d}", f"{day.month:02d}", f"{day.day:02d}"]  # strftime is 3x slower
    parts = [provider, *date, job_folder(job_id)]
    return "/".join([prefix.strip("/"), *parts] if prefix.strip("/") else parts)


def archive_key(
    *, prefix: str, provider: str, job_id: str, completed_at: datetime, name: str
) -> str:
    """Deterministic object key: a retried copy lands on the same key."""
    folder = job_prefix(prefix=prefix, provider=provider, job_id=job_id, completed_at=completed_at)
    return f"{folder}/{fit_name(name)}"


def backoff_delay(
    attempt: int, rng: Callable[[], float], *, base: float = 5.0, cap: float = 900.0
) -> float:
    """Exponential backoff with jitter: base·2^(attempt-1), capped, scaled into [50 %, 100 %]."""
    exp = min(cap, base * 2 ** max(0, min(attempt - 1, 30)))
    return float(exp * (0.5 + rng() / 2))


# --- secrets in text -------------------------------------------------------------------------

# The one scrubbing rule for text we did not write ourselves: error bodies and messages from
# download sources, provider status APIs and onward endpoints, exception messages, log lines. It
# removes the VALUE of every signing parameter, header or element, in every form sources quote
# them, and keeps the name and everything around it (status, error code, message, request id).
#
# Schemes covered, and the names that carry their secrets:
#   AWS SigV2 (S3 query auth)  AWSAccessKeyId, Signature (Expires is harmless)
#   AWS SigV4, Cloudflare R2   every x-amz-* (X-Amz-Credential, -Signature, -Security-Token...),
#                              and the Authorization header's Credential= and Signature=
#   S3 / R2 error bodies       <AWSAccessKeyId>, <StringToSign>, <SignatureProvided>,
#                              <StringToSignBytes>, <CanonicalRequest>, <CanonicalRequestBytes>
#   GCS V2 / V4                GoogleAccessId, Signature, every x-goog-*
#   CloudFront                 Signature, Key-Pair-Id, Policy; signed cookies CloudFront-*
#   ImageKit                   every ik-* (ik-s, ik-t)
#   Azure SAS, generic APIs    sig, token, credential, key, secret, password, ...
# Whole families (x-amz-*, x-goog-*, ik-*, cloudfront-*) are scrubbed even where a member is
# harmless (X-Amz-Date): a new member is then covered before anyone lists it.
SECRET_PARAMETERS = (
    "awsaccesskeyid",
    "signatureprovided",
    "stringtosign",
    "stringtosignbytes",
    "canonicalrequest",
    "canonicalrequestbytes",
    "googleaccessid",
    "signature",
    "credential",
    "key-pair-id",
    "policy",
    "sig",
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "security_token",
    "session_token",
    "client_secret",
    "api_key",
    "apikey",
    "api-key",
    "x-api-key",
    "key",
    "secret",
    "password",
)
SECRET_PREFIXES = ("x-amz-", "x-goog-", "ik-", "cloudfront-")
# Headers whose whole value is a credential (SigV2's "AWS id:signature", cookies).
SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie")
# As an XML element, <Key> is S3's object key (NoSuchKey): useful, and not a secret.
_NOT_SECRET_ELEMENTS = frozenset({"key"})


def _names(names: Iterable[str]) -> str:
    """One secret name, case-insensitively, as a whole name ("tokens" or "ExpiredToken" is not
    "token"; "Signature" in "SignatureDoesNotMatch" is not a parameter)."""
    families = "|".join(re.escape(p) + r"[\w-]+" for p in SECRET_PREFIXES)
    # After a percent-encoded "?" or "&" too: a signed URL quoted inside another URL's query.
    start = r"(?:(?<![\w-])|(?<=%3F)|(?<=%26))"
    return rf"{start}(?:{families}|{'|'.join(re.escape(n) for n in names)})(?![\w-])"


# `name=value`, `name: value`, `"name": "value"`, `\"name\": \"value\"` (JSON inside JSON) and
# `name%3Dvalue` (a URL quoted inside a URL's query). A quoted value runs to its closing quote (or
# to the end of the text, which our truncation may have cut), an unquoted one to the next
# separator. "Bearer"/"Basic" before a value is kept, the value is not.
_SECRET_FIELD = re.compile(
    rf"(?i)({_names(SECRET_PARAMETERS)})"
    r"(\\?[\"']?\s*(?:[=:]|%3D)\s*(?:(?:bearer|basic)\s+)?(?:\\?([\"']))?)"
    r"((?(3)[^\"'\r\n]*|[^&\s\"'<>,;]+))"
)
# <SignatureProvided>value</SignatureProvided>: the value runs to the next tag, or to the end of
# the text when the body was cut before the closing tag.
_SECRET_ELEMENT = re.compile(
    rf"(?i)(<{_names(n for n in SECRET_PARAMETERS if n not in _NOT_SECRET_ELEMENTS)}"
    r"(?:\s[^<>]*)?>)[^<]+"
)
# Authorization: ..., Cookie: ...: the rest of the header line.
_SECRET_HEADER = re.compile(
    rf"(?i)({_names(SECRET_HEADERS)}\\?[\"']?\s*[=:]\s*\\?[\"']?)[^\r\n\"'<>,&]+"
)
# HTML: <input type="hidden" name="token" value="..."> and <meta name="..." content="...">.
_HTML_TAG = re.compile(r"(?i)<(?:input|meta|param)\b[^<>]*>?")
_HTML_SECRET_NAME = re.compile(
    rf"(?i)\bname\s*=\s*[\"']?{_names(SECRET_PARAMETERS + SECRET_HEADERS)}"
)
_HTML_VALUE = re.compile(r"(?i)(\b(?:value|content)\s*=\s*)(?:\"[^\"]*\"?|'[^']*'?|[^\s>]+)")
# A query string in running text: "?" then something with "=" or "&" ("<?xml" and "expired?"
# are not queries).
_QUERY_IN_TEXT = re.compile(r"\?[^\s\"'<>=&]*[=&][^\s\"'<>]*")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
# Every rule above needs one of these: most log strings (event names, ids) have none of them.
_MAY_HOLD_A_SECRET = re.compile(r"(?i)[=:?<%]|bearer|basic")


def _scrub_html_tag(match: re.Match[str]) -> str:
    tag = match.group()
    if _HTML_SECRET_NAME.search(tag) is None:
        return tag
    return _HTML_VALUE.sub(lambda m: f'{m.group(1)}"…"', tag)


def scrub_secrets(text: str) -> str:
    """`text` without query strings or any signing parameter's value (the one scrubbing rule for
    errors, logs and the audit API; URLs we show whole go through `fetch.redact_url` instead).

    Scrub a text whole, then cut it: a value cut by a limit is still removed (its name is there),
    but a short excerpt of a token may no longer look like one (a Bearer token, a caller's own
    key). Applying it twice changes nothing."""
    if _MAY_HOLD_A_SECRET.search(text) is None:
        return text
    text = _SECRET_ELEMENT.sub(lambda m: f"{m.group(1)}…", text)
    text = _HTML_TAG.sub(_scrub_html_tag, text)
    text = _SECRET_HEADER.sub(lambda m: f"{m.group(1)}…", text)
    text = _SECRET_FIELD.sub(lambda m: f"{m.group(1)}{m.group(2)}…", text)
    text = _QUERY_IN_TEXT.sub("?…", text)
    return _BEARER.sub(lambda m: f"{m.group(1)} …", text)
