"""Repositories that load aggregates from their streams and save their new events."""

from __future__ import annotations

import abc
import logging
import pickle
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, cast

from .._interfaces import MessagePosition, MessageProtocol
from ._aggregate_root import EventSourcedAggregateRoot

E = TypeVar("E", bound=MessageProtocol)
OBJ = TypeVar("OBJ", bound=EventSourcedAggregateRoot[Any, Any])
ID = TypeVar("ID")
ID_contra = TypeVar("ID_contra", contravariant=True)

_LOGGER = logging.getLogger(__name__)


class NotFound(Exception):
    """No aggregate with that id exists."""


class RepoCache(Protocol[OBJ, ID_contra]):
    """Keeps loaded aggregates to avoid replaying whole streams."""

    def get(self, id: ID_contra) -> OBJ | None:
        """The cached aggregate, or None."""
        ...

    def set(self, id: ID_contra, obj: OBJ) -> None:
        """Cache an aggregate."""
        ...


class Repo(abc.ABC, Generic[OBJ, ID]):
    """A collection of aggregates that can be loaded and persisted."""

    @abc.abstractmethod
    def add(self, entity: OBJ) -> MessagePosition:
        """Persist a new aggregate."""
        raise NotImplementedError

    @abc.abstractmethod
    def save(self, entity: OBJ, expected_version: int) -> MessagePosition:
        """Persist the new events of an aggregate loaded at `expected_version`."""
        raise NotImplementedError

    @abc.abstractmethod
    def get(self, id: ID) -> OBJ:
        """Load an aggregate; raises `NotFound`."""
        raise NotImplementedError


class ReadRepository(Generic[E, OBJ, ID]):
    """Loads aggregates through one store reader (one connection)."""

    def __init__(
        self,
        event_store_reader: Any,
        constructor: Callable[[], OBJ],
        stream_prefix: str,
        cache: RepoCache[OBJ, ID],
    ) -> None:
        self._reader = event_store_reader
        self._constructor = constructor
        self._stream_prefix = stream_prefix
        self._cache = cache

    def get(self, id: ID) -> OBJ:
        """The aggregate with `id`, from the cache brought up to date, or replayed."""
        cached = self._cache.get(id)
        if cached is not None:
            try:
                self._catch_up(id, cached)
                self._cache.set(id, cached)
                return cached
            except (KeyError, ValueError, TypeError, pickle.UnpicklingError) as exc:
                _LOGGER.warning("cached aggregate %s is unusable, replaying: %s", id, exc)
        obj = self._constructor()
        self._catch_up(id, obj)
        if obj.get_id() is None:
            raise NotFound(id)
        self._cache.set(id, obj)
        return obj

    def _catch_up(self, id: ID, obj: OBJ) -> None:
        min_version = obj._version + 1 if obj._version > 0 else None
        for stored in self._reader.read(f"{self._stream_prefix}-{id}", min_version=min_version):
            obj.apply(stored.message)


class EventStoreRepo(Repo[OBJ, ID], Generic[E, OBJ, ID]):
    """Aggregates stored as streams named `<stream_prefix>-<id>`.

    Args:
        event_store: The message store.
        constructor: Makes an empty aggregate.
        stream_prefix: Prefix of the stream names.
        cache: Optional cache of loaded aggregates.
    """

    def __init__(
        self,
        event_store: Any,
        constructor: Callable[[], OBJ],
        stream_prefix: str,
        cache: RepoCache[OBJ, ID] | None = None,
    ) -> None:
        self._event_store = event_store
        self._constructor = constructor
        self._stream_prefix = stream_prefix
        self._cache: RepoCache[OBJ, ID] = cache or NoOpCache()

    def add(self, entity: OBJ) -> MessagePosition:
        """Persist a new aggregate (its stream must not exist yet)."""
        return self.save(entity, expected_version=0)

    def save(self, entity: OBJ, expected_version: int) -> MessagePosition:
        """Append the aggregate's events not stored yet, if the stream is at
        `expected_version` (else `OptimisticConcurrencyError`)."""
        result: MessagePosition = self._event_store.synchronize(
            stream=f"{self._stream_prefix}-{entity.get_id()}",
            messages=entity.events,
            expected_version=expected_version,
        )
        return result

    def get(self, id: ID) -> OBJ:
        """Load the aggregate with `id`; raises `NotFound`."""
        with self._event_store.reader() as reader:
            return ReadRepository[E, OBJ, ID](
                reader, self._constructor, self._stream_prefix, self._cache
            ).get(id)


class BaseCache(Generic[OBJ, ID]):
    """A cache that stores an aggregate again only every `cache_every_x_version` versions."""

    def __init__(self, cache_every_x_version: int = 20) -> None:
        self._versions: dict[ID, int] = {}
        self._cache_every_x_version = cache_every_x_version
        self._lock = threading.Lock()

    def get(self, id: ID) -> OBJ | None:
        """The cached aggregate, or None."""
        with self._lock:
            obj = self._get(id)
            if obj is None:
                self._versions.pop(id, None)
            else:
                self._versions[id] = obj._version
            return obj

    def set(self, id: ID, obj: OBJ) -> None:
        """Cache `obj` if it is new or far enough ahead of the cached version."""
        with self._lock:
            cached = self._versions.get(id)
            if cached is None or obj._version - cached >= self._cache_every_x_version:
                self._versions[id] = obj._version
                self._set(id, obj)

    def _get(self, id: ID) -> OBJ | None:
        raise NotImplementedError

    def _set(self, id: ID, obj: OBJ) -> None:
        raise NotImplementedError


class NoOpCache(Generic[OBJ, ID]):
    """Caches nothing."""

    def get(self, id: ID) -> OBJ | None:
        """Always None."""
        return None

    def set(self, id: ID, obj: OBJ) -> None:
        """Does nothing."""


class InMemoryCache(BaseCache[OBJ, ID]):
    """Keeps pickled aggregates in a dict (copies, so callers cannot mutate the cache)."""

    def __init__(self, cache_every_x_version: int = 20) -> None:
        super().__init__(cache_every_x_version=cache_every_x_version)
        self._store: dict[ID, bytes] = {}

    def _get(self, id: ID) -> OBJ | None:
        data = self._store.get(id)
        return None if data is None else cast(OBJ, pickle.loads(data))

    def _set(self, id: ID, obj: OBJ) -> None:
        self._store[id] = pickle.dumps(obj)
