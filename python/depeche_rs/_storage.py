"""`Storage`: the message table's names and migrations, as depeche-db exposes them."""

from __future__ import annotations

from typing import Any

import sqlalchemy as _sa

from . import _migrations, _names, _schema
from ._connection import execute_script, to_engine


class Storage:
    """The database objects of one message store.

    Constructing it creates (or upgrades) the objects. Reading and writing go through
    `MessageStore`; this class keeps depeche-db's names for the table helpers and the
    migration from the <=0.8.0 layout.
    """

    def __init__(self, name: str, engine: Any) -> None:
        self.name = _names.validate_name(name, "store name")
        self.engine: _sa.Engine = to_engine(engine)
        self.notification_channel = self.notification_channel_name(name)
        _schema.ensure_store(self.engine, name)

    @staticmethod
    def message_table_name(name: str) -> str:
        """The message table of store `name`."""
        return _names.message_table(name)

    @staticmethod
    def meta_table_name(name: str) -> str:
        """depeche-db 0.14's per-stream table of store `name` (kept by our triggers when it
        exists; `AggregatedStream.get_migration_ddl_0_14_0` creates it)."""
        return _names.meta_table(name)

    @staticmethod
    def notification_channel_name(name: str) -> str:
        """The channel notified when messages are written to store `name`."""
        return _names.store_channel(name)

    @classmethod
    def get_migration_ddl(cls, name: str) -> str:
        """DDL bringing store `name` from depeche-db's layouts (<=0.8.0 to 0.13) to ours."""
        return _migrations.store_migration_ddl(name)

    @classmethod
    def migrate_db_objects(cls, name: str, conn: _sa.Connection) -> None:
        """Apply `get_migration_ddl(name)` inside the caller's transaction."""
        execute_script(conn, cls.get_migration_ddl(name))
