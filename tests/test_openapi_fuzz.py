"""Schemathesis against our own OpenAPI document: no generated request ends in a 5xx.

Driven through schemathesis's Hypothesis strategies directly: its pytest plugin does not
support the pytest version we run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings

from receiver.app import build_parts, create_app
from tests.conftest import make_settings

EXAMPLES = 40


def test_no_generated_request_causes_a_server_error(tmp_path: Path) -> None:
    parts = build_parts(make_settings(tmp_path))
    app = create_app(parts)
    parts.db.start()  # the ASGI test client runs no lifespan
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 8
        statuses: set[int] = set()
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Any) -> None:
                response = case.call(headers={"authorization": "Bearer operator-token"})
                statuses.add(response.status_code)
                assert response.status_code < 500, (
                    case.method,
                    case.formatted_path,
                    response.text[:500],
                )

            check()
    finally:
        parts.db.stop()
    # The fuzzing reached real answers, not only one kind of refusal.
    assert {200, 401, 422} <= statuses
