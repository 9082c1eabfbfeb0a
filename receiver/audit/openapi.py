"""The OpenAPI 3.1 document served at `/openapi.json`: webhook, tracking and audit endpoints.

Payload schemas come from the same pydantic models that validate requests, so the document
cannot drift from what the code accepts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter

from receiver.domain import JobState
from receiver.providers import apex, fliki

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {},
            },
        }
    },
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _model(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(ref_template="#/components/schemas/{model}")


WEBHOOK_RESPONSES = {
    "202": _json({"$ref": "#/components/schemas/Ack"}, "Recorded: new information"),
    "200": _json({"$ref": "#/components/schemas/Ack"}, "Recorded: a duplicate or stale event"),
    "400": _error("Malformed JSON"),
    "401": _error("Authentication failed"),
    "404": _error("Unknown provider"),
    "413": _error("Body too large"),
    "408": _error("The body did not arrive within RECEIVER_BODY_TIMEOUT_SECONDS"),
    "415": _error("Not application/json"),
    "422": _error("Schema violation, unknown event, or outside the edge rule (README)"),
    "503": _error("The ledger cannot be written right now; nothing was acknowledged: retry"),
}

OPERATOR: list[dict[str, list[str]]] = [{"operatorToken": []}]
PATH_PARAMS = [
    {"name": "provider", "in": "path", "required": True, "schema": {"type": "string"}},
    {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}},
]


def document(tracking_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    apex_payload = TypeAdapter(apex.Completed | apex.Failed).json_schema(
        ref_template="#/components/schemas/{model}"
    )
    defs = apex_payload.pop("$defs", {})
    fliki_payload = _model(fliki.Status)
    defs.update(fliki_payload.pop("$defs", {}))
    webhook = {
        "summary": "Provider completion callback",
        "description": "Standard Webhooks signature headers, or the provider's path token.",
        "parameters": [
            {"name": n, "in": "header", "required": False, "schema": {"type": "string"}}
            for n in ("webhook-id", "webhook-timestamp", "webhook-signature")
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"oneOf": [apex_payload, fliki_payload]},
                }
            },
        },
        "responses": WEBHOOK_RESPONSES,
    }
    token_param = {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}}
    provider_param = {
        "name": "provider",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": ["apex", "fliki"]},
    }
    paths: dict[str, Any] = {
        "/webhooks/{provider}": {
            "post": {**webhook, "parameters": [provider_param, *webhook["parameters"]]}
        },
        "/webhooks/{provider}/{token}": {
            "post": {**webhook, "parameters": [provider_param, token_param]}
        },
        "/jobs": {
            "get": {
                "summary": "List jobs, newest first",
                "security": OPERATOR,
                "parameters": [
                    {"name": n, "in": "query", "required": False, "schema": s}
                    for n, s in (
                        ("provider", {"type": "string"}),
                        ("state", {"type": "string", "enum": [s.value for s in JobState]}),
                        ("type", {"type": "string"}),
                        ("since", {"type": "string", "format": "date-time"}),
                        ("until", {"type": "string", "format": "date-time"}),
                        ("cursor", {"type": "string"}),
                        ("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
                    )
                ],
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/JobPage"}, "A page of jobs"),
                    "401": _error("Missing or invalid operator token"),
                    "422": _error("Invalid filter"),
                },
            },
        },
        "/jobs/{provider}/{job_id}": {
            "get": {
                "summary": "One job: deliveries, assets, deadline and outcome",
                "security": OPERATOR,
                "parameters": PATH_PARAMS,
                "responses": {
                    "200": _json(
                        {"type": "object"},
                        "The job. Per delivery: `body_mismatch` (the same webhook id arrived "
                        "earlier with another body), `payload` (redacted; null once retention "
                        "removed it) and `payload_removed` (why). Per asset: `fixity` (last "
                        "check: `verified_at`, `verified_by`, `ok`, `problem`).",
                    ),
                    "401": _error("Missing or invalid operator token"),
                    "404": _error("No such job (or erased on request: `receiver forget`)"),
                },
            }
        },
        "/jobs/{provider}/{job_id}/assets/{n}": {
            "get": {
                "summary": "Download an archived asset (presigned redirect, or the bytes)",
                "security": OPERATOR,
                "parameters": [
                    *PATH_PARAMS,
                    {"name": "n", "in": "path", "required": True, "schema": {"type": "string"}},
                    {
                        "name": "redirect",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "boolean"},
                    },
                ],
                "responses": {
                    "200": {"description": "The asset's bytes, or a JSON presigned URL"},
                    "307": {"description": "Redirect to a short-lived presigned URL"},
                    "401": _error("Missing or invalid operator token"),
                    "404": _error("No such job or asset"),
                    "409": _error("Not archived"),
                },
            }
        },
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "Up"}}}},
        "/readyz": {
            "get": {
                "summary": "Readiness to accept webhooks: the ledger answers and takes writes "
                "(with ?full=1 also the store; for people and dashboards, not load balancers)",
                "parameters": [
                    {
                        "name": "full",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["1"]},
                    }
                ],
                "responses": {
                    "200": {"description": "Ready"},
                    "503": {"description": "Not ready"},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "Prometheus text format"}},
            }
        },
    }
    if tracking_schema is not None:
        defs.update(tracking_schema.pop("$defs", {}))
        paths["/jobs"]["post"] = {
            "summary": "Track a job by polling its provider",
            "security": OPERATOR,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": tracking_schema}},
            },
            "responses": {
                "201": _json({"type": "object"}, "Now tracked"),
                "200": _json({"type": "object"}, "Already tracked"),
                "400": _error("Malformed JSON"),
                "401": _error("Missing or invalid operator token"),
                "408": _error("The body did not arrive in time"),
                "410": _error("The job was erased on request (receiver forget)"),
                "413": _error("Metadata too large"),
                "415": _error("Not application/json"),
                "422": _error("Invalid request"),
                "503": _error("The ledger cannot be written right now: retry"),
            },
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "receiver", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {"operatorToken": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                **defs,
                "Error": ERROR,
                "Ack": {
                    "type": "object",
                    "properties": {
                        "status": {
                            "type": "string",
                            "enum": ["accepted", "duplicate", "forgotten"],
                        },
                        "outcome": {"type": "string"},
                        "provider": {"type": "string"},
                        "job_id": {"type": "string"},
                        "job_state": {"type": "string"},
                        "tasks_queued": {"type": "integer"},
                    },
                },
                "JobPage": {
                    "type": "object",
                    "properties": {
                        "jobs": {"type": "array", "items": {"type": "object"}},
                        "next_cursor": {"type": ["string", "null"]},
                    },
                },
            },
        },
    }
