"""Subscription state in a PostgreSQL table, with depeche-db's layout."""

from __future__ import annotations

import threading
from typing import Any

import sqlalchemy as sa

from .._db.connection import connect, libpq_dsn, to_engine
from .._db.schema import lock_sql
from .._interfaces import SubscriptionState
from .._names import subscription_table, validate_name


class DbSubscriptionStateProvider:
    """Stores subscription state in `depeche_subscriptions_<name>` (depeche-db's table).

    One table can hold the state of several subscriptions (rows are keyed by subscription
    name). Partition -1 marks the state as initialized, as in depeche-db.

    Args:
        name: Name of the state table (the subscription name by default), an identifier.
        engine: SQLAlchemy Engine or DSN.
        synchronous_commit: When False (the default), the acknowledgements a subscription
            writes on its own do not wait for the WAL flush. A PostgreSQL crash may then
            lose the last fraction of a second of acknowledgements, which only means those
            messages are delivered again (delivery is at least once either way); in
            exchange, acknowledging costs no disk flush per message. Acknowledgements made
            in the caller's transaction (`ack.execute(conn=...)`) follow the caller's
            settings.
    """

    SPECIAL_PARTITION_FOR_INIT_STATE = -1

    def __init__(self, name: str, engine: Any, synchronous_commit: bool = False) -> None:
        self.name = validate_name(name, "subscription state provider name")
        self._engine = to_engine(engine)
        self.table = subscription_table(self.name)
        self.synchronous_commit = synchronous_commit
        # Upsert of one partition's position (parameters: name, partition, position).
        self._store_sql = (
            f"INSERT INTO {self.table} AS s (subscription_name, partition, position) "
            "VALUES (%s, %s, %s) "
            "ON CONFLICT (subscription_name, partition) DO UPDATE SET position = excluded.position"
        )
        self._initialized: set[str] = set()
        self._mutex = threading.Lock()
        with connect(self._engine) as conn:
            conn.exec_driver_sql(lock_sql(self.table))
            # depeche-db's layout; position is bigint (a widening, compatible with its integer).
            conn.exec_driver_sql(
                f"CREATE TABLE IF NOT EXISTS {self.table} ("
                " subscription_name varchar NOT NULL,"
                " partition integer NOT NULL,"
                " position bigint NOT NULL,"
                " PRIMARY KEY (subscription_name, partition))"
            )
            conn.commit()

    @property
    def dsn(self) -> str:
        """The libpq DSN of the database holding the state table."""
        return libpq_dsn(self._engine)

    @property
    def engine(self) -> sa.Engine:
        """The engine used for reads and writes."""
        return self._engine

    def initialize(self, subscription_name: str) -> None:
        """Mark the state of `subscription_name` as initialized."""
        self.store(subscription_name, self.SPECIAL_PARTITION_FOR_INIT_STATE, -1)

    def initialized(self, subscription_name: str) -> bool:
        """Return True if the state of `subscription_name` was initialized."""
        # Once initialized, a state stays so: cache the positive answer.
        if subscription_name in self._initialized:
            return True
        with connect(self._engine) as conn:
            found = _Session(conn, self).initialized(subscription_name)
        if found:
            with self._mutex:
                self._initialized.add(subscription_name)
        return found

    def store(self, subscription_name: str, partition: int, position: int) -> None:
        """Store the last acknowledged position of `partition` (own transaction)."""
        with connect(self._engine) as conn:
            _Session(conn, self).store(subscription_name, partition, position)
            conn.commit()

    def read(self, subscription_name: str) -> SubscriptionState:
        """Read the state of `subscription_name`."""
        with connect(self._engine) as conn:
            return _Session(conn, self).read(subscription_name)

    def session(self, conn: sa.Connection | None = None, **kwargs: Any) -> _Session:
        """A provider working inside the caller's transaction on `conn` (caller commits)."""
        if conn is None:
            raise TypeError(
                "DbSubscriptionStateProvider.session() needs conn=<SQLAlchemy Connection>"
            )
        if kwargs:
            raise TypeError(
                f"DbSubscriptionStateProvider.session() got unexpected arguments {sorted(kwargs)}"
            )
        return _Session(conn, self)

    @classmethod
    def get_migration_ddl(cls, name: str) -> str:
        """DDL renaming depeche-db <=0.8.0's `<name>_subscription_state` table to ours.

        A no-op when there is nothing to rename.
        """
        validate_name(name, "subscription state provider name")
        old, new = f"{name}_subscription_state", subscription_table(name)
        # The old name quoted: depeche-db created it through SQLAlchemy, which keeps the
        # case of a name with capitals; ours are unquoted, as everywhere else.
        return (
            "DO $$ BEGIN "
            f"""IF to_regclass('"{old}"') IS NOT NULL AND to_regclass('{new}') IS NULL THEN """
            f'ALTER TABLE "{old}" RENAME TO {new}; '
            "END IF; END $$"
        )

    @classmethod
    def migrate_db_objects(cls, name: str, conn: sa.Connection) -> None:
        """Apply `get_migration_ddl(name)` in the caller's transaction."""
        conn.exec_driver_sql(cls.get_migration_ddl(name))


class _Session:
    """The state provider bound to one connection (the caller's transaction)."""

    def __init__(self, conn: sa.Connection, parent: DbSubscriptionStateProvider) -> None:
        self._conn = conn
        self._parent = parent

    @property
    def conn(self) -> sa.Connection:
        """The connection this session works on."""
        return self._conn

    def initialize(self, subscription_name: str) -> None:
        """Mark the state as initialized, in this transaction."""
        self.store(subscription_name, self._parent.SPECIAL_PARTITION_FOR_INIT_STATE, -1)

    def initialized(self, subscription_name: str) -> bool:
        """Return True if the state is initialized, as seen by this transaction."""
        row = self._conn.exec_driver_sql(
            f"SELECT 1 FROM {self._parent.table} WHERE subscription_name = %s AND partition = %s",
            (subscription_name, self._parent.SPECIAL_PARTITION_FOR_INIT_STATE),
        ).first()
        return row is not None

    def store(self, subscription_name: str, partition: int, position: int) -> None:
        """Store a position, in this transaction."""
        self._conn.exec_driver_sql(
            self._parent._store_sql, (subscription_name, partition, position)
        )

    def store_acknowledged(self, subscription_name: str, partition: int, position: int) -> bool:
        """Move the position forward to `position`, in this transaction; False (nothing
        changed) when it is there or beyond already, i.e. another consumer acknowledged
        the message meanwhile. The row lock makes concurrent acknowledgements wait for
        each other, so exactly one of them succeeds."""
        row = self._conn.exec_driver_sql(
            self._parent._store_sql + " WHERE s.position < excluded.position RETURNING 1",
            (subscription_name, partition, position),
        ).first()
        return row is not None

    def read(self, subscription_name: str) -> SubscriptionState:
        """Read the state, as seen by this transaction."""
        rows = self._conn.exec_driver_sql(
            f"SELECT partition, position FROM {self._parent.table} "
            "WHERE subscription_name = %s AND partition <> %s",
            (subscription_name, self._parent.SPECIAL_PARTITION_FOR_INIT_STATE),
        ).fetchall()
        return SubscriptionState({partition: position for partition, position in rows})

    def session(self, conn: sa.Connection | None = None, **kwargs: Any) -> _Session:
        """A session on another connection."""
        return self._parent.session(conn=conn, **kwargs)
