"""Stage 3, audit: what arrived, when, what was archived where, and is it intact.

- `api`: `GET /jobs...` for operators (bearer token), with redacted payloads and presigned links;
- `operations`: the CLI's `retry`, `verify` and `reindex` (the archive read back);
- `openapi`: the OpenAPI document served at `/openapi.json`;
- `console/`: the operator console at `/console` (browser pages over the same lookups).
"""
