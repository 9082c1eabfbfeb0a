"""The second way in, polling: follow jobs of providers without webhooks (and missed webhooks).

- `registration`: `POST /jobs` and `receiver track`, which put a job on the schedule;
- `schedule/`: the port that keeps tracked jobs and when each is next due, with a SQLite and a
  DynamoDB adapter;
- `poller`: claims due jobs, asks the provider's status API with backoff, and records what it
  learns through the same ingest path as a webhook;
- `status`: one status-API client per provider.
"""
