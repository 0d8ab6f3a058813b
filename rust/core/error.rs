//! Errors of the engine. Database errors keep their SQLSTATE, detail and hint.

use tokio_postgres::error::SqlState;

/// Result alias of the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server could not be reached, or the connection broke.
    #[error("could not talk to PostgreSQL ({what}): {}", describe(source))]
    Connection {
        /// What was being done.
        what: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// PostgreSQL answered with an error.
    #[error("{what}: {}", describe(source))]
    Database {
        /// What was being done.
        what: &'static str,
        /// The driver's error (holds SQLSTATE, detail, hint).
        #[source]
        source: tokio_postgres::Error,
    },
    /// The connection is gone (found closed before a statement was sent, or a
    /// statement sent without waiting never finished).
    #[error("{0}")]
    Lost(String),
    /// A configuration value is invalid.
    #[error("{0}")]
    Config(String),
    /// A partition assignment is invalid.
    #[error("{0}")]
    Partition(String),
    /// The store's global-position sequence would break per-stream order.
    #[error(
        "the global-position sequence {sequence} has {setting}: sessions caching values \
         (or counting down) hand out global positions out of commit order, which breaks \
         per-stream version order in aggregated streams, so the projector refuses to run; \
         fix it with `{fix}` (`depeche-rs migrate --apply` does it too), then reconnect \
         the writers so no session keeps values cached from before"
    )]
    UnsafeSequence {
        /// The sequence's name.
        sequence: String,
        /// What is wrong with it, e.g. "CACHE 20".
        setting: String,
        /// The SQL that fixes it.
        fix: String,
    },
}

/// The driver's error with the server's own words: the driver's `Display` says only
/// "db error" for server errors.
fn describe(source: &tokio_postgres::Error) -> String {
    match source.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str("; ");
                text.push_str(detail);
            }
            text
        }
        None => match std::error::Error::source(source) {
            Some(cause) => format!("{source}: {cause}"),
            None => source.to_string(),
        },
    }
}

impl Error {
    /// Wrap a driver error, classifying connection failures apart from server errors.
    #[must_use]
    pub fn from_pg(what: &'static str, source: tokio_postgres::Error) -> Self {
        if source.is_closed() || source.as_db_error().is_none() {
            Error::Connection { what, source }
        } else {
            Error::Database { what, source }
        }
    }

    /// The SQLSTATE the server sent, if any.
    #[must_use]
    pub fn sqlstate(&self) -> Option<&SqlState> {
        match self {
            Error::Database { source, .. } | Error::Connection { source, .. } => source.code(),
            _ => None,
        }
    }

    /// The server's DETAIL, if any.
    #[must_use]
    pub fn detail(&self) -> Option<&str> {
        self.db_error()
            .and_then(tokio_postgres::error::DbError::detail)
    }

    /// The server's HINT, if any.
    #[must_use]
    pub fn hint(&self) -> Option<&str> {
        self.db_error()
            .and_then(tokio_postgres::error::DbError::hint)
    }

    fn db_error(&self) -> Option<&tokio_postgres::error::DbError> {
        match self {
            Error::Database { source, .. } | Error::Connection { source, .. } => {
                source.as_db_error()
            }
            _ => None,
        }
    }

    /// True when the connection is unusable and must be replaced.
    #[must_use]
    pub fn is_connection_error(&self) -> bool {
        matches!(self, Error::Connection { .. } | Error::Lost(_))
            || matches!(
                self.sqlstate(),
                Some(c) if *c == SqlState::ADMIN_SHUTDOWN
                    || *c == SqlState::CRASH_SHUTDOWN
                    || *c == SqlState::CANNOT_CONNECT_NOW
                    || *c == SqlState::CONNECTION_FAILURE
                    || *c == SqlState::CONNECTION_EXCEPTION
            )
    }
}
