"""DDL bringing depeche-db's older layouts to ours. Every script is idempotent.

Layouts handled for aggregated streams:
- before 0.8.0: table `<agg>_projected_stream` with its own notify trigger;
- 0.8 to 0.10: no `origin_stream_global_position` / `origin_stream_added_at` columns;
- 0.11 to 0.12.2: no `_maxpos` table;
- 0.13: a row-level notify trigger and no projector cursor.

`depeche_db_0_14_ddl` adds depeche-db 0.14's two tables to a store and its aggregated
streams (or repairs them), for databases that depeche-db 0.14 processes share.
"""

from __future__ import annotations

from .. import _names
from . import schema


def _do(body: str) -> str:
    """`body` as the one anonymous PL/pgSQL block of a migration script."""
    return f"\nDO $migrate$\nBEGIN{body}\nEND\n$migrate$;\n"


def _rename_legacy(old: str, new: str, trigger: str | None = None) -> str:
    """PL/pgSQL renaming the <=0.8.0 table `old` to `new` (and dropping its notify trigger
    and function `trigger`), unless `new` exists already. `old` is quoted: depeche-db
    created it through SQLAlchemy, which keeps the case of a name with capitals."""
    drop_trigger = f"\n    DROP TRIGGER IF EXISTS {trigger} ON {new};" if trigger else ""
    drop_function = f"\n  DROP FUNCTION IF EXISTS {trigger}() CASCADE;" if trigger else ""
    return f"""
  IF to_regclass('"{old}"') IS NOT NULL AND to_regclass('{new}') IS NULL THEN
    ALTER TABLE "{old}" RENAME TO {new};{drop_trigger}
  END IF;{drop_function}"""


def stream_migration_ddl(agg: str, store: str | None) -> str:
    """The migration script of aggregated stream `agg` (over store `store`, if known)."""
    _names.validate_name(agg, "aggregated stream name")
    t = _names.stream_table(agg)
    if store is not None:
        _names.validate_name(store, "store name")
        fill = f"""
      UPDATE {t} AS agg
         SET origin_stream_global_position = msg.global_position,
             origin_stream_added_at = msg.added_at
        FROM {_names.message_table(store)} AS msg
       WHERE agg.message_id = msg.message_id;
      ALTER TABLE {t}
        ALTER COLUMN origin_stream_global_position SET NOT NULL,
        ALTER COLUMN origin_stream_added_at SET NOT NULL;"""
    else:
        fill = f"""
      RAISE EXCEPTION 'aggregated stream {agg} has the depeche-db 0.8-0.10 layout: pass '
        'message_store_name to get_migration_ddl/migrate_db_objects (or --store) so the '
        'origin global positions can be filled in';"""
    add_columns = f"""
  IF to_regclass('{t}') IS NOT NULL AND NOT EXISTS (
      SELECT 1 FROM pg_attribute WHERE attrelid = '{t}'::regclass
         AND attname = 'origin_stream_global_position' AND NOT attisdropped) THEN
    ALTER TABLE {t}
      ADD COLUMN origin_stream_global_position bigint NULL,
      ADD COLUMN origin_stream_added_at timestamp NULL;{fill}
  END IF;"""
    rename = _rename_legacy(f"{agg}_projected_stream", t, f"{agg}_stream_notify_message_inserted")
    return _do(rename + add_columns) + f"{schema.stream_ddl(agg)}\n"


def store_migration_ddl(store: str) -> str:
    """The migration script of store `store` (from the <=0.8.0 `<store>_messages` table)."""
    _names.validate_name(store, "store name")
    t = _names.message_table(store)
    rename = _rename_legacy(f"{store}_messages", t, f"{store}_notify_message_inserted")
    drop = f"\n  DROP FUNCTION IF EXISTS {store}_write_message CASCADE;"
    return _do(rename + drop) + f"{schema.store_ddl(store)}\n"


def subscription_migration_ddl(name: str) -> str:
    """The migration script of subscription state table `name` (from <=0.8.0)."""
    _names.validate_name(name, "subscription state name")
    return _do(_rename_legacy(f"{name}_subscription_state", _names.subscription_table(name)))


def depeche_db_0_14_ddl(store: str, streams: list[str]) -> str:
    """Create or repair depeche-db 0.14's tables: the store's per-stream `_meta` and each
    aggregated stream's per-origin-stream `_omax`, filled from the rows themselves.

    Our triggers keep both tables from then on, for every writer and projector. The
    fill runs under locks that make it exact: SHARE on the message table (writers wait
    for it; it waits for writes in flight, so no committed message is missed) and
    EXCLUSIVE on each aggregated table (the lock both libraries' projectors take).
    depeche-db 0.14 creating the tables itself has no such locks: a write or projection
    committing while it fills them is missed by the fill (docs/migrating-from-depeche-db.md).
    Rows are set to what the tables hold (and rows of streams no longer there deleted),
    so running it again repairs them, e.g. after a `truncate()`.
    """
    _names.validate_name(store, "store name")
    msgs = _names.message_table(store)
    meta = _names.meta_table(store)
    parts = [
        f"""
LOCK TABLE {msgs} IN SHARE MODE;
CREATE TABLE IF NOT EXISTS {meta} (
    stream varchar(255) PRIMARY KEY,
    min_global_position integer NOT NULL,
    max_global_position integer NOT NULL
);
INSERT INTO {meta} AS m (stream, min_global_position, max_global_position)
SELECT stream, min(global_position), max(global_position) FROM {msgs}
 GROUP BY stream ORDER BY stream
ON CONFLICT (stream) DO UPDATE
   SET min_global_position = EXCLUDED.min_global_position,
       max_global_position = EXCLUDED.max_global_position
 WHERE (m.min_global_position, m.max_global_position)
       IS DISTINCT FROM (EXCLUDED.min_global_position, EXCLUDED.max_global_position);
DELETE FROM {meta} AS m
 WHERE NOT EXISTS (SELECT 1 FROM {msgs} AS s WHERE s.stream = m.stream);"""
    ]
    for agg in streams:
        t = _names.stream_table(_names.validate_name(agg, "aggregated stream name"))
        omax = _names.omax_table(agg)
        parts.append(f"""
LOCK TABLE {t} IN EXCLUSIVE MODE;
CREATE TABLE IF NOT EXISTS {omax} (
    origin_stream varchar(255) PRIMARY KEY,
    max_aggregated_origin_global_position integer NOT NULL
);
INSERT INTO {omax} AS o (origin_stream, max_aggregated_origin_global_position)
SELECT origin_stream, max(origin_stream_global_position) FROM {t}
 GROUP BY origin_stream ORDER BY origin_stream
ON CONFLICT (origin_stream) DO UPDATE
   SET max_aggregated_origin_global_position = EXCLUDED.max_aggregated_origin_global_position
 WHERE o.max_aggregated_origin_global_position
       IS DISTINCT FROM EXCLUDED.max_aggregated_origin_global_position;
DELETE FROM {omax} AS o
 WHERE NOT EXISTS (SELECT 1 FROM {t} AS a WHERE a.origin_stream = o.origin_stream);""")
    return "\n".join(parts) + "\n"
