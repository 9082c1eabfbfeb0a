"""Stage 1, ingest: provider callbacks in, durable records out.

- `routes`: the Starlette webhook endpoints (size and type checks, authenticate, parse, record);
- `auth`: Standard Webhooks signatures and path tokens;
- `record`: turns a parsed `JobEvent` into one atomic ledger write (job, delivery, archive tasks
  with their deadlines) and answers only once it is durable.

Nothing here talks to a provider or to the store: the 2xx leaves before any outbound I/O.
"""
