"""Onward delivery: tell the team's application what receiver archived, signed and retried.

The flow: the ledger writes each event with the state change it reports (receiver/ledger/
events.py); the `Sender` (sender.py) claims due sends per endpoint, hands each to its
`Destination` and records the attempt. What crosses this line: a claimed `PendingSend` goes
in; an `Answer` comes out, saying what the destination did with the event's bytes. Adapters:
`http.py` (HTTP(S), Standard Webhooks signatures) and `sqs.py` (an SQS queue); only the
composition root picks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from receiver.ledger.events import PendingSend


@dataclass(frozen=True)
class Answer:
    """What one try got: `status` (None: no answer), the first KB of the answer, the error
    (never the URL's credentials or query), and how long the destination asked us to wait."""

    status: int | None
    response: str = ""
    error: str | None = None
    retry_after: float | None = None  # seconds (Retry-After on 429/503)


class Destination(Protocol):
    async def send(self, send: PendingSend) -> Answer: ...

    async def aclose(self) -> None: ...
