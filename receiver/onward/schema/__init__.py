"""The documented, versioned JSON Schema of the events receiver sends onward (events.v1.json,
JSON Schema 2020-12, with an example of every event type). The file is the documentation
applications read; tests validate every event the ledger builds against it."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from receiver.ledger.events import SCHEMA_VERSION


def event_schema() -> dict[str, Any]:
    """The schema of the current SCHEMA_VERSION."""
    text = resources.files(__package__).joinpath(f"events.v{SCHEMA_VERSION}.json").read_text()
    value: dict[str, Any] = json.loads(text)
    return value
