"""An SQS destination (`sqs://QUEUE` in RECEIVER_ONWARD_ENDPOINTS): each try is one
SendMessage of the event's bytes, with the event's id and type as message attributes (a FIFO
queue also gets them as deduplication id and group: the job). An application reading the
queue gets the same body an HTTP endpoint would, unsigned: IAM is the authentication."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from receiver.backends.aws import client, error_code, resource_name, run_blocking
from receiver.domain import scrub_secrets
from receiver.ledger.events import PendingSend
from receiver.onward import Answer

# Errors that no retry changes (a missing queue, no permission): the series ends.
_FINAL = frozenset(
    {
        "AWS.SimpleQueueService.NonExistentQueue",
        "QueueDoesNotExist",
        "AccessDenied",
        "AccessDeniedException",
        "InvalidParameterValue",
    }
)


class SqsDestination:
    def __init__(self, url: str, *, sqs: Any | None = None) -> None:
        self.queue = resource_name(url, "sqs", "RECEIVER_ONWARD_ENDPOINTS url")
        self.sqs = sqs if sqs is not None else client("sqs")
        self._queue_url: str | None = None

    def _send(self, send: PendingSend) -> None:
        if self._queue_url is None:
            self._queue_url = self.sqs.get_queue_url(QueueName=self.queue)["QueueUrl"]
        message: dict[str, Any] = {
            "QueueUrl": self._queue_url,
            "MessageBody": send.body.decode(),
            "MessageAttributes": {
                "event_id": {"DataType": "String", "StringValue": send.event_id},
                "event_type": {"DataType": "String", "StringValue": send.type},
            },
        }
        if self.queue.endswith(".fifo"):
            message["MessageDeduplicationId"] = send.event_id
            message["MessageGroupId"] = f"{send.provider}/{send.job_id}"[:128]
        self.sqs.send_message(**message)

    async def send(self, send: PendingSend) -> Answer:
        try:
            await run_blocking(self._send, send)
        except ClientError as exc:
            code = error_code(exc)
            status = 400 if code in _FINAL else 503
            return Answer(status, error=scrub_secrets(f"SQS {code}: {exc}"))
        except BotoCoreError as exc:
            return Answer(None, error=scrub_secrets(f"SQS: {exc}"))
        return Answer(200)

    async def aclose(self) -> None:
        return None
