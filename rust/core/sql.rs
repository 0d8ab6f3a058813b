//! The SQL the projector runs. Table names come from validated identifiers only.

use crate::config::TableNames;

/// The projector mutex's advisory lock class: "dprp" (the key's high 32 bits).
pub const MUTEX_CLASS: i64 = 0x6470_7270;

/// Tries the projector mutex: a session-level advisory lock keyed by the aggregated
/// table's OID (class [`MUTEX_CLASS`] in the high 32 bits). Returns whether it was taken
/// and the key, to release exactly that key even if the table is dropped meanwhile.
///
/// An advisory lock, not a table lock, because every table lock that excludes itself
/// also excludes `SHARE UPDATE EXCLUSIVE`, which autovacuum and ANALYZE take: with a
/// table lock, a vacuum of the aggregated table (minutes on a large one) stops
/// projection, as `NOWAIT` never makes autovacuum yield. Session-level, and taken
/// before the transaction, so the batch's snapshot is taken after the previous holder
/// committed.
pub fn try_mutex(t: &TableNames) -> String {
    format!(
        "SELECT pg_try_advisory_lock(k), k FROM (SELECT ({MUTEX_CLASS}::int8 << 32) \
         | '{}'::regclass::oid::int8 AS k) AS key",
        t.stream
    )
}

/// Releases the projector mutex taken with key `key`.
pub fn release_mutex(key: i64) -> String {
    format!("SELECT pg_advisory_unlock({key}::int8)")
}

/// Starts a batch: a repeatable-read transaction whose snapshot is taken after the
/// mutex and the table lock. `ROW EXCLUSIVE` (what the batch's INSERT takes anyway)
/// conflicts with the `EXCLUSIVE` lock depeche-db's projector (and depeche-rs 0.1.0's)
/// takes for the same purpose, so projectors of every kind exclude each other, and with
/// nothing autovacuum takes.
///
/// The batch commits without waiting for its WAL flush (`synchronous_commit = off`). A
/// server crash can lose the last batches committed that way, each whole with its
/// cursors, and they are projected again after recovery: nothing is lost or doubled.
/// Nothing that depends on them can outlive them either: WAL is one sequence, so a
/// later commit that is durable (a handler's transaction, a synchronous acknowledgement)
/// makes every batch committed before it durable, on this server and on a standby.
pub fn begin(t: &TableNames) -> String {
    format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL synchronous_commit = off; \
         LOCK TABLE {} IN ROW EXCLUSIVE MODE NOWAIT",
        t.stream
    )
}

/// What the batch needs to know about the database, read in its snapshot: the
/// snapshot itself, the highest and lowest visible global positions, where cursors are written (the
/// cluster's identity, whose transaction ids the snapshot holds, and the aggregated
/// table's OID), and the settings of the store's sequence.
///
/// Parameter: `$1` the sequence's name. `pg_control_system()` is public in stock
/// PostgreSQL; where an administrator revoked it the identity reads as NULL.
pub fn read_state(t: &TableNames) -> String {
    format!(
        "SELECT pg_current_snapshot()::text, \
                (SELECT max(global_position)::int8 FROM {msgs}), \
                CASE WHEN has_function_privilege('pg_control_system()', 'EXECUTE') \
                     THEN (SELECT system_identifier FROM pg_control_system()) END, \
                '{agg}'::regclass::oid::int8, s.seqcache, s.seqincrement, \
                (SELECT min(global_position)::int8 FROM {msgs}) \
         FROM (SELECT 1) AS one LEFT JOIN pg_sequence AS s ON s.seqrelid = to_regclass($1::text)",
        msgs = t.messages,
        agg = t.stream,
    )
}

/// The stored cursors of the given wildcards (`$1`).
pub fn read_cursors(t: &TableNames) -> String {
    format!(
        "SELECT wildcard, global_position, snapshot::text, system_identifier, table_oid \
         FROM {} WHERE wildcard = ANY($1::text[])",
        t.cursor
    )
}

const CANDIDATE_COLUMNS: &str = "m.message_id, m.stream::text, m.version::int8, \
    m.global_position::int8, m.added_at, (m.occurred_at AT TIME ZONE 'UTC'), \
    CASE WHEN $5::bool OR m.occurred_at IS NULL THEN m.message::text END";

/// `NOT EXISTS` on the primary key makes re-reads harmless. Its `OFFSET 0` keeps it a
/// per-row primary-key probe: as an anti-join the planner may hash the whole aggregated
/// table on every batch.
fn not_projected(t: &TableNames) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM {} AS a WHERE a.message_id = m.message_id OFFSET 0)",
        t.stream
    )
}

/// Unprojected messages above a cursor, in global-position order.
///
/// Parameters: `$1` the cursor position, `$2` the upper end of the window scanned above
/// it, `$3` wildcards, `$4` limit, `$5` whether message bodies are needed for every row.
/// The window keeps every scan an index range scan of bounded size, whatever the table
/// statistics say.
pub fn candidates_above(t: &TableNames) -> String {
    format!(
        "SELECT {CANDIDATE_COLUMNS} FROM {msgs} AS m \
          WHERE m.global_position > $1::int8 AND m.global_position <= $2::int8 \
            AND m.stream LIKE ANY($3::text[]) AND {absent} \
          ORDER BY m.global_position LIMIT $4::int8",
        msgs = t.messages,
        absent = not_projected(t),
    )
}

/// Unprojected messages at or below a cursor that were not visible in its snapshot
/// (docs/projector.md: the only ones that can be missing there).
///
/// Parameters: `$1` the cursor position, `$2` the snapshot's in-progress ids (`xip`, as
/// text), `$3` wildcards, `$4` limit, `$5` as above, `$6` the snapshot's `xmax`, `$7` the
/// current snapshot's `xmax`. A row not visible in the snapshot was written by a
/// transaction in progress then (`xip`) or one that started after it (`tx >= xmax`). The
/// second range ends at the current `xmax`: no row of this cluster visible now has a
/// higher id, so what lies above can only carry ids of another cluster (a restored dump),
/// which must not be re-read on every batch. Both are probes of the `tx` index whose size
/// does not depend on transactions held open elsewhere (those only hold `xmin` back);
/// `MATERIALIZED` keeps the planner from trading them for a walk along the global
/// position index in search of the `LIMIT`.
pub fn candidates_late(t: &TableNames) -> String {
    let branch = |condition: &str| {
        format!(
            "SELECT {CANDIDATE_COLUMNS} FROM {msgs} AS m \
              WHERE {condition} AND m.global_position <= $1::int8 \
                AND m.stream LIKE ANY($3::text[])",
            msgs = t.messages,
        )
    };
    format!(
        "WITH late AS MATERIALIZED ({in_progress} UNION ALL {started_after}) \
         SELECT * FROM late AS m WHERE {absent} ORDER BY 4 LIMIT $4::int8",
        in_progress = branch("m.tx = ANY($2::text[]::xid8[])"),
        started_after = branch("m.tx >= $6::text::xid8 AND m.tx < $7::text::xid8"),
        absent = not_projected(t),
    )
}

/// The lowest visible global position above `$1`.
pub fn next_position(t: &TableNames) -> String {
    format!(
        "SELECT min(global_position)::int8 FROM {} WHERE global_position > $1::int8",
        t.messages
    )
}

/// Bulk insert of a batch's rows, with their positions reserved in the same statement.
///
/// `$1`-`$8` are the rows as arrays, in batch order, except that `$5` is not the
/// position but its offset from the partition's new maximum (`-(k - 1) ..= 0` for a
/// partition with `k` rows in the batch). `$9`/`$10` are each partition of the batch
/// once and its number of rows. The `_maxpos` upsert adds the counts to the partitions'
/// maxima (a partition without a row starts at -1) and returns the new maxima, so a row
/// lands at `max + offset`. One statement, so the batch's writes, cursor and `COMMIT`
/// go to the server in one flight. A row whose partition was not reserved would get a
/// NULL position, which the column's `NOT NULL` refuses: it cannot be dropped silently.
pub fn insert_rows(t: &TableNames) -> String {
    format!(
        "WITH reserved AS ( \
             INSERT INTO {maxpos} AS m (partition, max_position) \
             SELECT p, n - 1 FROM unnest($9::int8[], $10::int8[]) AS u(p, n) \
             ON CONFLICT (partition) DO UPDATE \
                 SET max_position = m.max_position + EXCLUDED.max_position + 1 \
             RETURNING m.partition, m.max_position::int8) \
         INSERT INTO {agg} (message_id, origin_stream, origin_stream_version, partition, \
                            position, message_occurred_at, origin_stream_global_position, \
                            origin_stream_added_at) \
         SELECT u.id, u.stream, u.version, u.p, r.max_position + u.off, u.occurred, u.global, \
                u.added \
           FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::int8[], $5::int8[], \
                       $6::timestamp[], $7::int8[], $8::timestamp[]) \
                AS u(id, stream, version, p, off, occurred, global, added) \
           LEFT JOIN reserved AS r ON r.partition = u.p",
        maxpos = t.maxpos,
        agg = t.stream,
    )
}

/// Upsert of the cursors of the given wildcards: `$1` wildcards, `$2` positions,
/// `$3` the batch's snapshot, `$4` the cluster's identity, `$5` the aggregated table's OID.
pub fn upsert_cursors(t: &TableNames) -> String {
    format!(
        "INSERT INTO {} (wildcard, global_position, snapshot, system_identifier, table_oid, \
                         updated_at) \
         SELECT w, p, $3::text::pg_snapshot, $4::int8, $5::int8, now() \
           FROM unnest($1::text[], $2::int8[]) AS u(w, p) \
         ON CONFLICT (wildcard) DO UPDATE SET global_position = EXCLUDED.global_position, \
             snapshot = EXCLUDED.snapshot, system_identifier = EXCLUDED.system_identifier, \
             table_oid = EXCLUDED.table_oid, updated_at = EXCLUDED.updated_at",
        t.cursor
    )
}
