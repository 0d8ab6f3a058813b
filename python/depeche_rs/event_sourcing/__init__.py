"""Event-sourced aggregates over a `MessageStore` (depeche-db's `event_sourcing`)."""

from ._aggregate_root import EventSourcedAggregateRoot
from ._repository import (
    BaseCache,
    EventStoreRepo,
    InMemoryCache,
    NoOpCache,
    NotFound,
    ReadRepository,
    Repo,
    RepoCache,
)

__all__ = [
    "BaseCache",
    "EventSourcedAggregateRoot",
    "EventStoreRepo",
    "InMemoryCache",
    "NoOpCache",
    "NotFound",
    "ReadRepository",
    "Repo",
    "RepoCache",
]
