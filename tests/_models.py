"""Message types used by the tests (depeche-db style pydantic models)."""

from __future__ import annotations

import datetime as dt
import uuid

from pydantic import BaseModel, Field


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class _Base(BaseModel):
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    happened_at: dt.datetime = Field(default_factory=_now)

    def get_message_id(self) -> uuid.UUID:
        return self.event_id

    def get_message_time(self) -> dt.datetime:
        return self.happened_at


class AccountCreated(_Base):
    account: int


class Deposited(_Base):
    account: int
    amount: int


AnyEvent = AccountCreated | Deposited
