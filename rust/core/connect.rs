//! Opening connections on the current tokio runtime.

use tokio_postgres::{Client, NoTls};

use crate::error::{Error, Result};

/// Connect to `dsn` (a libpq URL or key/value string) and drive the connection in a
/// background task of the current runtime.
///
/// `application_name` is set unless the DSN sets one, so operators can tell our sessions
/// apart in `pg_stat_activity`.
pub async fn connect(dsn: &str, application_name: &str) -> Result<Client> {
    let mut config: tokio_postgres::Config = dsn.parse().map_err(|e| Error::Connection {
        what: "parsing the DSN",
        source: e,
    })?;
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    let (client, connection) = config.connect(NoTls).await.map_err(|e| Error::Connection {
        what: "connecting",
        source: e,
    })?;
    tokio::spawn(async move {
        // The error resurfaces on the client's next query; nothing else to do here.
        let _ = connection.await;
    });
    Ok(client)
}
