"""The library under test, as a module object driven only through the shared public API.

Every workload receives a `Library` and calls `lib.module.MessageStore(...)` etc., so the
same code path drives depeche-db and depeche-rs (`import depeche_rs as depeche_db`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from types import ModuleType
from typing import Any

from .database import plain_dsn, sqlalchemy_dsn
from .messages import STREAM_WILDCARD, AccountCredited, AccountPartitioner

LABELS = {"depeche_db": "depeche-db", "depeche_rs": "depeche-rs"}
SHORT = {"depeche_db": "db", "depeche_rs": "rs"}
KNOWN = tuple(LABELS)

# Partitioner kinds the projection workloads use.
STREAM_NAME = "stream-name"
PYTHON_FIELD = "python-field"


class LibraryUnavailable(RuntimeError):
    """The library could not be imported or lacks a name the harness relies on."""


@dataclasses.dataclass
class Library:
    """One library under test, with the engine it is given."""

    name: str
    module: ModuleType
    dsn: str
    engine: Any
    version: str

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name)

    @property
    def short(self) -> str:
        return SHORT.get(self.name, self.name[:2])

    @property
    def executor_dsn(self) -> str:
        # depeche-db's Executor picks psycopg 3 only for the postgresql+psycopg scheme;
        # depeche-rs, being a drop-in, must accept the same string.
        return sqlalchemy_dsn(self.dsn)

    def store(self, name: str) -> Any:
        serializer = self.module.tools.PydanticMessageSerializer(AccountCredited)
        return self.module.MessageStore(name=name, engine=self.engine, serializer=serializer)

    def partitioner(self, kind: str) -> Any:
        if kind == STREAM_NAME:
            return self.module.tools.StreamNamePartitioner()
        if kind == PYTHON_FIELD:
            return AccountPartitioner()
        raise ValueError(f"unknown partitioner kind {kind!r}")

    def aggregated_stream(
        self, store: Any, name: str, partitioner_kind: str, batch_size: int
    ) -> Any:
        return store.aggregated_stream(
            name=name,
            partitioner=self.partitioner(partitioner_kind),
            stream_wildcards=[STREAM_WILDCARD],
            update_batch_size=batch_size,
        )

    def ack_strategy(self, name: str) -> Any:
        return getattr(self.module.AckStrategy, name)

    def handlers(self, on_message: Any) -> Any:
        """A `MessageHandler` subclass instance calling `on_message(AccountCredited)`."""
        base = self.module.MessageHandler

        # The annotation must be the real class (no postponed annotations in a handler):
        # both libraries dispatch on it.
        def handle(self: Any, message: AccountCredited) -> None:
            on_message(message)

        handle.__annotations__ = {"message": AccountCredited, "return": None}
        cls = type("BenchHandlers", (base,), {"handle": base.register(handle)})
        return cls()

    def close(self) -> None:
        dispose = getattr(self.engine, "dispose", None)
        if dispose is not None:
            dispose()


def load_library(name: str, dsn: str, engine_kind: str = "sqlalchemy") -> Library:
    """Import a library and give it an engine; raise `LibraryUnavailable` if it cannot run.

    `engine_kind` "sqlalchemy" gives both libraries the same SQLAlchemy engine (the drop-in
    case); "dsn" gives depeche-rs a DSN string, which it accepts as well.
    """
    if name not in KNOWN:
        raise LibraryUnavailable(f"unknown library {name!r}; choose from {', '.join(KNOWN)}")
    try:
        module = importlib.import_module(name)
        importlib.import_module(f"{name}.tools")
        # Only what every workload needs is checked here. A name that one workload needs
        # (MessageHandler, AckStrategy, Executor, ...) fails that workload alone, so the
        # rest still runs while depeche-rs is incomplete.
        module.MessageStore  # noqa: B018
        module.tools.PydanticMessageSerializer  # noqa: B018
    except (ImportError, AttributeError) as exc:
        raise LibraryUnavailable(f"{type(exc).__name__}: {exc}") from exc
    try:
        version = importlib.metadata.version(name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        version = str(getattr(module, "__version__", "unknown"))
    engine: Any
    if engine_kind == "dsn" and name != "depeche_db":
        engine = plain_dsn(dsn)
    else:
        import sqlalchemy

        engine = sqlalchemy.create_engine(sqlalchemy_dsn(dsn))
    return Library(name=name, module=module, dsn=dsn, engine=engine, version=version)
