//! What a projector projects: the store, the aggregated stream, wildcards, batch size.

use crate::error::{Error, Result};
use crate::partitioner::BuiltinPartitioner;

/// PostgreSQL keeps the first 63 bytes of an identifier. The name limits themselves are
/// defined once, in Python (`depeche_rs._names`); the engine only checks that the tables
/// it reads and writes are named whole (a truncated name could be another stream's).
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// The largest batch a projector accepts; bounds memory per batch.
pub const MAX_BATCH_SIZE: usize = 100_000;

/// Table and channel names of one aggregated stream over one store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableNames {
    /// `depeche_msgs_<store>`
    pub messages: String,
    /// `depeche_stream_<agg>`
    pub stream: String,
    /// `depeche_stream_<agg>_maxpos`
    pub maxpos: String,
    /// `depeche_stream_<agg>_cursor`: one row per wildcard
    pub cursor: String,
    /// `depeche_msgs_<store>_global_seq`
    pub sequence: String,
}

impl TableNames {
    /// Derive the names; both names must already be valid identifiers.
    pub fn new(store: &str, stream: &str) -> Result<Self> {
        validate_identifier(store, "store name")?;
        validate_identifier(stream, "aggregated stream name")?;
        let names = Self {
            messages: format!("depeche_msgs_{store}"),
            stream: format!("depeche_stream_{stream}"),
            maxpos: format!("depeche_stream_{stream}_maxpos"),
            cursor: format!("depeche_stream_{stream}_cursor"),
            sequence: format!("depeche_msgs_{store}_global_seq"),
        };
        for name in [
            &names.messages,
            &names.stream,
            &names.maxpos,
            &names.cursor,
            &names.sequence,
        ] {
            if name.len() > MAX_IDENTIFIER_BYTES {
                return Err(Error::Config(format!(
                    "{name:?} is {} bytes long; PostgreSQL identifiers hold at most \
                     {MAX_IDENTIFIER_BYTES}: use a shorter store or aggregated stream name",
                    name.len()
                )));
            }
        }
        Ok(names)
    }
}

/// Everything a projector needs to know besides the connection.
#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// Derived table names.
    pub tables: TableNames,
    /// LIKE patterns selecting origin streams, without repetitions.
    pub wildcards: Vec<String>,
    /// Messages per batch (one transaction each).
    pub batch_size: usize,
    /// Built-in partitioner, or `None` when partitions come from the caller.
    pub partitioner: Option<BuiltinPartitioner>,
}

impl ProjectorConfig {
    /// Validate and build a configuration.
    pub fn new(
        store: &str,
        stream: &str,
        wildcards: Vec<String>,
        batch_size: usize,
        partitioner: Option<BuiltinPartitioner>,
    ) -> Result<Self> {
        if wildcards.is_empty() {
            return Err(Error::Config(
                "stream_wildcards is empty: give at least one LIKE pattern such as 'account-%'"
                    .into(),
            ));
        }
        if let Some(w) = wildcards.iter().find(|w| w.is_empty() || w.contains('\0')) {
            return Err(Error::Config(format!(
                "invalid stream wildcard {w:?}: it must be a non-empty LIKE pattern"
            )));
        }
        if batch_size == 0 || batch_size > MAX_BATCH_SIZE {
            return Err(Error::Config(format!(
                "batch size {batch_size} is out of range: use 1..={MAX_BATCH_SIZE}"
            )));
        }
        let mut unique: Vec<String> = Vec::with_capacity(wildcards.len());
        for w in wildcards {
            if !unique.contains(&w) {
                unique.push(w);
            }
        }
        Ok(Self {
            tables: TableNames::new(store, stream)?,
            wildcards: unique,
            batch_size,
            partitioner,
        })
    }
}

/// Names become parts of SQL identifiers, so only `[A-Za-z_][A-Za-z0-9_]*` is accepted.
pub fn validate_identifier(name: &str, what: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{what} {name:?} is not a valid identifier: use ASCII letters, digits and \
             underscores, not starting with a digit"
        )))
    }
}

/// The tables one subscription reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionTables {
    /// `depeche_msgs_<store>`
    pub messages: String,
    /// `depeche_stream_<agg>`
    pub stream: String,
    /// `depeche_stream_<agg>_maxpos`
    pub maxpos: String,
    /// `depeche_subscriptions_<name>`, when the state is kept in the database by the
    /// engine (`None` when a state provider of the caller's keeps it).
    pub state: Option<String>,
}

impl SubscriptionTables {
    /// Derive the names; `state` is the state table's full name.
    pub fn new(store: &str, stream: &str, state: Option<&str>) -> Result<Self> {
        let names = TableNames::new(store, stream)?;
        if let Some(table) = state {
            validate_identifier(table, "subscription state table")?;
            if table.len() > MAX_IDENTIFIER_BYTES {
                return Err(Error::Config(format!(
                    "{table:?} is {} bytes long; PostgreSQL identifiers hold at most \
                     {MAX_IDENTIFIER_BYTES}: use a shorter subscription name",
                    table.len()
                )));
            }
        }
        Ok(Self {
            messages: names.messages,
            stream: names.stream,
            maxpos: names.maxpos,
            state: state.map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_derived() {
        let t = TableNames::new("shop", "orders").unwrap();
        assert_eq!(t.messages, "depeche_msgs_shop");
        assert_eq!(t.stream, "depeche_stream_orders");
        assert_eq!(t.maxpos, "depeche_stream_orders_maxpos");
        assert_eq!(t.cursor, "depeche_stream_orders_cursor");
        assert_eq!(t.sequence, "depeche_msgs_shop_global_seq");
    }

    #[test]
    fn sql_in_names_is_rejected() {
        for bad in ["", "1abc", "a-b", "a;drop table x", "a b", "é"] {
            assert!(TableNames::new(bad, "ok").is_err(), "{bad:?} accepted");
            assert!(TableNames::new("ok", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names_depeche_db_accepts_fit_and_longer_ones_are_rejected() {
        // depeche-db's limits: 39 for stores, 41 for aggregated streams.
        let t = TableNames::new(&"s".repeat(39), &"a".repeat(41)).unwrap();
        assert_eq!(t.sequence.len(), 63);
        assert_eq!(t.cursor.len(), 63);
        assert!(TableNames::new(&"s".repeat(40), "ok").is_err());
        assert!(TableNames::new("ok", &"a".repeat(42)).is_err());
    }

    #[test]
    fn config_rejects_bad_wildcards_and_sizes() {
        assert!(ProjectorConfig::new("s", "a", vec![], 10, None).is_err());
        assert!(ProjectorConfig::new("s", "a", vec![String::new()], 10, None).is_err());
        assert!(ProjectorConfig::new("s", "a", vec!["x%".into()], 0, None).is_err());
        assert!(ProjectorConfig::new("s", "a", vec!["x%".into()], 10, None).is_ok());
    }
}
