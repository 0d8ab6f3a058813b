"""The engine's `resolve` callbacks of `depeche-rs project`, and messages as raw JSON
objects for when it runs without `--serializer`.

The projector needs a message's time only for rows written without one (depeche-db's own
write function does not record it), and a deserialized message only for a Python
partitioner. Without the application's serializer, a message is its JSON object, and its
time is read from the first of a list of fields that holds an ISO 8601 string (or Unix
seconds); when none does, the row's `added_at` (the time it was written) stands in.

A message that cannot be read raises `PoisonMessageError`, naming the store, its stream,
version, global position and id, so that the operator can fix it (with `--serializer`,
the `StreamProjector`'s own resolve, which the CLI then uses, does the same).
"""

from __future__ import annotations

import datetime as _dt
import json as _json
import uuid as _uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._native import ResolveRow
from .._projection.projector import poison_message

DEFAULT_TIME_FIELDS: tuple[str, ...] = (
    "occurred_at",
    "happened_at",
    "created_at",
    "timestamp",
    "time",
    "at",
)
_ID_FIELDS = ("message_id", "event_id", "id")

Resolved = list[tuple[int | None, _dt.datetime]]
Resolve = Callable[[list[ResolveRow], bool], Resolved]


def _lookup(data: Mapping[str, Any], field: str) -> Any:
    value: Any = data
    # Dotted names reach into nested objects ("meta.occurred_at").
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _to_utc_naive(value: Any) -> _dt.datetime | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            aware = _dt.datetime.fromtimestamp(value, _dt.timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
        return aware.replace(tzinfo=None)
    if not isinstance(value, str):
        return None
    text = value.strip()
    # Python 3.10's fromisoformat does not take the "Z" suffix.
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return parsed  # naive times are UTC, as depeche-db stores them
    return parsed.astimezone(_dt.timezone.utc).replace(tzinfo=None)


def message_time(data: Mapping[str, Any], fields: Sequence[str]) -> _dt.datetime | None:
    """The first of `fields` holding a time, as a naive UTC datetime, or None."""
    times = (_to_utc_naive(_lookup(data, field)) for field in fields)
    return next((t for t in times if t is not None), None)


class JsonMessage:
    """A message read as its JSON object: `message.data["account"]`, or `message["account"]`.

    Python partitioners run by `depeche-rs project` without `--serializer` receive a
    `StoredMessage` whose `message` is one of these.
    """

    def __init__(
        self, data: dict[str, Any], time_fields: Sequence[str] = DEFAULT_TIME_FIELDS
    ) -> None:
        self.data = data
        self.time_fields = tuple(time_fields)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        """The value of field `key`, or `default`."""
        return self.data.get(key, default)

    def get_message_id(self) -> _uuid.UUID:
        """The id in field `message_id`, `event_id` or `id`."""
        for field in _ID_FIELDS:
            value = self.data.get(field)
            if value is not None:
                try:
                    return _uuid.UUID(str(value))
                except ValueError:
                    continue
        raise ValueError(f"the message has no UUID in any of the fields {', '.join(_ID_FIELDS)}")

    def get_message_time(self) -> _dt.datetime:
        """The time in the first of the time fields that holds one (naive UTC)."""
        found = message_time(self.data, self.time_fields)
        if found is None:
            raise ValueError(
                f"the message has no time in any of the fields {', '.join(self.time_fields)}"
            )
        return found


class JsonSerializer:
    """Serializer of `JsonMessage`: the JSON object as it is."""

    def __init__(self, time_fields: Sequence[str] = DEFAULT_TIME_FIELDS) -> None:
        self.time_fields = tuple(time_fields)

    def serialize(self, message: JsonMessage) -> dict[str, Any]:
        """The message's JSON object."""
        return dict(message.data)

    def deserialize(self, message: dict[str, Any]) -> JsonMessage:
        """Wrap the JSON object."""
        return JsonMessage(message, self.time_fields)


def _one_line(exc: BaseException) -> str:
    # Validation errors span lines; a log line must not.
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def json_resolver(python_resolve: Resolve, time_fields: Sequence[str], store: str) -> Resolve:
    """The engine's `resolve` callback for raw JSON messages.

    Times missing from a row are taken from the JSON (or `added_at`) here, so that
    `python_resolve` (the `StreamProjector`'s, which runs a Python partitioner) never asks
    a message for its time.
    """
    fields = tuple(time_fields)

    def resolve(rows: list[ResolveRow], need_partition: bool) -> Resolved:
        for row in rows:
            if row.occurred_at is None:
                try:
                    body = _json.loads(row.message) if row.message is not None else {}
                except ValueError as exc:
                    raise poison_message(store, row, f"is not JSON: {_one_line(exc)}") from exc
                found = message_time(body, fields) if isinstance(body, dict) else None
                row.occurred_at = found if found is not None else row.added_at
        if not need_partition:
            return [(None, row.occurred_at or row.added_at) for row in rows]
        return python_resolve(rows, True)

    return resolve
