"""Acknowledgement: the strategies, and the `ack` operation handed out with messages."""

from __future__ import annotations

import enum
from typing import Any

from .._interfaces import SubscriptionStateProvider
from .reader import Claim, SubscriptionReader


class AckStrategy(enum.Enum):
    """When a subscription stores its position."""

    SINGLE = "single"
    BATCHED = "batched"


class AckRolledback(Exception):
    """The acknowledgement made in the caller's transaction is not (or not yet) committed."""


class NoAckOp:
    """The `ack` of messages handed out in batches: acknowledging is the batch's job."""

    def execute(self, **kwargs: Any) -> None:
        """Always raises: use `AckStrategy.SINGLE` to acknowledge single messages."""
        raise RuntimeError(
            "NoAckOp cannot be executed, choose AckStrategy.SINGLE if you want to use this "
            "operation"
        )


_NO_ACK = NoAckOp()


class AckOp:
    """Acknowledges one message (`message.ack` under `AckStrategy.SINGLE`).

    `execute()` stores the position; `execute(conn=conn)` stores it inside the caller's
    transaction (the caller commits). The subscription then checks that the position is
    committed before handing out the next message of the partition, and stops the
    batch (the message comes again) if it is not.
    """

    def __init__(
        self,
        name: str,
        partition: int,
        position: int,
        state_provider: SubscriptionStateProvider,
        *,
        reader: SubscriptionReader[Any] | None = None,
        claim: Claim[Any] | None = None,
    ) -> None:
        self.name = name
        self.partition = partition
        self.position = position
        self._state_provider = state_provider
        self._reader = reader
        self._claim = claim
        self._executed = False
        self._rolled_back = False
        self.in_caller_transaction = False

    @property
    def executed(self) -> bool:
        """True once the acknowledgement was made."""
        return self._executed

    def execute(self, **subscription_state_provider_kwargs: Any) -> None:
        """Acknowledge the message; with `conn=...`, inside the caller's transaction.

        A second call checks that the acknowledgement is committed, raising
        `AckRolledback` if it is not.
        """
        if self._executed:
            if not self.committed():
                raise AckRolledback()
            return
        if subscription_state_provider_kwargs:
            provider = self._state_provider.session(**subscription_state_provider_kwargs)
            store_acknowledged = getattr(provider, "store_acknowledged", None)
            if store_acknowledged is None:
                provider.store(self.name, self.partition, self.position)
            elif not store_acknowledged(self.name, self.partition, self.position):
                # Another consumer took the partition (our lock went with a lost
                # connection) and acknowledged this message first: the caller's
                # transaction must roll back so its effects happen once.
                raise AckRolledback(
                    f"message at position {self.position} of partition {self.partition} "
                    f"was acknowledged by another consumer of {self.name!r} meanwhile; "
                    "roll back this transaction"
                )
            self.in_caller_transaction = True
        elif self._reader is not None and self._claim is not None:
            self._reader.ack(self._claim, self.position)
        else:
            self._state_provider.store(self.name, self.partition, self.position)
        self._executed = True

    def committed(self) -> bool:
        """Return True if the stored position is this message's."""
        if self._reader is not None and self._claim is not None:
            if self._reader.stored_position(self._claim) != self.position:
                return False
            self._claim.acked = self.position
            return True
        state = self._state_provider.read(self.name)
        return state.positions.get(self.partition, -1) == self.position

    def rollback(self) -> None:
        """Mark the acknowledgement as rolled back: the message will come again."""
        self._rolled_back = True

    @property
    def rolled_back(self) -> bool:
        """True after `rollback()`."""
        return self._rolled_back
