"""The message type every workload writes and projects, and the Python partitioner.

Both libraries get the very same class, so serialisation cost is identical and the wire
format is depeche-db's: `model_dump(mode="json")` plus `"__typename__"`.
"""

import datetime as dt
import uuid
from typing import Any

import pydantic

# Partitions of the Python partitioner; the drain workload reads this many partitions.
ACCOUNT_PARTITIONS = 64
STREAM_PREFIX = "account-"
STREAM_WILDCARD = STREAM_PREFIX + "%"


class AccountCredited(pydantic.BaseModel):
    """A small event, typical of what an event-sourced system stores."""

    event_id: uuid.UUID
    occurred_at: dt.datetime
    account: int
    amount: int

    def get_message_id(self) -> uuid.UUID:
        return self.event_id

    def get_message_time(self) -> dt.datetime:
        return self.occurred_at


class AccountPartitioner:
    """A partitioner written in Python that reads a field of the deserialised message.

    It is a plain object (not a subclass of either library's `MessagePartitioner`) because
    both libraries accept any object with `get_partition`, and the same instance type must
    drive both.
    """

    def __init__(self, partitions: int = ACCOUNT_PARTITIONS) -> None:
        self.partitions = partitions

    def get_partition(self, message: Any) -> int:
        account: int = message.message.account
        return account % self.partitions


def stream_name(account: int) -> str:
    return f"{STREAM_PREFIX}{account}"


def new_message(account: int, amount: int) -> AccountCredited:
    return AccountCredited(
        event_id=uuid.uuid4(),
        occurred_at=dt.datetime.now(dt.timezone.utc),
        account=account,
        amount=amount,
    )
