"""depeche-db's module path `event_sourcing.repository`."""

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
    "EventStoreRepo",
    "InMemoryCache",
    "NoOpCache",
    "NotFound",
    "ReadRepository",
    "Repo",
    "RepoCache",
]
