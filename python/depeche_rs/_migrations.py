"""DDL bringing depeche-db's older layouts to ours. Every script is idempotent.

Layouts handled for aggregated streams:
- before 0.8.0: table `<agg>_projected_stream` with its own notify trigger;
- 0.8 to 0.10: no `origin_stream_global_position` / `origin_stream_added_at` columns;
- 0.11 to 0.12.2: no `_maxpos` table;
- 0.13: a row-level notify trigger and no projector cursor.
"""

from __future__ import annotations

from . import _names, _schema


def _rename_legacy(old: str, new: str, trigger: str | None = None) -> str:
    """PL/pgSQL renaming the <=0.8.0 table `old` to `new` (and dropping its notify trigger
    and function `trigger`), unless `new` exists already."""
    drop_trigger = f"\n    DROP TRIGGER IF EXISTS {trigger} ON {new};" if trigger else ""
    drop_function = f"\n  DROP FUNCTION IF EXISTS {trigger}() CASCADE;" if trigger else ""
    return f"""
  IF to_regclass('{old}') IS NOT NULL AND to_regclass('{new}') IS NULL THEN
    ALTER TABLE "{old}" RENAME TO {new};{drop_trigger}
  END IF;{drop_function}"""


def stream_migration_ddl(agg: str, store: str | None) -> str:
    """The migration script of aggregated stream `agg` (over store `store`, if known)."""
    _names.validate_name(agg, "aggregated stream name")
    if store is not None:
        _names.validate_name(store, "store name")
    t = _names.stream_table(agg)
    old = f"{agg}_projected_stream"
    if store is not None:
        msgs = _names.message_table(store)
        fill = f"""
      UPDATE {t} AS agg
         SET origin_stream_global_position = msg.global_position,
             origin_stream_added_at = msg.added_at
        FROM {msgs} AS msg
       WHERE agg.message_id = msg.message_id;
      ALTER TABLE {t}
        ALTER COLUMN origin_stream_global_position SET NOT NULL,
        ALTER COLUMN origin_stream_added_at SET NOT NULL;"""
    else:
        fill = f"""
      RAISE EXCEPTION 'aggregated stream {agg} has the depeche-db 0.8-0.10 layout: pass '
        'message_store_name to get_migration_ddl/migrate_db_objects (or --store) so the '
        'origin global positions can be filled in';"""
    return f"""
DO $migrate$
BEGIN{_rename_legacy(old, t, f"{agg}_stream_notify_message_inserted")}
  IF to_regclass('{t}') IS NOT NULL AND NOT EXISTS (
      SELECT 1 FROM pg_attribute WHERE attrelid = '{t}'::regclass
         AND attname = 'origin_stream_global_position' AND NOT attisdropped) THEN
    ALTER TABLE {t}
      ADD COLUMN origin_stream_global_position bigint NULL,
      ADD COLUMN origin_stream_added_at timestamp NULL;{fill}
  END IF;
END
$migrate$;
{_schema.stream_ddl(agg)}
"""


def store_migration_ddl(store: str) -> str:
    """The migration script of store `store` (from the <=0.8.0 `<store>_messages` table)."""
    _names.validate_name(store, "store name")
    t = _names.message_table(store)
    old = f"{store}_messages"
    return f"""
DO $migrate$
BEGIN{_rename_legacy(old, t, f"{store}_notify_message_inserted")}
  DROP FUNCTION IF EXISTS {store}_write_message CASCADE;
END
$migrate$;
{_schema.store_ddl(store)}
"""


def subscription_migration_ddl(name: str) -> str:
    """The migration script of subscription state table `name` (from <=0.8.0)."""
    _names.validate_name(name, "subscription state name")
    t = _names.subscription_table(name)
    old = f"{name}_subscription_state"
    return f"""
DO $migrate$
BEGIN{_rename_legacy(old, t)}
END
$migrate$;
"""
