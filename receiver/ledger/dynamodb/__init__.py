"""The DynamoDB ledger: the same port as SQLite, for many stateless replicas sharing one table.

`RECEIVER_LEDGER_URL=dynamodb://TABLE` (with `RECEIVER_QUEUE_URL=sqs://NAME`). One table, keys
`pk`/`sk` (strings); infra/receiver.yaml creates it with the indexes below.

Items (single-table design; a job's items share its partition):

| pk                             | sk                          | what                              |
|--------------------------------|-----------------------------|-----------------------------------|
| `JOB#{provider}#{job_id}`      | `JOB`                       | the job, with `version`           |
| `JOB#{provider}#{job_id}`      | `JOB#AST#{n:04d}`           | an asset (output) and its outcome |
| `JOB#{provider}#{job_id}`      | `DLV#{received µs}#{rand}`  | a delivery (its audit row)        |
| `JOB#{provider}#{job_id}`      | `PART#{delivery sk}#{k}`    | its body (zlib, 350 KB parts, TTL)|
| `JOB#{provider}#{job_id}`      | `TASK#{n:04d}`              | the archive task (the outbox)     |
| `DLVID#{provider}#{webhook id}`| `DLVID`                     | a webhook id seen (replays)       |
| `TOMB#{provider}#{job_id}`     | `TOMB`                      | a job erased on request (`forget`)|

Deliveries written before payload retention kept the first body chunk in the `DLV` item itself
(parts from 1); they read back the same, but the prune does not find them (no `bodies` entry).
Payload retention, erasure and fixity use two more sparse indexes (`bodies`, `fixity`): see
`receiver.ledger.dynamodb.lifecycle`.

The job and its assets sort together (`begins_with(sk, "JOB")`), so the state `record` decides
on is one consistent Query.

Writes: read, decide, one transaction. `record` reads the job and its assets (consistent read)
and whether the webhook id was seen, runs `receiver.domain.decide` (the one state machine), then
writes everything the SQLite adapter writes in its one transaction with one TransactWriteItems:
the job item (conditional: `attribute_not_exists(pk)` for a new job, else `version = :seen`), the
delivery, the webhook-id marker, assets and tasks. A concurrent writer that changed the job first
makes the condition fail; we re-read and decide again (bounded, with jittered backoff). So 50
concurrent copies of one webhook make one job and one task: one creates the job, the other 49
re-read it and record duplicates. Every write that changes the job, its assets or its tasks
increments `version`; a duplicate or ignored delivery does not (it only appends history and
touches `updated_at`, still conditional on the version it saw), so a burst of duplicates commits
in parallel instead of queueing behind each other. Each attempt carries a ClientRequestToken, so
botocore's retry of a transaction whose answer was lost cannot record a delivery twice.

Queries (no Scan anywhere): two global secondary indexes over job items, both sorted by `seq`
(first-seen time in microseconds * 65536 + 16 bits of a hash of the job's identity: unique in
practice, time-ordered across replicas up to clock skew, and stable, so it is the audit cursor):

- `by_time`: `gsi1pk = JOBS#{shard}`, newest first, for `GET /jobs` with or without filters
  (provider and type filter within the query; `since`/`until` narrow the key range);
- `by_state`: `gsi2pk = STATE#{state}#{shard}`, for the common "what is dead/queued" question.

Each is spread over SHARDS partitions (by the job's hash) so that a burst of new jobs does not
make one hot index partition; a listing queries every shard and merges them by `seq`. SHARDS is
part of the stored format: changing it needs a backfill.

The outbox. A DynamoDB commit and an SQS send cannot be one transaction. So the task is written
as an item in the record transaction, marked unsent (`obpk`/`obat`, which put it in the sparse
`outbox` index); after the commit `record` sends the SQS message and marks the task sent
(conditional on the task's `gen`, so a newer enqueue of the same task is not marked by an older
send). If the process dies in between, or SQS refuses, the task stays in the outbox: the relay
(`relay_outbox`, run by workers at start and every 30 s) re-sends tasks unsent for over a minute.
A task may therefore be sent twice; the worker reads the asset's state from the ledger and only
acknowledges a message whose asset is already archived.

Limits: a transaction holds at most 100 items (4 MB), so a job may have at most ~45 outputs;
an item at most 400 KB, hence compressed and split delivery bodies.

Modules: `items` (item format, keys, the table definition), `ledger` (`record` and the other
writes), `reads` (jobs, listings, activity), `outbox` (send and relay), `claims` (one copy of a
task at a time in SQS mode), `lifecycle` (retention, erasure, fixity bookkeeping).
"""

from receiver.ledger.dynamodb.items import Item, decode, encode, query_items, table_definition
from receiver.ledger.dynamodb.ledger import DynamoLedger, LedgerBusy

__all__ = [
    "DynamoLedger",
    "Item",
    "LedgerBusy",
    "decode",
    "encode",
    "query_items",
    "table_definition",
]
