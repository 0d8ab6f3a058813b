//! Opening connections on the current tokio runtime.

use tokio_postgres::{Client, NoTls};

use crate::core::error::{Error, Result};

/// Connect to `dsn` (a libpq URL or key/value string) and drive the connection in a
/// background task of the current runtime.
pub async fn connect(dsn: &str) -> Result<Client> {
    let config: tokio_postgres::Config = dsn.parse().map_err(|e| Error::Connection {
        what: "parsing the DSN",
        source: e,
    })?;
    let (client, connection) =
        config.connect(NoTls).await.map_err(|e| Error::Connection { what: "connecting", source: e })?;
    tokio::spawn(async move {
        // The error resurfaces on the client's next query; nothing else to do here.
        let _ = connection.await;
    });
    Ok(client)
}
