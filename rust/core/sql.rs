//! The SQL the projector runs. Table names come from validated identifiers only.

use crate::core::config::TableNames;

/// Starts a batch: a repeatable-read transaction whose snapshot is taken after the
/// table lock, so it sees everything the previous lock holder committed. The lock
/// mode is the one depeche-db's projector takes, so the two exclude each other too.
pub fn begin(t: &TableNames) -> String {
    format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; LOCK TABLE {} IN EXCLUSIVE MODE NOWAIT",
        t.stream
    )
}

/// The stored cursor, the transaction's snapshot, and the highest visible global position.
pub fn read_cursor(t: &TableNames) -> String {
    format!(
        "SELECT c.global_position, c.snapshot::text, pg_current_snapshot()::text, \
                (SELECT max(global_position)::int8 FROM {msgs}) \
         FROM (SELECT 1) AS one LEFT JOIN {cursor} AS c ON c.id = 1",
        msgs = t.messages,
        cursor = t.cursor,
    )
}

/// The next unprojected messages, in global-position order.
///
/// Parameters: `$1` cursor position, `$2` cursor snapshot (text or NULL), `$3` wildcards,
/// `$4` limit, `$5` whether message bodies are needed for every row, `$6` the upper end
/// of the global-position window scanned above the cursor. The window keeps every scan
/// an index range scan of bounded size, whatever the table statistics say.
///
/// Every matching row that is not yet in the aggregated stream lies above the cursor
/// position, or was written by a transaction still running when the cursor's snapshot
/// was taken (see docs/projector.md). The second branch finds the latter through the
/// `tx` index; `NOT EXISTS` on the primary key makes re-reads harmless. Its `OFFSET 0`
/// keeps it a per-row primary-key probe: as an anti-join the planner may hash the whole
/// aggregated table on every batch.
pub fn candidates(t: &TableNames) -> String {
    let columns = "m.message_id, m.stream::text, m.version::int8, m.global_position::int8, \
                   m.added_at, (m.occurred_at AT TIME ZONE 'UTC'), \
                   CASE WHEN $5::bool OR m.occurred_at IS NULL THEN m.message::text END";
    format!(
        "SELECT * FROM ( \
           (SELECT {columns} FROM {msgs} AS m \
             WHERE m.global_position > $1::int8 AND m.global_position <= $6::int8 \
               AND m.stream LIKE ANY($3::text[]) \
               AND NOT EXISTS (SELECT 1 FROM {agg} AS a WHERE a.message_id = m.message_id OFFSET 0) \
             ORDER BY m.global_position LIMIT $4::int8) \
           UNION ALL \
           (SELECT {columns} FROM {msgs} AS m \
             WHERE $2::text IS NOT NULL \
               AND m.tx >= pg_snapshot_xmin($2::text::pg_snapshot) \
               AND NOT pg_visible_in_snapshot(m.tx, $2::text::pg_snapshot) \
               AND m.global_position <= $1::int8 \
               AND m.stream LIKE ANY($3::text[]) \
               AND NOT EXISTS (SELECT 1 FROM {agg} AS a WHERE a.message_id = m.message_id OFFSET 0) \
             ORDER BY m.global_position LIMIT $4::int8) \
         ) AS c ORDER BY 4 LIMIT $4::int8",
        msgs = t.messages,
        agg = t.stream,
    )
}

/// Current max position of the given partitions.
pub fn read_positions(t: &TableNames) -> String {
    format!(
        "SELECT partition::int8, max_position::int8 FROM {} WHERE partition = ANY($1::int8[])",
        t.maxpos
    )
}

/// Bulk insert of projected rows from arrays (one round trip per batch).
pub fn insert_rows(t: &TableNames) -> String {
    format!(
        "INSERT INTO {} (message_id, origin_stream, origin_stream_version, partition, position, \
                         message_occurred_at, origin_stream_global_position, origin_stream_added_at) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::int8[], $5::int8[], \
                              $6::timestamp[], $7::int8[], $8::timestamp[])",
        t.stream
    )
}

/// Upsert of the per-partition max positions.
pub fn upsert_positions(t: &TableNames) -> String {
    format!(
        "INSERT INTO {} (partition, max_position) SELECT * FROM unnest($1::int8[], $2::int8[]) \
         ON CONFLICT (partition) DO UPDATE SET max_position = EXCLUDED.max_position",
        t.maxpos
    )
}

/// Upsert of the projector cursor.
pub fn upsert_cursor(t: &TableNames) -> String {
    format!(
        "INSERT INTO {} (id, global_position, snapshot, updated_at) \
         VALUES (1, $1::int8, $2::text::pg_snapshot, now()) \
         ON CONFLICT (id) DO UPDATE SET global_position = EXCLUDED.global_position, \
             snapshot = EXCLUDED.snapshot, updated_at = EXCLUDED.updated_at",
        t.cursor
    )
}
