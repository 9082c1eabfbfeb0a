"""The one rule at the edge: what a webhook, a status answer or an operator call may carry.

Everything that passes here can be stored (SQLite INTEGER is 64-bit signed; text is UTF-8),
archived (object keys, `manifest.json`), rendered by the audit API (strict JSON: no NaN) and
used in deadline arithmetic (dates). Everything else is refused with a 4xx that names the rule,
before anything is written. Webhooks (`receiver.ingest.routes`), status answers
(`receiver.polling.status`), `POST /jobs` (`receiver.polling.registration`) and the audit API's
`?limit=` / `?cursor=` all use these functions.

The rules:
- JSON only as RFC 8259 says: no `NaN` / `Infinity`, numbers finite with magnitude below 2^63
  (integers and floats alike), integers of at most 19 digits (Python refuses > 4300 digits with
  a ValueError; we refuse much earlier);
- nesting at most `MAX_DEPTH` containers deep; strings at most `MAX_STRING_CHARS` characters,
  object keys at most `MAX_KEY_CHARS`, no lone surrogates (not encodable as UTF-8);
- dates between `EARLIEST` and `LATEST` after normalising to UTC (a time without an offset is
  UTC);
- job ids (every provider): 1..`MAX_JOB_ID_CHARS` characters, no control, format, surrogate or
  unassigned characters, no `/` or `\\`, and not `.` or `..` (ids become path segments of object
  keys and of FLORA / Vivid Flow status URLs). Provider ids documented so far (UUIDs, Fliki file
  ids, FLORA run ids) all fit.
"""

from __future__ import annotations

import json
import unicodedata
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

from receiver.errors import InvalidPayload, MalformedJson

MAX_DEPTH = 32
MAX_STRING_CHARS = 65_536
MAX_KEY_CHARS = 256
MAX_JOB_ID_CHARS = 128
MAX_DELIVERY_ID_CHARS = 256
# SQLite's INTEGER is a signed 64-bit value; anything at or past it overflows on insert.
MAX_INT = 2**63 - 1
MAX_INT_DIGITS = 19
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)


class _Refused(ValueError):
    """A JSON value outside the rule; `rule` names it, `where` is a JSON-pointer-ish path."""

    def __init__(self, rule: str, problem: str, where: str = "(body)") -> None:
        super().__init__(problem)
        self.rule = rule
        self.problem = problem
        self.where = where


def _parse_int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > MAX_INT_DIGITS:
        raise _Refused(
            "number_magnitude", f"an integer of {len(digits)} digits (limit: |n| < 2^63)"
        )
    value = int(text)
    if abs(value) > MAX_INT:
        raise _Refused("number_magnitude", "an integer beyond 64 bits (limit: |n| < 2^63)")
    return value


def _parse_float(text: str) -> float:
    if len(text) > 64:
        raise _Refused("number_magnitude", f"a number written with {len(text)} characters")
    value = float(text)
    if not abs(value) <= MAX_INT:  # also catches inf (1e999) and nan
        raise _Refused("number_magnitude", "a number beyond 2^63 in magnitude")
    return value


def _parse_constant(name: str) -> Any:
    raise _Refused("number_finite", f"{name} is not JSON (numbers must be finite)")


def load_json(body: bytes) -> Any:
    """Decode a request body under the rule: MalformedJson (400) or InvalidPayload (422)."""
    try:
        value = json.loads(
            body,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except _Refused as exc:
        raise _rejection(exc) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedJson("the body is not valid JSON", {"error": str(exc)}) from None
    except RecursionError:
        raise _rejection(_Refused("max_depth", f"nested deeper than {MAX_DEPTH} levels")) from None
    check_value(value)
    return value


def check_value(value: Any, where: str = "(body)") -> None:
    """Refuse (InvalidPayload, 422) a decoded JSON value outside the rule. Iterative: a deep
    value cannot exhaust the stack here."""
    try:
        _walk(value, where)
    except _Refused as exc:
        raise _rejection(exc) from None


# Where a value sits in the body: the root's name, or (its container's place, key or index).
# Built as the walk goes and spelt out only when a refusal names it: a body that passes (nearly
# every one) costs no path strings.
_Place = str | tuple["_Place", str | int]


def _walk(root: Any, where: str) -> None:
    stack: list[tuple[Any, _Place, int]] = [(root, where, 0)]
    while stack:
        value, place, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                raise _Refused("max_depth", f"nested deeper than {MAX_DEPTH} levels", _at(place))
            if isinstance(value, dict):
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise _Refused("key_type", "object keys must be strings", _at(place))
                    inner = (place, key)
                    _check_string(key, MAX_KEY_CHARS, inner, "key_length")
                    stack.append((item, inner, depth + 1))
            else:
                for n, item in enumerate(value):
                    stack.append((item, (place, n), depth + 1))
        elif isinstance(value, str):
            _check_string(value, MAX_STRING_CHARS, place, "string_length")
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if abs(value) > MAX_INT:
                raise _Refused("number_magnitude", "an integer beyond 64 bits", _at(place))
        elif isinstance(value, float):
            if not abs(value) <= MAX_INT:
                raise _Refused("number_finite", "numbers must be finite and below 2^63", _at(place))
        else:
            raise _Refused("json_type", f"{type(value).__name__} is not a JSON value", _at(place))


def _at(place: _Place) -> str:
    """A place as the 422's field path: `(body).outputs[0].url`."""
    steps: list[str] = []
    while isinstance(place, tuple):
        place, step = place
        steps.append(f"[{step}]" if isinstance(step, int) else f".{_shown_key(step)}")
    return place + "".join(reversed(steps))


def _shown_key(key: str) -> str:
    """A key as the 422's field path names it: its first 40 characters, with anything that is
    not valid Unicode text (a lone surrogate) escaped, so the answer itself can be encoded."""
    return key[:40].encode("utf-8", "backslashreplace").decode("utf-8")


def _check_string(text: str, limit: int, place: _Place, rule: str) -> None:
    if len(text) > limit:
        raise _Refused(rule, f"{len(text)} characters (limit {limit})", _at(place))
    if text.isascii():  # no surrogate, and no copy of the text to find that out
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Refused("unicode", "a lone surrogate (not valid Unicode text)", _at(place)) from None


def _rejection(exc: _Refused) -> InvalidPayload:
    return InvalidPayload(
        f"the payload breaks the input rule {exc.rule!r}: {exc.problem}",
        [{"field": exc.where, "problem": exc.problem, "rule": exc.rule}],
    )


# --- dates -----------------------------------------------------------------------------------


def bounded_utc(value: datetime) -> datetime:
    """A provider's time as aware UTC within [EARLIEST, LATEST); ValueError otherwise (pydantic
    reports it as a 422 on the field)."""
    if value.tzinfo is None:
        # Providers document UTC ("...Z"); a time without an offset means the same.
        value = value.replace(tzinfo=UTC)
    try:
        value = value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError(
            f"date outside {EARLIEST.year}..{LATEST.year - 1} (rule 'date_range')"
        ) from None
    if not EARLIEST <= value < LATEST:
        raise ValueError(f"date outside {EARLIEST.year}..{LATEST.year - 1} (rule 'date_range')")
    return value


# --- ids -------------------------------------------------------------------------------------


def job_id_problem(job_id: str) -> str | None:
    """Why `job_id` breaks the job-id grammar (None: it fits)."""
    if not job_id:
        return "empty"
    if len(job_id) > MAX_JOB_ID_CHARS:
        return f"{len(job_id)} characters (limit {MAX_JOB_ID_CHARS})"
    if job_id in (".", ".."):
        return "'.' and '..' are path segments, not ids"
    if "/" in job_id or "\\" in job_id:
        return "'/' and '\\' are not allowed"
    for char in job_id:
        if unicodedata.category(char).startswith("C"):
            return f"control, format or unassigned character U+{ord(char):04X}"
    return None


def check_job_id(job_id: str, field: str = "job_id") -> str:
    problem = job_id_problem(job_id)
    if problem is not None:
        raise InvalidPayload(
            f"invalid job id: {problem} (rule 'job_id')",
            [{"field": field, "problem": problem, "rule": "job_id"}],
        )
    return job_id


def path_segment(value: str) -> str:
    """`value` as one percent-encoded URL path segment; ValueError for a dot segment or an
    empty one, which a client or server would resolve to another path."""
    if value in ("", ".", ".."):
        raise ValueError(f"{value!r} cannot be a URL path segment")
    return quote(value, safe="")


def is_safe_path(path: str) -> bool:
    """True when no segment of `path` is empty, `.` or `..`, raw or percent-encoded."""
    segments = path.split("/")[1:] if path.startswith("/") else path.split("/")
    return all(unquote(s) not in ("", ".", "..") for s in segments)


def check_delivery_id(delivery_id: str | None) -> str | None:
    """The Standard Webhooks `webhook-id` header: stored and shown, so bounded and printable."""
    if delivery_id is None:
        return None
    if len(delivery_id) > MAX_DELIVERY_ID_CHARS or any(
        unicodedata.category(c).startswith("C") for c in delivery_id
    ):
        raise InvalidPayload(
            "invalid webhook-id header (rule 'delivery_id')",
            [
                {
                    "field": "webhook-id",
                    "problem": f"1..{MAX_DELIVERY_ID_CHARS} printable characters",
                    "rule": "delivery_id",
                }
            ],
        )
    return delivery_id


def check_limit(raw: str, maximum: int, field: str = "limit") -> int:
    """A query-string integer 1..maximum (digits counted before int(): no 4300-digit parse)."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 6 or not 1 <= int(raw) <= maximum:
        raise InvalidPayload(
            f"invalid {field}", [{"field": field, "problem": f"an integer 1..{maximum}"}]
        )
    return int(raw)
