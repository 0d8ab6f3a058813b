"""The exception tree.

Every class subclasses what users already catch (the depeche-db classes keep their
bases; our own errors add `ValueError`, `TypeError`, `ConnectionError`, ...), and every
message says what is wrong and what to do.
"""

from __future__ import annotations

from typing import Any


class DepecheError(Exception):
    """Base class of every error raised by depeche_rs."""


class OptimisticConcurrencyError(DepecheError):
    """The stream's version is not the one the writer expected.

    Attributes:
        stream: The stream written to.
        expected_version: The version the writer expected.
        actual_version: The stream's version at the time of the write.
    """

    def __init__(
        self,
        message: str,
        stream: str | None = None,
        expected_version: int | None = None,
        actual_version: int | None = None,
    ) -> None:
        super().__init__(message)
        self.stream = stream
        self.expected_version = expected_version
        self.actual_version = actual_version


class MessageNotFound(DepecheError, LookupError):
    """No message with the given id exists."""


class MessageIdMismatchError(DepecheError, ValueError):
    """`synchronize` found a stored message id that differs from the given one."""


class InvalidNameError(DepecheError, ValueError):
    """A store, stream or subscription name is not a plain SQL-safe identifier."""


class InvalidWildcardError(DepecheError, ValueError):
    """A stream wildcard list is empty or contains something that is not a LIKE pattern."""


class SerializationError(DepecheError, ValueError):
    """The serializer failed or returned something that is not a JSON object."""


class PoisonMessageError(SerializationError):
    """A stored message cannot be projected: it does not deserialize (or its
    `get_message_time()` fails) and the writer recorded no message time for it.

    The batch holding it is not written; every later batch stops at the same message
    until an operator acts: fix the message body, record its time
    (`UPDATE depeche_msgs_<store> SET occurred_at = ... WHERE message_id = ...`), or
    delete it. The projector then goes on by itself.

    Attributes:
        store: The message store's name.
        stream: The message's origin stream.
        version: Its version in that stream.
        global_position: Its global position in the store.
        message_id: Its id.
    """

    def __init__(
        self,
        message: str,
        store: str,
        stream: str,
        version: int,
        global_position: int,
        message_id: Any,
    ) -> None:
        super().__init__(message)
        self.store = store
        self.stream = stream
        self.version = version
        self.global_position = global_position
        self.message_id = message_id


class UnsafeSequenceError(DepecheError, RuntimeError):
    """The store's global-position sequence is configured in a way that would break
    per-stream version order in aggregated streams (`CACHE` above 1, or an increment
    below 1). The projector refuses to run until it is fixed.

    Attributes:
        sequence: The sequence's name.
        fix: The SQL that fixes it (`depeche-rs migrate --apply` runs it too).
    """

    def __init__(self, message: str, sequence: str = "", fix: str = "") -> None:
        super().__init__(message)
        self.sequence = sequence
        self.fix = fix


class InvalidMessageError(DepecheError, TypeError):
    """The object given as a message does not implement `MessageProtocol`."""


class NaiveDatetimeError(DepecheError, ValueError):
    """A datetime without timezone was given where an aware one is required."""


class PartitionerError(DepecheError, ValueError):
    """A partitioner raised or returned something that is not an int >= 0.

    Attributes:
        stream: Origin stream of the offending message.
        message_id: Id of the offending message.
    """

    def __init__(self, message: str, stream: str | None = None, message_id: Any = None) -> None:
        super().__init__(message)
        self.stream = stream
        self.message_id = message_id


# What a SQLSTATE means to the Python side (the engine's errors arrive mapped already):
# classes a retry can fix, transaction rollback (serialization failure, deadlock),
# insufficient resources, and a cancelled statement (statement_timeout);
TRANSIENT_SQLSTATES = ("40", "53", "57014")
# and the write function's version check (RAISE ... HINT 'depeche_rs:occ').
OCC_SQLSTATE = "P0001"


class DatabaseError(DepecheError):
    """PostgreSQL reported an error to the Rust engine.

    Attributes:
        sqlstate: The five-character SQLSTATE, when the server sent one.
        detail: The server's DETAIL, if any.
        hint: The server's HINT, if any.
    """

    sqlstate: str | None = None
    detail: str | None = None
    hint: str | None = None


class DatabaseConnectionError(DatabaseError, ConnectionError):
    """The database could not be reached or the connection was lost."""


class MissingTablesError(DatabaseError, LookupError):
    """The database does not hold the tables this object needs."""


class EmbeddedPostgresError(DepecheError, RuntimeError):
    """The embedded PostgreSQL server could not be started."""
