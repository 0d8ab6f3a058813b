"""The database objects: tables compatible with depeche-db 0.13, plus our additive ones.

Creation is idempotent and safe when several processes start at once: each object set
is created under a transaction-level advisory lock, and skipped entirely when the
table's comment says it is already at our schema version (so constructing a store never
queues an ACCESS EXCLUSIVE lock behind a long transaction).
"""

from __future__ import annotations

import sqlalchemy as sa

from .. import _names
from .._exceptions import OCC_SQLSTATE
from .connection import connect, execute_script

SCHEMA_VERSION = "depeche-rs schema 6"

# The same expression depeche-db's write function uses, so both writers serialise on the
# same per-stream lock.
STREAM_LOCK_KEY = "left('x' || md5({stream}), 17)::bit(64)::bigint"


# Shared by every store and stream (their names are fixed), so that no derived name
# grows with the store's or stream's name.
STAMP_TX_FUNCTION = """CREATE OR REPLACE FUNCTION depeche_rs_stamp_tx() RETURNS trigger AS $$
BEGIN
  NEW.tx := pg_current_xact_id();
  RETURN NEW;
END;
$$ LANGUAGE plpgsql;"""

# The projector mutex (rust/core/sql.rs `try_mutex`): an advisory lock keyed by the
# aggregated table's OID under class "dprp". The projector's table lock (ROW EXCLUSIVE)
# does not make a DELETE wait (no table lock can without making autovacuum wait too), so
# a plain DELETE of projected rows (depeche-db's `truncate()` takes no lock of its own)
# can run while a batch commits. The DELETE reads in its statement's snapshot, noted by
# a BEFORE trigger; its AFTER trigger waits for the batch (the mutex), then deletes the
# rows committed after that snapshot too and resets the cursors. The outcome is the one
# of a DELETE that waited for the batch: rows projected again in order, none lost or
# doubled (docs/projector.md, A5).
PROJECTOR_MUTEX_CLASS = 0x64707270

# STABLE: it runs in the DELETE statement's own snapshot (a volatile function would take
# a new one), which `pg_current_snapshot()` returns; kept for the AFTER trigger.
NOTE_SNAPSHOT_FUNCTION = """
CREATE OR REPLACE FUNCTION depeche_rs_note_snapshot() RETURNS trigger AS $$
BEGIN
  PERFORM set_config('depeche_rs.delete_snapshot', pg_current_snapshot()::text, true);
  RETURN NULL;
END;
$$ LANGUAGE plpgsql STABLE;"""

# The 64-bit id of a row's `xmin` (a 32-bit id less than 2^31 transactions old, which
# wraparound protection guarantees): the latest id with those low 32 bits up to now.
# Frozen and bootstrap ids (below 3) are older than any snapshot.
XID8_FUNCTION = """
CREATE OR REPLACE FUNCTION depeche_rs_xid8(x xid) RETURNS xid8 AS $$
  SELECT CASE WHEN x::text::int8 < 3 THEN '3'::xid8
         ELSE (c - ((c % 4294967296) - x::text::int8 + 4294967296) % 4294967296)::text::xid8
         END
    FROM (SELECT pg_current_xact_id()::text::int8 AS c) AS now
$$ LANGUAGE sql VOLATILE;"""

RESET_CURSOR_FUNCTION = f"""
CREATE OR REPLACE FUNCTION depeche_rs_reset_cursor() RETURNS trigger AS $$
DECLARE
  seen text := current_setting('depeche_rs.delete_snapshot', true);
  raced boolean;
BEGIN
  PERFORM pg_advisory_xact_lock(({PROJECTOR_MUTEX_CLASS}::int8 << 32) | TG_RELID::int8);
  -- Every batch that inserts rows writes its cursors: a cursor row newer than the
  -- DELETE's snapshot says a batch committed during the DELETE (rare; the full scan of
  -- the table happens only then).
  IF TG_OP = 'DELETE' AND pg_trigger_depth() = 1 AND coalesce(seen, '') <> '' THEN
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I.%I AS c WHERE NOT '
                   'pg_visible_in_snapshot(depeche_rs_xid8(c.xmin), $1::pg_snapshot))',
                   TG_TABLE_SCHEMA, TG_ARGV[0])
      INTO raced USING seen;
    IF raced THEN
      EXECUTE format('DELETE FROM %I.%I AS a WHERE NOT pg_visible_in_snapshot('
                     'depeche_rs_xid8(a.xmin), $1::pg_snapshot)', TG_TABLE_SCHEMA, TG_TABLE_NAME)
        USING seen;
    END IF;
  END IF;
  EXECUTE format('DELETE FROM %I.%I', TG_TABLE_SCHEMA, TG_ARGV[0]);
  RETURN NULL;
END;
$$ LANGUAGE plpgsql;"""

# One notification per message, as depeche-db's row trigger sends, with the same payload;
# one statement-level trigger over the transition table sends them in global position
# order. The channel is the trigger's argument, so one function serves every store.
NOTIFY_MESSAGES_FUNCTION = """
CREATE OR REPLACE FUNCTION depeche_rs_notify_messages() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify(TG_ARGV[0], json_build_object(
      'message_id', n.message_id, 'stream', n.stream,
      'version', n.version, 'global_position', n.global_position)::text)
  FROM (SELECT message_id, stream, version, global_position
          FROM new_rows ORDER BY global_position) AS n;
  RETURN NULL;
END;
$$ LANGUAGE plpgsql;"""

# One notification per partition per statement, carrying its highest position (what
# depeche-db's subscribers read: partition and position). The payload is the text
# json_build_object gives, written out: a uuid and two integers need no escaping, and
# at a thousand partitions per projector batch the concatenation costs half as much.
NOTIFY_PARTITIONS_FUNCTION = """
CREATE OR REPLACE FUNCTION depeche_rs_notify_partitions() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify(TG_ARGV[0], '{"message_id" : "' || n.message_id
      || '", "partition" : ' || n.partition || ', "position" : ' || n.position || '}')
  FROM (SELECT DISTINCT ON (partition) message_id, partition, position
          FROM new_rows ORDER BY partition, position DESC) AS n;
  RETURN NULL;
END;
$$ LANGUAGE plpgsql;"""

# depeche-db 0.14 keeps two more tables that its projector reads to find work:
# `depeche_msgs_<store>_meta` (per stream: first and highest global position written),
# kept by its row trigger on the message table, and `depeche_stream_<agg>_omax` (per
# origin stream: highest global position projected), kept by its projector. Whoever
# writes or projects must keep them, or depeche-db 0.14 misses messages (meta behind)
# or projects a message twice (omax behind). These statement-level triggers keep them
# for every insert (ours, depeche-db's, an operator's), with depeche-db's semantics
# (min set once, max only grows), and cost one catalog lookup where the table does not
# exist. Rows are upserted in key order, so concurrent statements lock them in one order.
# Like depeche-db's trigger they are not ENABLE ALWAYS: a logical-replication subscriber
# gets these tables' rows from the publisher, not from its apply worker's inserts.
UPKEEP_META_FUNCTION = """
CREATE OR REPLACE FUNCTION depeche_rs_upkeep_meta() RETURNS trigger AS $$
BEGIN
  IF to_regclass(format('%I.%I', TG_TABLE_SCHEMA, TG_ARGV[0])) IS NULL THEN
    RETURN NULL;
  END IF;
  EXECUTE format(
    'INSERT INTO %1$I.%2$I AS m (stream, min_global_position, max_global_position) '
    'SELECT stream, min(global_position), max(global_position) FROM new_rows '
    'GROUP BY stream ORDER BY stream '
    'ON CONFLICT (stream) DO UPDATE SET max_global_position = '
    'GREATEST(m.max_global_position, EXCLUDED.max_global_position) '
    'WHERE m.max_global_position < EXCLUDED.max_global_position',
    TG_TABLE_SCHEMA, TG_ARGV[0]);
  RETURN NULL;
END;
$$ LANGUAGE plpgsql;"""

UPKEEP_OMAX_FUNCTION = """
CREATE OR REPLACE FUNCTION depeche_rs_upkeep_omax() RETURNS trigger AS $$
BEGIN
  IF to_regclass(format('%I.%I', TG_TABLE_SCHEMA, TG_ARGV[0])) IS NULL THEN
    RETURN NULL;
  END IF;
  EXECUTE format(
    'INSERT INTO %1$I.%2$I AS o (origin_stream, max_aggregated_origin_global_position) '
    'SELECT origin_stream, max(origin_stream_global_position) FROM new_rows '
    'GROUP BY origin_stream ORDER BY origin_stream '
    'ON CONFLICT (origin_stream) DO UPDATE SET max_aggregated_origin_global_position = '
    'GREATEST(o.max_aggregated_origin_global_position, '
    'EXCLUDED.max_aggregated_origin_global_position) '
    'WHERE o.max_aggregated_origin_global_position '
    '< EXCLUDED.max_aggregated_origin_global_position',
    TG_TABLE_SCHEMA, TG_ARGV[0]);
  RETURN NULL;
END;
$$ LANGUAGE plpgsql;"""

# Every DDL script takes this one lock: the shared functions above are replaced by each.
DDL_LOCK_KEY = "ddl"


def lock_sql(key: str = DDL_LOCK_KEY) -> str:
    """The transaction lock our DDL of `key` (a table name, or all: `DDL_LOCK_KEY`) runs
    under, so that processes starting at once create objects one after the other."""
    return f"SELECT pg_advisory_xact_lock(hashtext('depeche_rs:{key}'))"


def _is_current(conn: sa.Connection, table: str) -> bool:
    comment = conn.execute(
        sa.text("SELECT obj_description(to_regclass(:t), 'pg_class')"), {"t": table}
    ).scalar()
    return comment == SCHEMA_VERSION


def _on_inserted_rows(function: str, table: str, argument: str) -> str:
    """The statement-level trigger calling `function` with `argument` after an insert into
    `table`, its rows as `new_rows`; named after the function."""
    return f"""DROP TRIGGER IF EXISTS {function} ON {table};
CREATE TRIGGER {function}
  AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION {function}('{argument}');"""


def _drop_per_name_notify(table: str, name: str) -> str:
    """Drop the per-name trigger and function of schema 2 (replaced by shared ones).

    Schema 2 only made them for names up to 38 characters, whose derived names fit; a
    longer name is never truncated here, since its truncation could be another name's.
    """
    if not _names.fits(name):
        return ""
    return f"DROP TRIGGER IF EXISTS {name} ON {table};\nDROP FUNCTION IF EXISTS {name}();"


def store_ddl(store: str) -> str:
    """DDL bringing store `store` to our layout (idempotent, additive)."""
    _names.validate_name(store, "store name")
    t = _names.message_table(store)
    seq = _names.global_sequence(store)
    channel = _names.store_channel(store)
    lock_key = STREAM_LOCK_KEY.format(stream="stream")
    legacy_lock_key = STREAM_LOCK_KEY.format(stream=f"depeche_write_message_{store}.stream")
    return f"""
CREATE SEQUENCE IF NOT EXISTS {seq};
CREATE TABLE IF NOT EXISTS {t} (
    message_id uuid PRIMARY KEY,
    global_position bigint NOT NULL DEFAULT nextval('{seq}'),
    added_at timestamp without time zone NOT NULL DEFAULT now(),
    stream varchar(255) NOT NULL,
    version integer NOT NULL,
    message jsonb NOT NULL,
    UNIQUE (global_position),
    CONSTRAINT {t}_version_uq UNIQUE (stream, version)
);
ALTER TABLE {t} ADD COLUMN IF NOT EXISTS tx xid8;
ALTER TABLE {t} ALTER COLUMN tx SET DEFAULT pg_current_xact_id();
ALTER TABLE {t} ADD COLUMN IF NOT EXISTS occurred_at timestamptz;
CREATE INDEX IF NOT EXISTS {t}_tx_ix ON {t} (tx);
-- The projector trusts `tx` to be the id of the transaction that wrote the row on this
-- cluster (docs/projector.md, assumption A1), so nothing else may set it: not an
-- explicit value, not COPY, not a logical-replication apply worker (hence ENABLE
-- ALWAYS: it runs with session_replication_role = replica). The NOT VALID check turns
-- inserts that bypass the trigger (triggers disabled, as `pg_restore --disable-triggers`
-- does) into errors; pg_dump restores it after the data, so restores still load.
{STAMP_TX_FUNCTION}
DROP TRIGGER IF EXISTS depeche_rs_stamp_tx ON {t};
CREATE TRIGGER depeche_rs_stamp_tx BEFORE INSERT OR UPDATE ON {t}
  FOR EACH ROW EXECUTE FUNCTION depeche_rs_stamp_tx();
ALTER TABLE {t} ENABLE ALWAYS TRIGGER depeche_rs_stamp_tx;
ALTER TABLE {t} DROP CONSTRAINT IF EXISTS depeche_rs_tx_is_local;
ALTER TABLE {t} ADD CONSTRAINT depeche_rs_tx_is_local
  CHECK (tx IS NOT DISTINCT FROM pg_current_xact_id()) NOT VALID;
-- Per-stream version order needs global positions drawn in commit order within a
-- stream: no per-session caching of sequence values (assumption A3).
ALTER SEQUENCE {seq} CACHE 1;

CREATE OR REPLACE FUNCTION depeche_write_message_{store}(
  message_id uuid,
  stream varchar,
  message json,
  expected_version bigint DEFAULT NULL,
  OUT version bigint,
  OUT global_position bigint
)
AS $$
DECLARE
  _stream_version bigint;
BEGIN
  PERFORM pg_advisory_xact_lock({legacy_lock_key});
  SELECT max(m.version) INTO _stream_version FROM {t} AS m
   WHERE m.stream = depeche_write_message_{store}.stream;
  _stream_version := coalesce(_stream_version, 0);
  IF depeche_write_message_{store}.expected_version IS NOT NULL
     AND depeche_write_message_{store}.expected_version != _stream_version THEN
    RAISE EXCEPTION 'Wrong expected version: % (Stream: %, Stream Version: %)',
      depeche_write_message_{store}.expected_version,
      depeche_write_message_{store}.stream, _stream_version;
  END IF;
  version := _stream_version + 1;
  global_position := nextval('{seq}');
  INSERT INTO {t} (message_id, stream, version, message, global_position)
  VALUES (depeche_write_message_{store}.message_id, depeche_write_message_{store}.stream,
          version, depeche_write_message_{store}.message, global_position);
END;
$$ LANGUAGE plpgsql VOLATILE;

CREATE OR REPLACE FUNCTION depeche_rs_write_{store}(
  p_ids uuid[],
  p_stream varchar,
  p_messages jsonb[],
  p_occurred timestamptz[],
  p_expected_version bigint,
  OUT version bigint,
  OUT global_position bigint
)
AS $$
DECLARE
  _current bigint;
BEGIN
  PERFORM pg_advisory_xact_lock({lock_key.replace("stream", "p_stream")});
  SELECT max(m.version) INTO _current FROM {t} AS m WHERE m.stream = p_stream;
  _current := coalesce(_current, 0);
  IF p_expected_version IS NOT NULL AND p_expected_version != _current THEN
    RAISE EXCEPTION 'Wrong expected version: % (Stream: %, Stream Version: %)',
      p_expected_version, p_stream, _current
      USING ERRCODE = '{OCC_SQLSTATE}', DETAIL = _current::text, HINT = 'depeche_rs:occ';
  END IF;
  -- Global positions are drawn in version order (the subquery is sorted), which keeps
  -- a stream's global positions increasing with its versions.
  INSERT INTO {t} (message_id, stream, version, message, occurred_at, global_position)
  SELECT u.id, p_stream, _current + u.ord, u.msg, u.occ, nextval('{seq}')
    FROM (SELECT * FROM unnest(p_ids, p_messages, p_occurred) WITH ORDINALITY
            AS x(id, msg, occ, ord) ORDER BY x.ord) AS u;
  version := _current + coalesce(array_length(p_ids, 1), 0);
  global_position := currval('{seq}');
END;
$$ LANGUAGE plpgsql VOLATILE;

{NOTIFY_MESSAGES_FUNCTION}
DROP TRIGGER IF EXISTS {_names.pg_identifier(f"depeche_storage_new_msg_{store}")} ON {t};
{_drop_per_name_notify(t, f"depeche_rs_msgs_notify_{store}")}
{_on_inserted_rows("depeche_rs_notify_messages", t, channel)}
-- depeche-db 0.14's row trigger (dropped above: it notifies too) kept its meta table.
{UPKEEP_META_FUNCTION}
{_on_inserted_rows("depeche_rs_upkeep_meta", t, _names.meta_table(store))}
COMMENT ON TABLE {t} IS '{SCHEMA_VERSION}';
"""


def stream_ddl(agg: str) -> str:
    """DDL bringing aggregated stream `agg` to our layout (idempotent, additive)."""
    _names.validate_name(agg, "aggregated stream name")
    t = _names.stream_table(agg)
    maxpos = _names.maxpos_table(agg)
    cursor = _names.cursor_table(agg)
    channel = _names.stream_channel(agg)
    # depeche-db's (SQLAlchemy's) name when it fits PostgreSQL's 63 bytes, else a short one
    # that cannot collide with another stream's truncated name.
    gp_index = f"ix_{t}_origin_stream_global_position"
    if len(gp_index) > 63:
        gp_index = f"{t}_ogp_ix"
    return f"""
CREATE TABLE IF NOT EXISTS {t} (
    message_id uuid PRIMARY KEY,
    origin_stream varchar(255) NOT NULL,
    origin_stream_version integer NOT NULL,
    partition integer NOT NULL,
    position bigint NOT NULL,
    message_occurred_at timestamp without time zone NOT NULL,
    origin_stream_global_position bigint NOT NULL,
    origin_stream_added_at timestamp without time zone NOT NULL,
    CONSTRAINT {t}_uq UNIQUE (partition, position)
);
CREATE INDEX IF NOT EXISTS {gp_index} ON {t} (origin_stream_global_position);
CREATE TABLE IF NOT EXISTS {maxpos} (
    partition integer PRIMARY KEY,
    max_position bigint NOT NULL
);
-- Every batch updates the row of each partition it touches. Room on each page keeps
-- those updates HOT (no new index entry, a short in-page chain) even while a transaction
-- held open anywhere in the cluster keeps the dead versions from being pruned.
ALTER TABLE {maxpos} SET (fillfactor = 10);
-- One cursor per wildcard (docs/projector.md). The single-row cursor of schema 1 knew
-- nothing of wildcards: it is dropped, and the next batch rescans from the start (the
-- primary key makes that harmless).
DO $cursor$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('{cursor}')
              AND attname = 'id' AND NOT attisdropped) THEN
    DROP TABLE {cursor};
  END IF;
END
$cursor$;
CREATE TABLE IF NOT EXISTS {cursor} (
    wildcard text PRIMARY KEY,
    global_position bigint NOT NULL,
    snapshot pg_snapshot,
    system_identifier bigint,
    table_oid bigint,
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- depeche-db layouts before 0.12.3 have no max positions yet.
INSERT INTO {maxpos} (partition, max_position)
SELECT partition, max(position) FROM {t}
 WHERE NOT EXISTS (SELECT 1 FROM {maxpos})
 GROUP BY partition;

{NOTIFY_PARTITIONS_FUNCTION}
DROP TRIGGER IF EXISTS {_names.pg_identifier(f"depeche_stream_new_msg_{agg}")} ON {t};
{_drop_per_name_notify(t, f"depeche_rs_stream_notify_{agg}")}
{_on_inserted_rows("depeche_rs_notify_partitions", t, channel)}
-- depeche-db 0.14's projector keeps its omax table itself; ours (and anyone's) through this.
{UPKEEP_OMAX_FUNCTION}
{_on_inserted_rows("depeche_rs_upkeep_omax", t, _names.omax_table(agg))}

-- Whoever deletes projected rows (depeche-db's truncate() is a DELETE, ours too, an
-- operator's TRUNCATE) invalidates the cursors' promise that everything below them is
-- projected: forget them, so the next batch rescans from the start (assumption A5).
{NOTE_SNAPSHOT_FUNCTION}
{XID8_FUNCTION}
{RESET_CURSOR_FUNCTION}
DROP TRIGGER IF EXISTS depeche_rs_note_snapshot ON {t};
CREATE TRIGGER depeche_rs_note_snapshot BEFORE DELETE ON {t}
  FOR EACH STATEMENT EXECUTE FUNCTION depeche_rs_note_snapshot();
ALTER TABLE {t} ENABLE ALWAYS TRIGGER depeche_rs_note_snapshot;
DROP TRIGGER IF EXISTS depeche_rs_reset_cursor ON {t};
CREATE TRIGGER depeche_rs_reset_cursor AFTER DELETE OR TRUNCATE ON {t}
  FOR EACH STATEMENT EXECUTE FUNCTION depeche_rs_reset_cursor('{cursor}');
ALTER TABLE {t} ENABLE ALWAYS TRIGGER depeche_rs_reset_cursor;
COMMENT ON TABLE {t} IS '{SCHEMA_VERSION}';
"""


def _ensure(engine: sa.Engine, table: str, ddl: str) -> None:
    """Apply `ddl` unless `table` is already at our schema version: checked first without
    a lock (the common case costs one query), then again under the advisory lock."""
    with connect(engine) as conn:
        if _is_current(conn, table):
            return
        conn.rollback()
        with conn.begin():
            conn.exec_driver_sql(lock_sql())
            if _is_current(conn, table):
                return
            execute_script(conn, ddl)


def ensure_store(engine: sa.Engine, store: str) -> None:
    """Create or upgrade the store's objects, once, safely under concurrency."""
    _ensure(engine, _names.message_table(store), store_ddl(store))


def ensure_stream(engine: sa.Engine, agg: str) -> None:
    """Create or upgrade the aggregated stream's objects, once, safely under concurrency."""
    _ensure(engine, _names.stream_table(agg), stream_ddl(agg))
