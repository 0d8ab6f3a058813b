//! The SQL of the subscription read path. Table names come from validated identifiers
//! only; every parameter is cast, so tables depeche-db created (integer columns) and
//! ours (bigint) read alike.

use crate::config::SubscriptionTables;

pub const LOCK: &str = "SELECT pg_try_advisory_lock($1::int8)";
pub const UNLOCK: &str = "SELECT pg_advisory_unlock($1::int8)";
const BATCH_COLUMNS: &str = "a.position::int8, m.message_id, m.stream::text, \
    m.version::int8, m.message::text, m.global_position::int8, m.added_at";

/// Acknowledgements never move a position backwards: an acknowledgement of ours still
/// in flight must not undo a later one the handler committed in its own transaction.
pub fn ack_sql(state: &str) -> String {
    format!(
        "INSERT INTO {state} AS s (subscription_name, partition, position) \
         VALUES ($1::text, $2::int8, $3::int8) \
         ON CONFLICT (subscription_name, partition) DO UPDATE SET position = excluded.position \
         WHERE s.position < excluded.position"
    )
}

pub fn position_sql(state: &str) -> String {
    format!(
        "SELECT position::int8 FROM {state} \
         WHERE subscription_name = $1::text AND partition = $2::int8"
    )
}

/// The partition's stored position and the batch after it, in one statement that runs
/// after the lock is granted. Always one row (the position) even when nothing follows.
pub fn read_with_state_sql(t: &SubscriptionTables, state: &str) -> String {
    format!(
        "SELECT s.pos, {BATCH_COLUMNS} \
         FROM (SELECT coalesce((SELECT position FROM {state} \
               WHERE subscription_name = $1::text AND partition = $2::int8), -1)::int8 AS pos) AS s \
         LEFT JOIN LATERAL (SELECT position, message_id FROM {agg} \
               WHERE partition = $2::int8 AND position > s.pos ORDER BY position LIMIT $3::int8) AS a \
               ON true \
         LEFT JOIN {msgs} AS m ON m.message_id = a.message_id \
         ORDER BY a.position",
        agg = t.stream,
        msgs = t.messages,
    )
}

/// The batch after a position the caller read from its own state provider.
pub fn read_after_sql(t: &SubscriptionTables) -> String {
    format!(
        "SELECT $2::int8, {BATCH_COLUMNS} \
         FROM (SELECT position, message_id FROM {agg} \
               WHERE partition = $1::int8 AND position > $2::int8 ORDER BY position LIMIT $3::int8) AS a \
         LEFT JOIN {msgs} AS m ON m.message_id = a.message_id \
         ORDER BY a.position",
        agg = t.stream,
        msgs = t.messages,
    )
}

/// The partitions with messages after the subscription's stored position: their max
/// position and the stored one (-1 if none). Only those: a stream with thousands of
/// partitions, mostly caught up, answers with a few rows.
pub fn partitions_with_state_sql(t: &SubscriptionTables, state: &str) -> String {
    format!(
        "SELECT p.partition::int8, p.max_position::int8, coalesce(s.position, -1)::int8 \
         FROM {maxpos} AS p \
         LEFT JOIN {state} AS s ON s.subscription_name = $1::text AND s.partition = p.partition \
         WHERE p.max_position > coalesce(s.position, -1)",
        maxpos = t.maxpos,
    )
}

pub fn partitions_sql(t: &SubscriptionTables) -> String {
    format!(
        "SELECT partition::int8, max_position::int8, -1::int8 FROM {}",
        t.maxpos
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(state: Option<&str>) -> SubscriptionTables {
        SubscriptionTables::new("shop", "orders", state).unwrap()
    }

    #[test]
    fn acknowledgements_never_move_backwards() {
        let sql = ack_sql("depeche_subscriptions_x");
        assert!(sql.starts_with("INSERT INTO depeche_subscriptions_x AS s "));
        assert!(sql.ends_with("WHERE s.position < excluded.position"));
    }

    #[test]
    fn reads_name_every_table_and_limit_the_batch() {
        let t = tables(Some("depeche_subscriptions_x"));
        let with_state = read_with_state_sql(&t, "depeche_subscriptions_x");
        for name in [
            "depeche_subscriptions_x",
            "depeche_stream_orders ",
            "depeche_msgs_shop ",
        ] {
            assert!(
                with_state.contains(name),
                "{name} missing from {with_state}"
            );
        }
        assert!(with_state.contains("LIMIT $3::int8"));
        let after = read_after_sql(&t);
        assert!(after.contains("position > $2::int8") && after.contains("LIMIT $3::int8"));
        assert!(partitions_with_state_sql(&t, "depeche_subscriptions_x")
            .contains("FROM depeche_stream_orders_maxpos AS p"));
        assert!(partitions_sql(&t).ends_with("FROM depeche_stream_orders_maxpos"));
    }
}
