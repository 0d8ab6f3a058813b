//! The projector: copies new origin messages into an aggregated stream, one batch per
//! transaction, with gapless positions per partition.
//!
//! A batch is split in two so that a caller can compute partitions in between (the
//! Python binding calls a Python partitioner there): [`Projector::begin_batch`] opens the
//! transaction, takes the lock and reads the candidates; [`Projector::finish_batch`]
//! writes rows, positions and cursor and commits. [`Projector::abort`] rolls back.

use std::collections::HashMap;

use chrono::NaiveDateTime;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use crate::core::config::ProjectorConfig;
use crate::core::connect::connect;
use crate::core::error::{Error, Result};
use crate::core::sql;

/// One origin message selected for projection.
#[derive(Debug, Clone)]
pub struct OriginRow {
    /// Message id.
    pub message_id: Uuid,
    /// Origin stream.
    pub stream: String,
    /// Version in the origin stream.
    pub version: i64,
    /// Global position in the store.
    pub global_position: i64,
    /// When the row was added (UTC, naive).
    pub added_at: NaiveDateTime,
    /// The message's own time, when the writer recorded it (UTC, naive).
    pub occurred_at: Option<NaiveDateTime>,
    /// The message JSON, when asked for or when `occurred_at` is missing.
    pub message: Option<String>,
}

/// A batch read inside an open transaction, waiting for its partitions.
#[derive(Debug)]
pub struct PendingBatch {
    /// The rows, in global-position order.
    pub rows: Vec<OriginRow>,
    cursor_position: i64,
    cursor_xmin: Option<String>,
    snapshot: String,
    max_visible: Option<i64>,
    window_end: i64,
    limit_hit: bool,
}

impl PendingBatch {
    /// Whether more messages may be waiting after this batch: it was cut by the batch
    /// size, or the scanned window did not reach the newest visible message.
    #[must_use]
    pub fn more(&self) -> bool {
        self.limit_hit || self.max_visible.is_some_and(|m| m > self.window_end)
    }

    /// Where the cursor moves when this batch commits. Everything visible up to it is
    /// projected then: up to the last row when the batch was cut, else up to the end of
    /// the scanned window (or the newest visible position, if lower).
    fn next_position(&self) -> i64 {
        if self.limit_hit {
            self.rows
                .last()
                .map_or(self.cursor_position, |r| r.global_position)
        } else {
            self.max_visible
                .unwrap_or(self.cursor_position)
                .min(self.window_end)
                .max(self.cursor_position)
        }
    }
}

/// The smallest and largest global-position window scanned per batch.
const MIN_WINDOW: i64 = 1_024;
const MAX_WINDOW: i64 = 1 << 24;

/// Partition and message time of one row, as decided by the partitioner.
#[derive(Debug, Clone, Copy)]
pub struct Assignment {
    /// Partition (>= 0).
    pub partition: i64,
    /// Message time (UTC, naive).
    pub occurred_at: NaiveDateTime,
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Messages projected.
    pub projected: usize,
    /// Whether more messages may be waiting.
    pub more: bool,
}

struct Statements {
    read_cursor: Statement,
    candidates: Statement,
    read_positions: Statement,
    insert_rows: Statement,
    upsert_positions: Statement,
    upsert_cursor: Statement,
}

/// A projector bound to one connection.
pub struct Projector {
    config: ProjectorConfig,
    client: Client,
    statements: Option<Statements>,
    in_transaction: bool,
    window: i64,
}

impl Projector {
    /// Connect. Statements are prepared in the first batch, once the stream's lock is
    /// held: preparing the INSERT needs a lock that a concurrent holder would block.
    pub async fn connect(config: ProjectorConfig, dsn: &str) -> Result<Self> {
        let name = format!("depeche-rs projector {}", config.tables.stream);
        let client = connect(dsn, &name).await?;
        // A generic plan of the candidate query cannot see how narrow its window is and
        // may scan whole tables; custom plans cost a millisecond and never do.
        client
            .batch_execute("SET plan_cache_mode = force_custom_plan")
            .await
            .map_err(|e| Error::from_pg("configuring the projector session", e))?;
        let window = (config.batch_size as i64).clamp(MIN_WINDOW, MAX_WINDOW);
        Ok(Self {
            config,
            client,
            statements: None,
            in_transaction: false,
            window,
        })
    }

    async fn prepare(&self) -> Result<Statements> {
        let t = &self.config.tables;
        let prepare = |sql: String| {
            let client = &self.client;
            async move {
                client
                    .prepare_typed(&sql, &[])
                    .await
                    .map_err(|e| Error::from_pg("preparing the projector's statements", e))
            }
        };
        let (read_cursor, candidates, read_positions, insert_rows, upsert_positions, upsert_cursor) =
            tokio::try_join!(
                prepare(sql::read_cursor(t)),
                prepare(sql::candidates(t)),
                prepare(sql::read_positions(t)),
                prepare(sql::insert_rows(t)),
                prepare(sql::upsert_positions(t)),
                prepare(sql::upsert_cursor(t)),
            )?;
        Ok(Statements {
            read_cursor,
            candidates,
            read_positions,
            insert_rows,
            upsert_positions,
            upsert_cursor,
        })
    }

    /// Whether the connection is gone and the projector must be rebuilt.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Open a batch: `Ok(None)` when another projector holds the stream's lock.
    pub async fn begin_batch(&mut self) -> Result<Option<PendingBatch>> {
        if self.in_transaction {
            self.abort().await;
        }
        self.in_transaction = true;
        match self
            .client
            .batch_execute(&sql::begin(&self.config.tables))
            .await
        {
            Ok(()) => {}
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                self.abort().await;
                return Ok(None);
            }
            Err(e) => {
                self.abort().await;
                return Err(Error::from_pg("locking the aggregated stream", e));
            }
        }
        match self.read_batch().await {
            Ok(batch) => Ok(Some(batch)),
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    async fn read_batch(&mut self) -> Result<PendingBatch> {
        if self.statements.is_none() {
            self.statements = Some(self.prepare().await?);
        }
        let Some(st) = &self.statements else {
            return Err(Error::Config(
                "projector statements are not prepared".into(),
            ));
        };
        let row = self
            .client
            .query_one(&st.read_cursor, &[])
            .await
            .map_err(|e| Error::from_pg("reading the projector cursor", e))?;
        let cursor_position: Option<i64> = row.get(0);
        let cursor_snapshot: Option<String> = row.get(1);
        let snapshot: String = row.get(2);
        let max_visible: Option<i64> = row.get(3);
        let cursor_position = cursor_position.unwrap_or(0);

        let limit = self.config.batch_size as i64;
        let need_bodies = self.config.partitioner.is_none();
        let window_end = cursor_position.saturating_add(self.window);
        let rows = self
            .client
            .query(
                &st.candidates,
                &[
                    &cursor_position,
                    &cursor_snapshot,
                    &self.config.wildcards,
                    &limit,
                    &need_bodies,
                    &window_end,
                ],
            )
            .await
            .map_err(|e| Error::from_pg("selecting new messages", e))?;
        let rows: Vec<OriginRow> = rows
            .iter()
            .map(|r| OriginRow {
                message_id: r.get(0),
                stream: r.get(1),
                version: r.get(2),
                global_position: r.get(3),
                added_at: r.get(4),
                occurred_at: r.get(5),
                message: r.get(6),
            })
            .collect();
        let limit_hit = rows.len() >= self.config.batch_size;
        // Sparse matches (other streams in between) widen the window; dense ones keep it.
        self.window = if rows.len() < self.config.batch_size / 2 {
            self.window.saturating_mul(2).min(MAX_WINDOW)
        } else {
            (self.config.batch_size as i64).clamp(MIN_WINDOW, MAX_WINDOW)
        };
        Ok(PendingBatch {
            rows,
            cursor_position,
            cursor_xmin: cursor_snapshot.as_deref().map(snapshot_xmin),
            snapshot,
            max_visible,
            window_end,
            limit_hit,
        })
    }

    /// Write the batch with the given assignments (one per row, in row order) and commit.
    pub async fn finish_batch(
        &mut self,
        batch: PendingBatch,
        assignments: &[Assignment],
    ) -> Result<BatchOutcome> {
        match self.write_batch(&batch, assignments).await {
            Ok(outcome) => {
                self.in_transaction = false;
                Ok(outcome)
            }
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    async fn write_batch(
        &mut self,
        batch: &PendingBatch,
        assignments: &[Assignment],
    ) -> Result<BatchOutcome> {
        if assignments.len() != batch.rows.len() {
            return Err(Error::Partition(format!(
                "{} partitions for {} messages",
                assignments.len(),
                batch.rows.len()
            )));
        }
        if let Some((row, a)) = batch
            .rows
            .iter()
            .zip(assignments)
            .find(|(_, a)| a.partition < 0 || a.partition > i64::from(i32::MAX))
        {
            return Err(Error::Partition(format!(
                "partition {} for message {} of stream {:?} is out of range: \
                 partitions must be integers from 0 to {}",
                a.partition,
                row.message_id,
                row.stream,
                i32::MAX
            )));
        }
        // Positions continue from each partition's recorded maximum.
        let mut partitions: Vec<i64> = assignments.iter().map(|a| a.partition).collect();
        partitions.sort_unstable();
        partitions.dedup();
        let Some(st) = &self.statements else {
            return Err(Error::Config(
                "projector statements are not prepared".into(),
            ));
        };
        let mut next: HashMap<i64, i64> = partitions.iter().map(|p| (*p, 0)).collect();
        if !batch.rows.is_empty() {
            for r in self
                .client
                .query(&st.read_positions, &[&partitions])
                .await
                .map_err(|e| Error::from_pg("reading partition positions", e))?
            {
                let p: i64 = r.get(0);
                let max: i64 = r.get(1);
                next.insert(p, max + 1);
            }
        }

        let n = batch.rows.len();
        let mut ids = Vec::with_capacity(n);
        let mut streams = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut parts = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        let mut occurred = Vec::with_capacity(n);
        let mut globals = Vec::with_capacity(n);
        let mut added = Vec::with_capacity(n);
        for (row, a) in batch.rows.iter().zip(assignments) {
            let slot = next.entry(a.partition).or_insert(0);
            ids.push(row.message_id);
            streams.push(row.stream.as_str());
            versions.push(row.version);
            parts.push(a.partition);
            positions.push(*slot);
            occurred.push(a.occurred_at);
            globals.push(row.global_position);
            added.push(row.added_at);
            *slot += 1;
        }
        let max_parts: Vec<i64> = partitions.clone();
        let max_positions: Vec<i64> = partitions.iter().map(|p| next[p] - 1).collect();

        let new_position = batch.next_position();
        let cursor_unchanged = n == 0
            && new_position == batch.cursor_position
            && batch.cursor_xmin.as_deref() == Some(snapshot_xmin(&batch.snapshot).as_str());

        let insert = async {
            if n > 0 {
                self.client
                    .execute(
                        &st.insert_rows,
                        &[
                            &ids, &streams, &versions, &parts, &positions, &occurred, &globals,
                            &added,
                        ],
                    )
                    .await
                    .map_err(|e| Error::from_pg("inserting projected messages", e))?;
            }
            Ok::<(), Error>(())
        };
        let maxpos = async {
            if n > 0 {
                self.client
                    .execute(&st.upsert_positions, &[&max_parts, &max_positions])
                    .await
                    .map_err(|e| Error::from_pg("recording partition positions", e))?;
            }
            Ok::<(), Error>(())
        };
        let cursor = async {
            if !cursor_unchanged {
                self.client
                    .execute(&st.upsert_cursor, &[&new_position, &batch.snapshot])
                    .await
                    .map_err(|e| Error::from_pg("advancing the projector cursor", e))?;
            }
            Ok::<(), Error>(())
        };
        // Polled together so the driver pipelines the three statements. All are awaited:
        // once one fails the others fail with "transaction is aborted", which must not
        // hide the first error.
        let (inserted, positioned, moved) = tokio::join!(insert, maxpos, cursor);
        first_real_error([inserted, positioned, moved])?;
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| Error::from_pg("committing the batch", e))?;
        Ok(BatchOutcome {
            projected: n,
            more: batch.more(),
        })
    }

    /// Roll back an open batch; errors are ignored because the server discards the
    /// transaction anyway when the connection is gone.
    pub async fn abort(&mut self) {
        if self.in_transaction {
            let _ = self.client.batch_execute("ROLLBACK").await;
            self.in_transaction = false;
        }
    }

    /// Run one batch with the built-in partitioner for rows whose message time is known.
    /// Returns `Ok(None)` when locked, `Err` on failure, and hands back the batch when some
    /// rows need the caller (no partitioner configured, or a row without a message time).
    pub async fn run_builtin_batch(&mut self) -> Result<BuiltinStep> {
        let Some(batch) = self.begin_batch().await? else {
            return Ok(BuiltinStep::Locked);
        };
        let Some(partitioner) = self.config.partitioner else {
            return Ok(BuiltinStep::NeedsCaller(batch));
        };
        let mut assignments = Vec::with_capacity(batch.rows.len());
        for row in &batch.rows {
            let Some(occurred_at) = row.occurred_at else {
                return Ok(BuiltinStep::NeedsCaller(batch));
            };
            assignments.push(Assignment {
                partition: partitioner.partition(&row.stream),
                occurred_at,
            });
        }
        let outcome = self.finish_batch(batch, &assignments).await?;
        Ok(BuiltinStep::Done(outcome))
    }
}

/// Result of [`Projector::run_builtin_batch`].
#[derive(Debug)]
pub enum BuiltinStep {
    /// Another projector holds the lock.
    Locked,
    /// The batch was written.
    Done(BatchOutcome),
    /// The caller must assign (some) rows, then call `finish_batch` or `abort`.
    NeedsCaller(PendingBatch),
}

/// The first error that is not a consequence of an earlier one in the same transaction.
fn first_real_error(results: [Result<()>; 3]) -> Result<()> {
    let mut fallback = None;
    for result in results {
        if let Err(e) = result {
            if e.sqlstate() != Some(&SqlState::IN_FAILED_SQL_TRANSACTION) {
                return Err(e);
            }
            fallback.get_or_insert(e);
        }
    }
    fallback.map_or(Ok(()), Err)
}

/// The `xmin` part of a `pg_snapshot` text (`xmin:xmax:xip,...`).
fn snapshot_xmin(snapshot: &str) -> String {
    snapshot.split(':').next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::snapshot_xmin;

    #[test]
    fn xmin_is_the_first_field() {
        assert_eq!(snapshot_xmin("745:750:745,748"), "745");
        assert_eq!(snapshot_xmin("10:10:"), "10");
    }
}
