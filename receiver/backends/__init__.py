"""Plumbing the adapters share, and nothing else imports: the SQLite database (one file, one
writer thread, group commit) and the boto3 clients and thread pool of the AWS adapters.

Stages never import from here; only adapters (`ledger.sqlite`, `workqueue.sqs`, ...) and the
composition root do.
"""
