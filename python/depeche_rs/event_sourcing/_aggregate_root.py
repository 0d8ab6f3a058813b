"""The aggregate root: state rebuilt by applying its events in order."""

from __future__ import annotations

import abc
from typing import Generic, TypeVar

from .._interfaces import MessageProtocol

ID = TypeVar("ID")
E = TypeVar("E", bound=MessageProtocol)


class EventSourcedAggregateRoot(abc.ABC, Generic[ID, E]):
    """Base class of event-sourced aggregates.

    Subclasses implement `get_id()` and `_apply(event)` (which changes the state), and may
    override `_check_invariants()`. `apply(event)` applies, checks, and records the event;
    `events` are all events applied so far (loaded and new), `_version` their count.
    """

    def __init__(self) -> None:
        self._events: list[E] = []
        self._version = 0

    @property
    def events(self) -> list[E]:
        """The events applied so far, oldest first (a copy)."""
        return list(self._events)

    @abc.abstractmethod
    def get_id(self) -> ID:
        """The aggregate's id (None before its first event)."""
        raise NotImplementedError

    def _add_event(self, event: E) -> None:
        self._version += 1
        self._events.append(event)

    def apply(self, event: E) -> None:
        """Apply `event`, check the invariants, and record it."""
        self._apply(event)
        self._check_invariants()
        self._add_event(event)

    @abc.abstractmethod
    def _apply(self, event: E) -> None:
        raise NotImplementedError

    def _check_invariants(self) -> None:
        """Raise if the state is invalid; called after every applied event."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EventSourcedAggregateRoot):
            return NotImplemented
        return bool(self.get_id() == other.get_id() and self._version == other._version)

    __hash__ = None  # type: ignore[assignment]
