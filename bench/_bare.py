"""The ingest baseline: a bare Starlette endpoint that parses the JSON body and answers 202.

    python -m bench._bare PORT

It records nothing and checks no signature. Served by uvicorn exactly as ``receiver serve``
serves receiver (same ``uvicorn.run`` arguments), so the two differ only in what the
application does per request.
"""

from __future__ import annotations

import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def webhook(request: Request) -> JSONResponse:
    payload = json.loads(await request.body())
    return JSONResponse({"status": "accepted", "job_id": payload["data"]["jobId"]}, 202)


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[Route("/webhooks/apex", webhook, methods=["POST"]), Route("/healthz", healthz)]
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=False, log_level="warning")
