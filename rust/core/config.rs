//! What a projector projects: the store, the aggregated stream, wildcards, batch size.

use crate::core::error::{Error, Result};
use crate::core::partitioner::BuiltinPartitioner;

/// Longest store or stream name: the longest derived identifier,
/// `depeche_rs_stream_notify_<name>`, must fit PostgreSQL's 63 bytes.
pub const MAX_NAME_LENGTH: usize = 38;

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
        Ok(Self {
            messages: format!("depeche_msgs_{store}"),
            stream: format!("depeche_stream_{stream}"),
            maxpos: format!("depeche_stream_{stream}_maxpos"),
            cursor: format!("depeche_stream_{stream}_cursor"),
            sequence: format!("depeche_msgs_{store}_global_seq"),
        })
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
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= MAX_NAME_LENGTH;
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{what} {name:?} is not a valid identifier: use at most {MAX_NAME_LENGTH} ASCII \
             letters, digits and underscores, not starting with a digit"
        )))
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
        for bad in [
            "",
            "1abc",
            "a-b",
            "a;drop table x",
            "a b",
            "é",
            &"x".repeat(39),
        ] {
            assert!(TableNames::new(bad, "ok").is_err(), "{bad:?} accepted");
            assert!(TableNames::new("ok", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn config_rejects_bad_wildcards_and_sizes() {
        assert!(ProjectorConfig::new("s", "a", vec![], 10, None).is_err());
        assert!(ProjectorConfig::new("s", "a", vec![String::new()], 10, None).is_err());
        assert!(ProjectorConfig::new("s", "a", vec!["x%".into()], 0, None).is_err());
        assert!(ProjectorConfig::new("s", "a", vec!["x%".into()], 10, None).is_ok());
    }
}
