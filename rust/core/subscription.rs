//! The subscription read path on one connection: claim a partition (a session advisory
//! lock), read its stored position and next batch, acknowledge, unlock.
//!
//! Every statement runs in its own implicit transaction, and statements are pipelined:
//! acknowledgements and unlocks are sent without waiting for their results. The server
//! runs them in the order sent, which is what the subscription relies on: an
//! acknowledgement sent before an unlock is committed before the lock is released, and a
//! read sent after a lock sees everything the previous holder committed before it
//! unlocked. A subscription acknowledging message after message therefore waits for a
//! round trip only when it needs rows back.
//!
//! Lock keys are computed by the caller (depeche-db's keys: sha1 of
//! "<namespace>.<lock name>", which the Python lock provider defines).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use chrono::NaiveDateTime;
use tokio_postgres::{Client, Row, Statement};
use uuid::Uuid;

pub use crate::config::SubscriptionTables;
use crate::connect::connect;
use crate::error::{Error, Result};
use crate::subscription_sql::{
    ack_sql, partitions_sql, partitions_with_state_sql, position_sql, read_after_sql,
    read_with_state_sql, LOCK, UNLOCK,
};

/// The `application_name` of subscription sessions (operators and tests look for it).
pub const APPLICATION_NAME: &str = "depeche-rs subscription";

/// One message of a batch, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    /// The message's id.
    pub message_id: Uuid,
    /// Its origin stream.
    pub stream: String,
    /// Its version in the origin stream.
    pub version: i64,
    /// The message body, JSON text.
    pub body: String,
    /// Its global position in the store.
    pub global_position: i64,
    /// When it was written (UTC, naive).
    pub added_at: NaiveDateTime,
}

/// One position of a partition: the message it points to, or `None` when the message
/// is no longer in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRow {
    /// Position in the partition.
    pub position: i64,
    /// The message, if it is still stored.
    pub message: Option<StoredRow>,
}

/// A batch read from a partition.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    /// The partition's stored position the batch follows (-1 for none).
    pub position: i64,
    /// The rows after it, in position order.
    pub rows: Vec<BatchRow>,
}

/// A partition's max position and the subscription's stored position in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionState {
    /// The partition.
    pub partition: i64,
    /// Its highest position.
    pub max_position: i64,
    /// The stored position (-1 if none, or if the state is not the engine's).
    pub position: i64,
}

struct StateStatements {
    ack: Statement,
    position: Statement,
    read: Statement,
    partitions: Statement,
}

struct Statements {
    lock: Statement,
    unlock: Statement,
    read_after: Statement,
    partitions: Statement,
    state: Option<StateStatements>,
}

/// A statement already sent, whose result is still to be read.
type InFlight = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// A claim sent ahead (see [`SubscriptionSession::claim_ahead`]): a task on the runtime
/// that reads its result, `None` when the lock is held elsewhere.
type Ahead = tokio::task::JoinHandle<Result<Option<Batch>>>;

/// The subscription's session: one connection, used by one caller at a time.
pub struct SubscriptionSession {
    client: Arc<Client>,
    name: String,
    statements: Statements,
    /// Statements sent without waiting, in the order sent.
    in_flight: VecDeque<InFlight>,
    /// The claim sent ahead, if any.
    ahead: Option<Ahead>,
}

impl SubscriptionSession {
    /// Connect and prepare the statements. `name` is the subscription's name (the key
    /// of its rows in the state table). With `synchronous_commit` false, the session's
    /// acknowledgements do not wait for the WAL flush.
    pub async fn connect(
        dsn: &str,
        tables: &SubscriptionTables,
        name: &str,
        synchronous_commit: bool,
    ) -> Result<Self> {
        let client = connect(dsn, APPLICATION_NAME).await?;
        // Set even when the DSN names another application: operators find the
        // subscription's sessions by this name.
        // Generic plans: the batch read walks the (partition, position) index and stops
        // after `count` rows whatever the statistics say. A custom plan for a stored
        // position of -1 on a freshly projected table (statistics not yet analyzed)
        // reads the whole partition in a bitmap scan and sorts it, every batch.
        let mut setup = format!(
            "SET application_name = '{APPLICATION_NAME}'; SET plan_cache_mode = force_generic_plan"
        );
        if !synchronous_commit {
            setup.push_str("; SET synchronous_commit = off");
        }
        client
            .batch_execute(&setup)
            .await
            .map_err(|e| Error::from_pg("configuring the subscription session", e))?;
        let statements = prepare(&client, tables).await?;
        Ok(Self {
            client: Arc::new(client),
            name: name.to_owned(),
            statements,
            in_flight: VecDeque::new(),
            ahead: None,
        })
    }

    /// Whether the connection is gone (and with it every lock it held).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Fail if the connection is gone or a statement sent without waiting failed;
    /// never blocks (a dead connection's advisory locks are gone: a batch in progress
    /// must stop).
    pub fn check(&mut self) -> Result<()> {
        self.reap()?;
        if self.client.is_closed() {
            return Err(lost());
        }
        Ok(())
    }

    /// Read the results that have arrived, oldest first, without waiting; fail with the
    /// first error. Reading them also keeps the driver from holding back later
    /// responses (among them a terminated session's last words) for want of a reader.
    fn reap(&mut self) -> Result<()> {
        let mut cx = Context::from_waker(Waker::noop());
        while let Some(statement) = self.in_flight.front_mut() {
            match statement.as_mut().poll(&mut cx) {
                Poll::Ready(outcome) => {
                    self.in_flight.pop_front();
                    outcome?;
                }
                Poll::Pending => break,
            }
        }
        Ok(())
    }

    /// Wait until every statement sent so far is done; fail with the first error.
    pub async fn flush(&mut self) -> Result<()> {
        settle(std::mem::take(&mut self.in_flight)).await
    }

    /// Try the advisory lock `key` (never waits for another holder).
    pub async fn try_lock(&mut self, key: i64) -> Result<bool> {
        let earlier = settle(std::mem::take(&mut self.in_flight));
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key];
        let lock = self.client.query_one(&self.statements.lock, &params);
        let (earlier, row) = tokio::join!(earlier, lock);
        earlier?;
        let row = row.map_err(|e| Error::from_pg("taking a subscription lock", e))?;
        get(&row, 0)
    }

    /// Release the advisory lock `key`, after everything sent before; does not wait.
    pub fn unlock(&mut self, key: i64) -> Result<()> {
        let client = Arc::clone(&self.client);
        let statement = self.statements.unlock.clone();
        self.send(async move {
            client
                .query_one(&statement, &[&key])
                .await
                .map(drop)
                .map_err(|e| Error::from_pg("releasing a subscription lock", e))
        })
    }

    /// Lock `key` (when given) and read the partition's stored position and up to
    /// `count` rows after it, in one round trip. `Ok(None)` when the lock is held
    /// elsewhere.
    pub async fn claim(
        &mut self,
        partition: i64,
        key: Option<i64>,
        count: i64,
    ) -> Result<Option<Batch>> {
        let earlier = settle(std::mem::take(&mut self.in_flight));
        let state = self.state()?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&self.name, &partition, &count];
        let read = self.client.query(&state.read, &params);
        let lock = &self.statements.lock;
        let Some(rows) = locked(&self.client, lock, earlier, key, read).await? else {
            return Ok(None);
        };
        // The first column is the stored position; a partition with nothing after it
        // gives one row of NULL message columns.
        let position = rows.first().map_or(Ok(-1), |r| get(r, 0))?;
        Ok(Some(batch(position, &rows)?))
    }

    /// Send the claim of `partition` now (its lock `key`, its stored position and up to
    /// `count` rows after it, as [`claim`](Self::claim)) and read its result in the
    /// background, so that the server runs it while the caller handles the batch
    /// before; [`take_ahead`](Self::take_ahead) returns it. Must be called within the
    /// tokio runtime's context.
    ///
    /// Statements sent later may reach the server before it: they concern other
    /// partitions (the caller holds this one's lock from here on), and the read runs
    /// after the lock is granted, as in `claim`, so it sees what the previous holder
    /// committed. One claim at a time may be ahead.
    pub fn claim_ahead(&mut self, partition: i64, key: i64, count: i64) -> Result<()> {
        self.check()?;
        if self.ahead.is_some() {
            return Err(Error::Config(
                "a claim is already ahead on this session".into(),
            ));
        }
        let client = Arc::clone(&self.client);
        let lock = self.statements.lock.clone();
        let read = self.state()?.read.clone();
        let name = self.name.clone();
        self.ahead = Some(tokio::spawn(async move {
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                [&name, &partition, &count];
            let read = client.query(&read, &params);
            let earlier = std::future::ready(Ok(()));
            let Some(rows) = locked(&client, &lock, earlier, Some(key), read).await? else {
                return Ok(None);
            };
            let position = rows.first().map_or(Ok(-1), |r| get(r, 0))?;
            Ok(Some(batch(position, &rows)?))
        }));
        Ok(())
    }

    /// The result of the claim sent ahead: `Ok(None)` when its lock is held elsewhere.
    /// A failure of the statements sent before that has arrived comes first, as does a
    /// closed connection (its locks are gone); one still on its way is reported by the
    /// next `check` or statement, before the batch's next message (a connection that
    /// died would have failed the claim too, so the lock it returns was granted).
    pub async fn take_ahead(&mut self) -> Result<Option<Batch>> {
        let ahead = self
            .ahead
            .take()
            .ok_or_else(|| Error::Config("no claim is ahead on this session".into()))?;
        self.check()?;
        match ahead.await {
            Ok(outcome) => outcome,
            Err(e) => Err(Error::Lost(format!(
                "the claim read ahead did not finish: {e}"
            ))),
        }
    }

    /// Lock `key` (when given) and read up to `count` rows after `after` (a position the
    /// caller's state provider stored). `Ok(None)` when the lock is held elsewhere.
    pub async fn read_after(
        &mut self,
        partition: i64,
        key: Option<i64>,
        after: i64,
        count: i64,
    ) -> Result<Option<Batch>> {
        let earlier = settle(std::mem::take(&mut self.in_flight));
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&partition, &after, &count];
        let read = self.client.query(&self.statements.read_after, &params);
        let rows = locked(&self.client, &self.statements.lock, earlier, key, read).await?;
        rows.map(|rows| batch(after, &rows)).transpose()
    }

    /// Store `position` as the partition's acknowledged position (never moving it
    /// backwards), after everything sent before; does not wait.
    pub fn ack(&mut self, partition: i64, position: i64) -> Result<()> {
        let statement = self.state()?.ack.clone();
        let client = Arc::clone(&self.client);
        let name = self.name.clone();
        self.send(async move {
            client
                .execute(&statement, &[&name, &partition, &position])
                .await
                .map(drop)
                .map_err(|e| Error::from_pg("acknowledging a subscription message", e))
        })
    }

    /// The partition's committed position (read after the acknowledgements sent
    /// before), -1 if none.
    pub async fn stored_position(&mut self, partition: i64) -> Result<i64> {
        let earlier = settle(std::mem::take(&mut self.in_flight));
        let statement = &self.state()?.position;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&self.name, &partition];
        let read = self.client.query(statement, &params);
        let (earlier, rows) = tokio::join!(earlier, read);
        earlier?;
        let rows = rows.map_err(|e| Error::from_pg("reading a subscription position", e))?;
        rows.first().map_or(Ok(-1), |r| get(r, 0))
    }

    /// With a state table of the engine's, the partitions with messages after the stored
    /// position (max and stored position); without, every partition's max position (and
    /// -1).
    pub async fn partitions(&mut self) -> Result<Vec<PartitionState>> {
        let earlier = settle(std::mem::take(&mut self.in_flight));
        let read = async {
            match &self.statements.state {
                Some(state) => self.client.query(&state.partitions, &[&self.name]).await,
                None => self.client.query(&self.statements.partitions, &[]).await,
            }
        };
        let (earlier, rows) = tokio::join!(earlier, read);
        earlier?;
        let rows = rows.map_err(|e| Error::from_pg("reading the partitions' positions", e))?;
        rows.iter()
            .map(|r| {
                Ok(PartitionState {
                    partition: get(r, 0)?,
                    max_position: get(r, 1)?,
                    position: get(r, 2)?,
                })
            })
            .collect()
    }

    fn state(&self) -> Result<&StateStatements> {
        self.statements.state.as_ref().ok_or_else(|| {
            Error::Config("this subscription session keeps no state (no state table)".into())
        })
    }

    /// Send a statement now, in call order, without waiting for its result.
    ///
    /// The driver queues a request on the first poll of its future: polling it once
    /// here (the future owns everything it uses) puts it on the wire; its result is
    /// read later, by `check`, the next `send` or the next call that waits. Its response is small
    /// enough for the driver to hold until then without stalling the connection.
    fn send<F>(&mut self, future: F) -> Result<()>
    where
        F: Future<Output = Result<()>> + Send + 'static,
    {
        self.check()?;
        let mut future: InFlight = Box::pin(future);
        let mut cx = Context::from_waker(Waker::noop());
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(result) => result,
            Poll::Pending => {
                self.in_flight.push_back(future);
                Ok(())
            }
        }
    }
}

/// Wait for the statements sent earlier while sending the lock (when `key` is
/// given) and the read after them: one round trip. Earlier failures come first.
async fn locked(
    client: &Client,
    lock_statement: &Statement,
    earlier: impl Future<Output = Result<()>>,
    key: Option<i64>,
    read: impl Future<Output = std::result::Result<Vec<Row>, tokio_postgres::Error>>,
) -> Result<Option<Vec<Row>>> {
    let read = async { read.await.map_err(|e| Error::from_pg("reading a batch", e)) };
    let Some(key) = key else {
        let (earlier, rows) = tokio::join!(earlier, read);
        earlier?;
        return rows.map(Some);
    };
    let lock = async {
        client
            .query_one(lock_statement, &[&key])
            .await
            .map_err(|e| Error::from_pg("taking a partition lock", e))
    };
    // Polled together, lock before read: the driver sends both before waiting.
    let (earlier, locked, rows) = tokio::join!(earlier, lock, read);
    earlier?;
    let locked: bool = get(&locked?, 0)?;
    let rows = rows?;
    // Someone else holds the partition: the rows are stale.
    Ok(locked.then_some(rows))
}

/// Read the results of statements sent earlier, in order; fail with the first error.
async fn settle(in_flight: VecDeque<InFlight>) -> Result<()> {
    let mut first: Option<Error> = None;
    for statement in in_flight {
        if let Err(e) = statement.await {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

async fn prepare(client: &Client, t: &SubscriptionTables) -> Result<Statements> {
    let prepare = |sql: String| async move {
        client
            .prepare(&sql)
            .await
            .map_err(|e| Error::from_pg("preparing the subscription's statements", e))
    };
    let (lock, unlock, read_after, partitions) = tokio::try_join!(
        prepare(LOCK.to_owned()),
        prepare(UNLOCK.to_owned()),
        prepare(read_after_sql(t)),
        prepare(partitions_sql(t)),
    )?;
    let state = match &t.state {
        Some(table) => {
            let (ack, position, read, partitions) = tokio::try_join!(
                prepare(ack_sql(table)),
                prepare(position_sql(table)),
                prepare(read_with_state_sql(t, table)),
                prepare(partitions_with_state_sql(t, table)),
            )?;
            Some(StateStatements {
                ack,
                position,
                read,
                partitions,
            })
        }
        None => None,
    };
    Ok(Statements {
        lock,
        unlock,
        read_after,
        partitions,
        state,
    })
}

fn lost() -> Error {
    Error::Lost("lost the subscription's database connection".into())
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, index: usize) -> Result<T> {
    row.try_get(index).map_err(|e| Error::Database {
        what: "decoding a subscription row",
        source: e,
    })
}

/// Rows of `position, message_id, stream, version, message, global_position, added_at`
/// after the leading column; rows without a position (the empty partition) are skipped.
fn batch(position: i64, rows: &[Row]) -> Result<Batch> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(at) = get::<Option<i64>>(row, 1)? else {
            continue;
        };
        let message = match get::<Option<Uuid>>(row, 2)? {
            Some(message_id) => Some(StoredRow {
                message_id,
                stream: get(row, 3)?,
                version: get(row, 4)?,
                body: get(row, 5)?,
                global_position: get(row, 6)?,
                added_at: get(row, 7)?,
            }),
            None => None,
        };
        out.push(BatchRow {
            position: at,
            message,
        });
    }
    Ok(Batch {
        position,
        rows: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(state: Option<&str>) -> SubscriptionTables {
        SubscriptionTables::new("shop", "orders", state).unwrap()
    }

    #[test]
    fn tables_are_derived_and_state_names_checked() {
        let t = tables(Some("depeche_subscriptions_billing"));
        assert_eq!(t.messages, "depeche_msgs_shop");
        assert_eq!(t.stream, "depeche_stream_orders");
        assert_eq!(t.maxpos, "depeche_stream_orders_maxpos");
        assert_eq!(t.state.as_deref(), Some("depeche_subscriptions_billing"));
        for bad in ["", "a;drop table x", "a b", "1x"] {
            assert!(SubscriptionTables::new("shop", "orders", Some(bad)).is_err());
        }
        assert!(SubscriptionTables::new("shop", "orders", Some(&"s".repeat(64))).is_err());
        assert!(SubscriptionTables::new("shop", "orders", None)
            .unwrap()
            .state
            .is_none());
    }
}
