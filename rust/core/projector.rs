//! The projector: copies new origin messages into an aggregated stream, one batch per
//! transaction, with gapless positions per partition.
//!
//! A batch is split in two so that a caller can compute partitions in between (the
//! Python binding calls a Python partitioner there): [`Projector::begin_batch`] opens the
//! transaction, takes the lock and reads the candidates; [`Projector::finish_batch`]
//! writes rows, positions and cursor and commits. [`Projector::abort`] rolls back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, SimpleQueryMessage, Statement};
use uuid::Uuid;

use crate::config::ProjectorConfig;
use crate::connect::connect;
pub use crate::cursor::OriginRow;
use crate::cursor::{
    group_cursors, merge, snapshot_stale, snapshot_xip, snapshot_xmax, Cursor, CursorGroup,
    CursorHome, GroupRows, StoredCursor,
};
use crate::error::{Error, Result};
use crate::sql;

/// A batch read inside an open transaction, waiting for its partitions.
#[derive(Debug)]
pub struct PendingBatch {
    /// The rows, in global-position order (each origin stream in version order).
    pub rows: Vec<OriginRow>,
    /// The wildcards whose cursors the batch writes, and their new positions.
    cursor_wildcards: Vec<String>,
    cursor_positions: Vec<i64>,
    /// Whether the cursors must be written even without rows.
    write_cursors: bool,
    snapshot: String,
    home: CursorHome,
    more: bool,
    /// Whether its *above* rows were read ahead on the second connection.
    read_ahead: bool,
    /// What the next batch reads, when it can be read ahead while this one is written.
    next: Option<NextRead>,
    /// Rows the caller assigned while they were read ahead, by message id.
    preassigned: HashMap<Uuid, Assignment>,
}

/// The next batch's *above* query: a single group's wildcards, the cursor this batch
/// writes for them, and the window.
#[derive(Debug, Clone)]
struct NextRead {
    wildcards: Vec<String>,
    cursor: Cursor,
    window: i64,
}

/// A next batch's *above* candidates, read on the second connection in a snapshot of its
/// own while the batch before was written (docs/projector.md, "Reading ahead").
struct ReadAhead {
    read: NextRead,
    /// When it was read: an old one is not used (see [`READ_AHEAD_MAX_AGE`]).
    at: Instant,
    snapshot: String,
    max_visible: Option<i64>,
    rows: Vec<OriginRow>,
    assigned: HashMap<Uuid, Assignment>,
}

/// The caller's partitioner and message times for rows read ahead, called while the
/// batch before them is still being written (`None` for a row it leaves to the batch).
pub type PreAssign<'a> = Box<dyn FnOnce(&[OriginRow]) -> Vec<Option<Assignment>> + Send + 'a>;

/// The second connection, which reads the next batch's candidates during a catch-up.
struct Reader {
    client: Client,
    read_state: Statement,
    candidates_above: Statement,
}

impl PendingBatch {
    /// Whether more messages may be waiting after this batch.
    #[must_use]
    pub fn more(&self) -> bool {
        self.more
    }

    /// Whether its candidates above the cursor were read ahead (a failure to finish it
    /// is then retried once, see [`Projector::finish_batch`]).
    #[must_use]
    pub fn read_ahead(&self) -> bool {
        self.read_ahead
    }

    /// The assignment the caller made for a row while it was read ahead, if any.
    #[must_use]
    pub fn preassigned(&self, message_id: &Uuid) -> Option<Assignment> {
        self.preassigned.get(message_id).copied()
    }
}

/// How long candidates read ahead stay usable. A catch-up uses them within milliseconds;
/// a caller that runs one batch now and then (`update_batch`) reads afresh instead of
/// projecting rows as they were long ago (an operator may have fixed one meanwhile).
const READ_AHEAD_MAX_AGE: Duration = Duration::from_secs(5);

/// The smallest and largest global-position window scanned per batch.
const MIN_WINDOW: i64 = 1_024;
const MAX_WINDOW: i64 = 1 << 24;

/// What the batch's first query reads.
struct State {
    snapshot: String,
    max_visible: Option<i64>,
    home: CursorHome,
}

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
    read_state: Statement,
    read_cursors: Statement,
    candidates_above: Statement,
    candidates_late: Statement,
    next_position: Statement,
    insert_rows: Statement,
    upsert_cursors: Statement,
}

/// A projector bound to one connection.
pub struct Projector {
    config: ProjectorConfig,
    client: Client,
    statements: Option<Statements>,
    in_transaction: bool,
    /// The key of the projector mutex while this session holds it.
    mutex: Option<i64>,
    window: i64,
    dsn: String,
    /// The second connection, opened at the first catch-up; `None` after it failed.
    reader: Option<Reader>,
    reader_failed: bool,
    /// The next batch's candidates, read while the last batch was written.
    ahead: Option<ReadAhead>,
    /// Batches whose candidates were read ahead, and read-aheads thrown away.
    read_ahead_used: u64,
    read_ahead_discarded: u64,
    /// Rows the caller assigned while they were read ahead, in batches that used them.
    assigned_ahead: u64,
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
            mutex: None,
            window,
            dsn: dsn.to_owned(),
            reader: None,
            reader_failed: false,
            ahead: None,
            read_ahead_used: 0,
            read_ahead_discarded: 0,
            assigned_ahead: 0,
        })
    }

    /// How many batches used candidates read ahead, how many read-aheads were thrown
    /// away (the cursor moved meanwhile, or the batch that used one failed and ran again),
    /// and how many rows of the batches that used one the caller had assigned ahead.
    #[must_use]
    pub fn read_ahead_counts(&self) -> (u64, u64, u64) {
        (
            self.read_ahead_used,
            self.read_ahead_discarded,
            self.assigned_ahead,
        )
    }

    /// The second connection, opened on first use. A failure to open it is not an error:
    /// the projector reads each batch on its own connection instead, as it does outside a
    /// catch-up.
    async fn reader(&mut self) -> Option<&Reader> {
        if self.reader.as_ref().is_some_and(|r| r.client.is_closed()) {
            self.reader = None;
        }
        if self.reader.is_none() && !self.reader_failed {
            match open_reader(&self.config, &self.dsn).await {
                Ok(reader) => self.reader = Some(reader),
                Err(_) => self.reader_failed = true,
            }
        }
        self.reader.as_ref()
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
        let (read_state, read_cursors, candidates_above, candidates_late, next_position) = tokio::try_join!(
            prepare(sql::read_state(t)),
            prepare(sql::read_cursors(t)),
            prepare(sql::candidates_above(t)),
            prepare(sql::candidates_late(t)),
            prepare(sql::next_position(t)),
        )?;
        let (insert_rows, upsert_cursors) = tokio::try_join!(
            prepare(sql::insert_rows(t)),
            prepare(sql::upsert_cursors(t)),
        )?;
        Ok(Statements {
            read_state,
            read_cursors,
            candidates_above,
            candidates_late,
            next_position,
            insert_rows,
            upsert_cursors,
        })
    }

    /// Whether the connection is gone and the projector must be rebuilt.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Open a batch: `Ok(None)` when another projector holds the stream's lock.
    pub async fn begin_batch(&mut self) -> Result<Option<PendingBatch>> {
        self.begin(false).await
    }

    /// Open a batch, using the candidates read ahead if `use_ahead` and they still hold.
    async fn begin(&mut self, use_ahead: bool) -> Result<Option<PendingBatch>> {
        let ahead = self.ahead.take();
        let ahead = if use_ahead {
            ahead
        } else {
            self.read_ahead_discarded += u64::from(ahead.is_some());
            None
        };
        if self.in_transaction || self.mutex.is_some() {
            self.abort().await;
        }
        self.in_transaction = true;
        let t = &self.config.tables;
        let (mutex_sql, begin_sql) = (sql::try_mutex(t), sql::begin(t));
        // Polled together so the driver pipelines them, mutex first. Once the statements
        // are prepared, the batch's first reads go in the same flight: when the mutex or
        // the lock was not taken their results are dropped with the transaction.
        let (mutex, begun, state) = if let Some(st) = &self.statements {
            let (mutex, begun, state) = tokio::join!(
                self.client.simple_query(&mutex_sql),
                self.client.batch_execute(&begin_sql),
                self.read_state(st)
            );
            (mutex, begun, Some(state))
        } else {
            let (mutex, begun) = tokio::join!(
                self.client.simple_query(&mutex_sql),
                self.client.batch_execute(&begin_sql)
            );
            (mutex, begun, None)
        };
        let row = match mutex {
            Ok(messages) => mutex_row(&messages),
            Err(e) => {
                self.abort().await;
                return Err(Error::from_pg("taking the projector's lock", e));
            }
        };
        let Some((taken, key)) = row else {
            self.abort().await;
            return Err(Error::Config(
                "the projector mutex query returned no row".into(),
            ));
        };
        if taken {
            self.mutex = Some(key);
        }
        match begun {
            Ok(()) if taken => {}
            Ok(()) => {
                self.abort().await;
                return Ok(None);
            }
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                self.abort().await;
                return Ok(None);
            }
            Err(e) => {
                self.abort().await;
                return Err(Error::from_pg("locking the aggregated stream", e));
            }
        }
        match self.read_batch(state, ahead).await {
            Ok(batch) => Ok(Some(batch)),
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    /// Reads the batch's candidates; `state` is the batch's first read when it was
    /// pipelined with the transaction's start.
    ///
    /// `ahead` is used when the batch has the one group it was read for, at the cursor
    /// and window it was read for: then nobody moved the cursors since the batch that
    /// wrote them (a `DELETE` or `TRUNCATE` deletes them, another projector with these
    /// wildcards moves them), and its snapshot, taken after that batch's, stands in for
    /// this batch's in the *above* query, the highest visible position and the cursors
    /// written. The *late* query still runs in this batch's snapshot, which sees at least
    /// what the read-ahead's did. Rows another projector inserted since are refused by the
    /// primary key, and the batch runs again without the read-ahead.
    async fn read_batch(
        &mut self,
        state: Option<Result<(State, Vec<CursorGroup>)>>,
        ahead: Option<ReadAhead>,
    ) -> Result<PendingBatch> {
        if self.statements.is_none() {
            self.statements = Some(self.prepare().await?);
        }
        let Some(st) = &self.statements else {
            return Err(Error::Config(
                "projector statements are not prepared".into(),
            ));
        };
        let (mut state, groups) = match state {
            Some(state) => state?,
            None => self.read_state(st).await?,
        };
        let ahead = match ahead {
            Some(a)
                if a.at.elapsed() <= READ_AHEAD_MAX_AGE
                    && groups.len() == 1
                    && !groups[0].rewrite
                    && groups[0].wildcards == a.read.wildcards
                    && groups[0].cursor == a.read.cursor
                    && self.window == a.read.window =>
            {
                Some(a)
            }
            Some(_) => {
                self.read_ahead_discarded += 1;
                None
            }
            None => None,
        };
        let read_ahead = ahead.is_some();
        let mut fetched = Vec::with_capacity(groups.len());
        let mut cursor_snapshot = state.snapshot.clone();
        let mut max_visible = state.max_visible;
        let mut preassigned = HashMap::new();
        if let Some(a) = ahead {
            self.read_ahead_used += 1;
            self.assigned_ahead += a.assigned.len() as u64;
            preassigned = a.assigned;
            fetched.push(
                self.fetch_group(st, &groups[0], &state.snapshot, Some(a.rows))
                    .await?,
            );
            cursor_snapshot = a.snapshot;
            max_visible = a.max_visible;
        } else {
            for group in &groups {
                fetched.push(self.fetch_group(st, group, &state.snapshot, None).await?);
            }
        }
        state.max_visible = max_visible;
        let limit = self.config.batch_size;
        let empty_windows: Vec<bool> = fetched.iter().map(|f| f.above.is_empty()).collect();
        let mut merged = merge(&groups, fetched, self.window, limit, state.max_visible);
        self.skip_empty_stretches(st, &groups, &empty_windows, &mut merged.positions, &state)
            .await?;

        let mut cursor_wildcards = Vec::with_capacity(self.config.wildcards.len());
        let mut cursor_positions = Vec::with_capacity(self.config.wildcards.len());
        let mut write_cursors = !merged.rows.is_empty();
        for (group, position) in groups.iter().zip(&merged.positions) {
            write_cursors |= group.rewrite
                || *position != group.cursor.position
                || snapshot_stale(group.cursor.snapshot.as_deref(), &cursor_snapshot);
            for w in &group.wildcards {
                cursor_wildcards.push(w.clone());
                cursor_positions.push(*position);
            }
        }
        // Sparse matches (other streams in between) widen the window; dense ones keep it.
        self.window = if merged.rows.len() < limit / 2 {
            self.window.saturating_mul(2).min(MAX_WINDOW)
        } else {
            (limit as i64).clamp(MIN_WINDOW, MAX_WINDOW)
        };
        // A catch-up of one group: its next batch is read while this one is written.
        let next = (groups.len() == 1 && merged.more && write_cursors).then(|| NextRead {
            wildcards: groups[0].wildcards.clone(),
            cursor: Cursor {
                position: merged.positions[0],
                snapshot: Some(cursor_snapshot.clone()),
            },
            window: self.window,
        });
        Ok(PendingBatch {
            rows: merged.rows,
            cursor_wildcards,
            cursor_positions,
            write_cursors,
            snapshot: cursor_snapshot,
            home: state.home,
            more: merged.more,
            read_ahead,
            next,
            preassigned,
        })
    }

    /// The batch's view of the database and the configured wildcards' cursors, grouped.
    /// Refuses an unsafe sequence before anything is read.
    async fn read_state(&self, st: &Statements) -> Result<(State, Vec<CursorGroup>)> {
        let t = &self.config.tables;
        let wildcards = &self.config.wildcards;
        let state_params: [&(dyn ToSql + Sync); 1] = [&t.sequence];
        let cursor_params: [&(dyn ToSql + Sync); 1] = [wildcards];
        let (state, stored) = tokio::join!(
            self.client.query_one(&st.read_state, &state_params),
            self.client.query(&st.read_cursors, &cursor_params),
        );
        let state = state.map_err(|e| Error::from_pg("reading the database's state", e))?;
        let stored = stored.map_err(|e| Error::from_pg("reading the projector cursors", e))?;
        check_sequence(&t.sequence, state.get(4), state.get(5))?;
        let lowest_visible: Option<i64> = state.get(6);
        let state = State {
            snapshot: state.get(0),
            max_visible: state.get(1),
            home: CursorHome {
                cluster: state.get(2),
                table: state.get(3),
            },
        };
        let stored: Vec<StoredCursor> = stored
            .iter()
            .map(|r| StoredCursor {
                wildcard: r.get(0),
                cursor: Cursor {
                    position: r.get(1),
                    snapshot: r.get(2),
                },
                home: CursorHome {
                    cluster: r.get(3),
                    table: r.get(4),
                },
            })
            .collect();
        let groups = group_cursors(wildcards, &stored, state.home, lowest_visible);
        Ok((state, groups))
    }

    /// An empty window with more rows beyond it (a `setval` far ahead, deleted history):
    /// nothing visible lies between the window's end and the next visible row, so the
    /// group's cursor moves to just below that row instead of crossing window by window.
    async fn skip_empty_stretches(
        &self,
        st: &Statements,
        groups: &[CursorGroup],
        empty_windows: &[bool],
        positions: &mut [i64],
        state: &State,
    ) -> Result<()> {
        for ((group, position), empty) in groups.iter().zip(positions).zip(empty_windows) {
            let end = group.cursor.position.saturating_add(self.window);
            if !*empty || *position != end || state.max_visible.is_none_or(|m| m <= end) {
                continue;
            }
            let next: Option<i64> = self
                .client
                .query_one(&st.next_position, &[&end])
                .await
                .map_err(|e| Error::from_pg("looking for the next message", e))?
                .get(0);
            if let Some(next) = next {
                *position = (next - 1).max(end);
            }
        }
        Ok(())
    }

    /// Run one group's two candidate queries (pipelined), or only the *late* one when
    /// the *above* rows were read ahead.
    async fn fetch_group(
        &self,
        st: &Statements,
        group: &CursorGroup,
        now: &str,
        ahead: Option<Vec<OriginRow>>,
    ) -> Result<GroupRows> {
        let limit = self.config.batch_size as i64;
        let need_bodies = self.config.partitioner.is_none();
        let position = group.cursor.position;
        let window_end = position.saturating_add(self.window);
        let above_params: [&(dyn ToSql + Sync); 5] = [
            &position,
            &window_end,
            &group.wildcards,
            &limit,
            &need_bodies,
        ];
        let above = async {
            match ahead {
                Some(rows) => Ok(rows),
                None => self
                    .client
                    .query(&st.candidates_above, &above_params)
                    .await
                    .map(origin_rows)
                    .map_err(|e| Error::from_pg("selecting new messages", e)),
            }
        };
        let late = async {
            let Some(snapshot) = &group.cursor.snapshot else {
                return Ok(Vec::new());
            };
            let (Some(then_xmax), Some(now_xmax)) = (snapshot_xmax(snapshot), snapshot_xmax(now))
            else {
                return Err(Error::Config(format!(
                    "unreadable projector snapshot {snapshot:?} (now {now:?})"
                )));
            };
            let params: [&(dyn ToSql + Sync); 7] = [
                &position,
                &snapshot_xip(snapshot),
                &group.wildcards,
                &limit,
                &need_bodies,
                &then_xmax.to_string(),
                &now_xmax.to_string(),
            ];
            self.client
                .query(&st.candidates_late, &params)
                .await
                .map_err(|e| Error::from_pg("selecting late messages", e))
        };
        let (above, late) = tokio::join!(above, late);
        let above = above?;
        let late = origin_rows(late?);
        let size = self.config.batch_size;
        Ok(GroupRows {
            above_full: above.len() >= size,
            above,
            late_full: late.len() >= size,
            late,
        })
    }

    /// Write the batch with the given assignments (one per row, in row order) and commit.
    async fn write_and_commit(
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
        let Some(st) = &self.statements else {
            return Err(Error::Config(
                "projector statements are not prepared".into(),
            ));
        };
        let n = batch.rows.len();
        let (partitions, sizes, offsets) = reservations(assignments);
        let mut ids = Vec::with_capacity(n);
        let mut streams = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut parts = Vec::with_capacity(n);
        let mut occurred = Vec::with_capacity(n);
        let mut globals = Vec::with_capacity(n);
        let mut added = Vec::with_capacity(n);
        for (row, a) in batch.rows.iter().zip(assignments) {
            ids.push(row.message_id);
            streams.push(row.stream.as_str());
            versions.push(row.version);
            parts.push(a.partition);
            occurred.push(a.occurred_at);
            globals.push(row.global_position);
            added.push(row.added_at);
        }

        let insert = async {
            if n > 0 {
                self.client
                    .execute(
                        &st.insert_rows,
                        &[
                            &ids,
                            &streams,
                            &versions,
                            &parts,
                            &offsets,
                            &occurred,
                            &globals,
                            &added,
                            &partitions,
                            &sizes,
                        ],
                    )
                    .await
                    .map_err(|e| Error::from_pg("inserting projected messages", e))?;
            }
            Ok::<(), Error>(())
        };
        let cursor = async {
            if batch.write_cursors {
                self.client
                    .execute(
                        &st.upsert_cursors,
                        &[
                            &batch.cursor_wildcards,
                            &batch.cursor_positions,
                            &batch.snapshot,
                            &batch.home.cluster,
                            &batch.home.table,
                        ],
                    )
                    .await
                    .map_err(|e| Error::from_pg("advancing the projector cursors", e))?;
            }
            Ok::<(), Error>(())
        };
        // The mutex is released after the commit, in its own request: it runs even if
        // the commit fails, and nobody can take the mutex before the batch is visible.
        let release = self.mutex.take().map(sql::release_mutex);
        let released = async {
            match &release {
                Some(q) => self.client.simple_query(q).await.map(drop),
                None => Ok(()),
            }
        };
        // Polled together so the driver sends the four requests in one flight. Each is
        // awaited: after a failed statement the next ones fail with "transaction is
        // aborted", which must not hide the first error, and the server answers the
        // `COMMIT` of an aborted transaction with a rollback, not an error, so the
        // statements' own results decide whether the batch was written.
        let (inserted, moved, committed, released) = tokio::join!(
            insert,
            cursor,
            self.client.batch_execute("COMMIT"),
            released
        );
        first_real_error([inserted, moved])?;
        committed.map_err(|e| Error::from_pg("committing the batch", e))?;
        released.map_err(|e| Error::from_pg("releasing the projector's lock", e))?;
        Ok(BatchOutcome {
            projected: n,
            more: batch.more,
        })
    }

    /// Roll back an open batch; errors are ignored because the server discards the
    /// transaction anyway when the connection is gone.
    pub async fn abort(&mut self) {
        if self.in_transaction {
            let _ = self.client.batch_execute("ROLLBACK").await;
            self.in_transaction = false;
        }
        if let Some(key) = self.mutex.take() {
            let _ = self.client.simple_query(&sql::release_mutex(key)).await;
        }
    }

    /// Run one batch with the built-in partitioner for rows whose message time is known.
    /// Returns `Ok(None)` when locked, `Err` on failure, and hands back the batch when some
    /// rows need the caller (no partitioner configured, or a row without a message time).
    ///
    /// During a catch-up (one group of wildcards, more rows waiting) the next batch's
    /// candidates are read on a second connection while this batch is written, so the
    /// server works on both at once. A batch that used them and failed runs again once
    /// without them (a batch handed to the caller: see [`Projector::finish_batch`]).
    pub async fn run_builtin_batch(&mut self) -> Result<BuiltinStep> {
        let mut use_ahead = true;
        loop {
            let Some(batch) = self.begin(use_ahead).await? else {
                return Ok(BuiltinStep::Locked);
            };
            let assignments = self.config.partitioner.and_then(|partitioner| {
                batch
                    .rows
                    .iter()
                    .map(|row| {
                        row.occurred_at.map(|occurred_at| Assignment {
                            partition: partitioner.partition(&row.stream),
                            occurred_at,
                        })
                    })
                    .collect::<Option<Vec<_>>>()
            });
            let Some(assignments) = assignments else {
                return Ok(BuiltinStep::NeedsCaller(Box::new(batch)));
            };
            let read_ahead = batch.read_ahead;
            match self.finish_batch(batch, &assignments).await {
                Ok(outcome) => return Ok(BuiltinStep::Done(outcome)),
                Err(_) if read_ahead && use_ahead => use_ahead = false,
                Err(e) => return Err(e),
            }
        }
    }

    /// Write the batch with the given assignments (one per row, in row order) and commit;
    /// during a catch-up, the next batch's candidates are read meanwhile. If it fails and
    /// [`PendingBatch::read_ahead`] says it used candidates read ahead, the caller runs
    /// the batch again (rows another projector inserted since are the likely cause, and
    /// the next batch reads on this connection alone).
    pub async fn finish_batch(
        &mut self,
        batch: PendingBatch,
        assignments: &[Assignment],
    ) -> Result<BatchOutcome> {
        self.finish_batch_with(batch, assignments, None).await
    }

    /// [`Projector::finish_batch`], and `pre` assigns the rows read ahead as soon as
    /// they arrive, while this batch is still being written: the next batch then finds
    /// them in [`PendingBatch::preassigned`].
    pub async fn finish_batch_with(
        &mut self,
        batch: PendingBatch,
        assignments: &[Assignment],
        pre: Option<PreAssign<'_>>,
    ) -> Result<BatchOutcome> {
        let read_ahead = batch.read_ahead;
        let outcome = self.finish_reading_ahead(batch, assignments, pre).await;
        if outcome.is_err() && read_ahead {
            self.read_ahead_discarded += 1;
        }
        outcome
    }

    async fn finish_reading_ahead(
        &mut self,
        batch: PendingBatch,
        assignments: &[Assignment],
        pre: Option<PreAssign<'_>>,
    ) -> Result<BatchOutcome> {
        let Some(next) = batch.next.clone() else {
            return self.write_and_commit(batch, assignments).await;
        };
        if self.reader().await.is_none() {
            return self.write_and_commit(batch, assignments).await;
        }
        let reader = self.reader.take();
        let limit = self.config.batch_size as i64;
        let need_bodies = self.config.partitioner.is_none();
        let sequence = self.config.tables.sequence.clone();
        let (outcome, ahead) = tokio::join!(self.write_and_commit(batch, assignments), async {
            match &reader {
                Some(r) => Some(
                    read_ahead(r, next, &sequence, limit, need_bodies)
                        .await
                        .map(|mut ahead| {
                            if let Some(pre) = pre {
                                let assigned = pre(&ahead.rows);
                                ahead.assigned = ahead
                                    .rows
                                    .iter()
                                    .zip(assigned)
                                    .filter_map(|(row, a)| a.map(|a| (row.message_id, a)))
                                    .collect();
                            }
                            ahead
                        }),
                ),
                None => None,
            }
        });
        self.reader = reader;
        match ahead {
            Some(Ok(ahead)) if outcome.is_ok() => self.ahead = Some(ahead),
            Some(Err(_)) => self.reader = None,
            _ => {}
        }
        outcome
    }
}

/// Open the second connection and prepare what it reads.
async fn open_reader(config: &ProjectorConfig, dsn: &str) -> Result<Reader> {
    let name = format!(
        "depeche-rs projector {} (reading ahead)",
        config.tables.stream
    );
    let client = connect(dsn, &name).await?;
    client
        .batch_execute("SET plan_cache_mode = force_custom_plan")
        .await
        .map_err(|e| Error::from_pg("configuring the projector's second session", e))?;
    let t = &config.tables;
    let (state_sql, above_sql) = (sql::read_state(t), sql::candidates_above(t));
    let (read_state, candidates_above) =
        tokio::try_join!(client.prepare(&state_sql), client.prepare(&above_sql),)
            .map_err(|e| Error::from_pg("preparing the projector's read-ahead", e))?;
    Ok(Reader {
        client,
        read_state,
        candidates_above,
    })
}

/// Read the next batch's *above* candidates in a read-only repeatable-read transaction
/// of the second connection: its snapshot, the highest position visible in it, the rows.
async fn read_ahead(
    reader: &Reader,
    read: NextRead,
    sequence: &str,
    limit: i64,
    need_bodies: bool,
) -> Result<ReadAhead> {
    let end = read.cursor.position.saturating_add(read.window);
    let client = &reader.client;
    let state_params: [&(dyn ToSql + Sync); 1] = [&sequence];
    let above_params: [&(dyn ToSql + Sync); 5] = [
        &read.cursor.position,
        &end,
        &read.wildcards,
        &limit,
        &need_bodies,
    ];
    let (begun, state, rows, ended) = tokio::join!(
        client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
        client.query_one(&reader.read_state, &state_params),
        client.query(&reader.candidates_above, &above_params),
        client.batch_execute("COMMIT"),
    );
    let failed = |e| Error::from_pg("reading the next batch ahead", e);
    begun.map_err(failed)?;
    let state = state.map_err(failed)?;
    let rows = rows.map_err(failed)?;
    ended.map_err(failed)?;
    Ok(ReadAhead {
        read,
        at: Instant::now(),
        snapshot: state.get(0),
        max_visible: state.get(1),
        rows: origin_rows(rows),
        assigned: HashMap::new(),
    })
}

/// Result of [`Projector::run_builtin_batch`].
#[derive(Debug)]
pub enum BuiltinStep {
    /// Another projector holds the lock.
    Locked,
    /// The batch was written.
    Done(BatchOutcome),
    /// The caller must assign (some) rows, then call `finish_batch` or `abort`.
    NeedsCaller(Box<PendingBatch>),
}

/// What the batch reserves: each partition it uses once (ascending, so concurrent
/// upserts would lock `_maxpos` rows in one order) with its number of rows, and for each
/// row its offset from its partition's new maximum: the first of `k` rows in a partition
/// gets `-(k - 1)`, the last `0`, so a partition's rows keep the batch's order.
fn reservations(assignments: &[Assignment]) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
    let mut counts: HashMap<i64, i64> = HashMap::new();
    for a in assignments {
        *counts.entry(a.partition).or_insert(0) += 1;
    }
    let mut seen: HashMap<i64, i64> = HashMap::with_capacity(counts.len());
    let offsets = assignments
        .iter()
        .map(|a| {
            let k = seen.entry(a.partition).or_insert(0);
            *k += 1;
            *k - counts[&a.partition]
        })
        .collect();
    let mut partitions: Vec<i64> = counts.keys().copied().collect();
    partitions.sort_unstable();
    let sizes = partitions.iter().map(|p| counts[p]).collect();
    (partitions, sizes, offsets)
}

/// The first error that is not a consequence of an earlier one in the same transaction.
fn first_real_error<const N: usize>(results: [Result<()>; N]) -> Result<()> {
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

/// Refuse a sequence whose values can come out of commit order within a stream: with
/// `CACHE n > 1` each session draws from its own block, so a stream's next version can
/// get a lower global position than its previous one.
fn check_sequence(name: &str, cache: Option<i64>, increment: Option<i64>) -> Result<()> {
    let unsafe_setting = match (cache, increment) {
        (Some(c), _) if c > 1 => Some((
            format!("CACHE {c}"),
            format!("ALTER SEQUENCE {name} CACHE 1"),
        )),
        (_, Some(i)) if i < 1 => Some((
            format!("INCREMENT {i}"),
            format!("ALTER SEQUENCE {name} INCREMENT 1"),
        )),
        _ => None,
    };
    match unsafe_setting {
        Some((setting, fix)) => Err(Error::UnsafeSequence {
            sequence: name.to_owned(),
            setting,
            fix,
        }),
        None => Ok(()),
    }
}

/// `(taken, key)` from the mutex query's row.
fn mutex_row(messages: &[SimpleQueryMessage]) -> Option<(bool, i64)> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => {
            let taken = row.get(0)? == "t";
            let key = row.get(1)?.parse().ok()?;
            Some((taken, key))
        }
        _ => None,
    })
}

fn origin_rows(rows: Vec<tokio_postgres::Row>) -> Vec<OriginRow> {
    rows.iter()
        .map(|r| OriginRow {
            message_id: r.get(0),
            stream: r.get(1),
            version: r.get(2),
            global_position: r.get(3),
            added_at: r.get(4),
            occurred_at: r.get(5),
            message: r.get(6),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{check_sequence, reservations, Assignment};

    #[test]
    fn reservations_count_each_partition_and_keep_the_batch_order() {
        let at = chrono::NaiveDateTime::default();
        let rows: Vec<Assignment> = [7, 3, 7, 7, 3, 9]
            .iter()
            .map(|&partition| Assignment {
                partition,
                occurred_at: at,
            })
            .collect();
        let (partitions, sizes, offsets) = reservations(&rows);
        assert_eq!(partitions, vec![3, 7, 9]);
        assert_eq!(sizes, vec![2, 3, 1]);
        // Partition 7's rows land at max-2, max-1, max; 3's at max-1, max; 9's at max.
        assert_eq!(offsets, vec![-2, -1, -1, 0, 0, 0]);
        assert_eq!(reservations(&[]), (vec![], vec![], vec![]));
    }

    #[test]
    fn caching_and_descending_sequences_are_refused() {
        assert!(check_sequence("s", Some(1), Some(1)).is_ok());
        assert!(check_sequence("s", None, None).is_ok());
        let err = check_sequence("s", Some(20), Some(1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("CACHE 20") && err.contains("ALTER SEQUENCE s CACHE 1"));
        assert!(check_sequence("s", Some(1), Some(-1)).is_err());
    }
}
