//! `_native.SubscriptionSession`: the engine's subscription read path, one connection per
//! session, used by one Python thread at a time. Batches cross into Python once, as
//! `ClaimedBatch` holding `BatchRow`s.

use std::sync::Mutex;

use chrono::NaiveDateTime;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::py::errors::py_err;
use crate::py::runtime::{block_on, runtime, Interrupted};
use crate::py::values::py_uuid;
use depeche_rs_core::subscription::{
    Batch, PartitionState as State, StoredRow, SubscriptionSession as Engine, SubscriptionTables,
};
use depeche_rs_core::Error;

/// One position of a claimed partition and the message stored there.
#[pyclass(module = "depeche_rs._native", name = "BatchRow", frozen, get_all)]
pub struct PyBatchRow {
    /// Position in the partition.
    position: i64,
    /// The message, or None when it is no longer in the store.
    stored: Option<Py<PyStoredRow>>,
}

/// A message as stored, read with a batch.
#[pyclass(module = "depeche_rs._native", name = "StoredRow", frozen)]
pub struct PyStoredRow {
    row: StoredRow,
}

#[pymethods]
impl PyStoredRow {
    /// The message id, a `uuid.UUID`.
    #[getter]
    fn message_id<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        py_uuid(py, &self.row.message_id)
    }

    /// The origin stream.
    #[getter]
    fn stream(&self) -> &str {
        &self.row.stream
    }

    /// The version in the origin stream.
    #[getter]
    fn version(&self) -> i64 {
        self.row.version
    }

    /// The message body, JSON text.
    #[getter]
    fn message(&self) -> &str {
        &self.row.body
    }

    /// The global position in the store.
    #[getter]
    fn global_position(&self) -> i64 {
        self.row.global_position
    }

    /// When the message was written (naive UTC).
    #[getter]
    fn added_at(&self) -> NaiveDateTime {
        self.row.added_at
    }
}

/// A partition's rows read under its lock, after its stored position.
#[pyclass(module = "depeche_rs._native", name = "ClaimedBatch", frozen)]
pub struct PyClaimedBatch {
    /// The stored position the rows follow (-1 for none).
    #[pyo3(get)]
    position: i64,
    /// The rows, in position order.
    #[pyo3(get)]
    rows: Py<PyList>,
}

impl PyClaimedBatch {
    fn new(py: Python<'_>, batch: Batch) -> PyResult<Self> {
        let rows = PyList::empty(py);
        for row in batch.rows {
            let stored = match row.message {
                Some(row) => Some(Py::new(py, PyStoredRow { row })?),
                None => None,
            };
            let position = row.position;
            rows.append(Py::new(py, PyBatchRow { position, stored })?)?;
        }
        Ok(Self {
            position: batch.position,
            rows: rows.unbind(),
        })
    }
}

/// A partition's highest position and the subscription's stored position in it.
#[pyclass(
    module = "depeche_rs._native",
    name = "PartitionState",
    frozen,
    get_all
)]
pub struct PyPartitionState {
    /// The partition.
    partition: i64,
    /// Its highest position.
    max_position: i64,
    /// The stored position (-1 if none, or without a state table).
    position: i64,
}

impl From<State> for PyPartitionState {
    fn from(s: State) -> Self {
        Self {
            partition: s.partition,
            max_position: s.max_position,
            position: s.position,
        }
    }
}

/// A subscription's connection: partition locks, batches, acknowledgements.
///
/// Acknowledgements and unlocks are sent without waiting; the server applies them in
/// the order sent. After any error the session is closed (its locks go with it). One
/// thread uses a session at a time; `close` may come from any thread (it waits for a
/// call in progress).
#[pyclass(module = "depeche_rs._native", name = "SubscriptionSession", frozen)]
pub struct PySubscriptionSession {
    /// The engine and the process that opened it (a forked child must not use it).
    session: Mutex<Option<(u32, Engine)>>,
}

type Slot = Option<(u32, Engine)>;

#[pymethods]
impl PySubscriptionSession {
    /// Connect to `dsn` for subscription `name` of aggregated stream `stream` over store
    /// `store`. With `state_table` the engine keeps the positions there (claim, ack);
    /// without, only `read_after` and `partitions` (maxima only) work.
    #[new]
    #[pyo3(signature = (dsn, store, stream, name, state_table=None, synchronous_commit=false))]
    fn new(
        py: Python<'_>,
        dsn: &str,
        store: &str,
        stream: &str,
        name: &str,
        state_table: Option<&str>,
        synchronous_commit: bool,
    ) -> PyResult<Self> {
        let tables = SubscriptionTables::new(store, stream, state_table).map_err(py_err)?;
        let engine = block_on(py, async {
            Engine::connect(dsn, &tables, name, synchronous_commit).await
        })?;
        Ok(Self {
            session: Mutex::new(Some((std::process::id(), engine))),
        })
    }

    /// True once closed, or when the server ended the session.
    #[getter]
    fn closed(&self) -> bool {
        match &*self.slot() {
            Some((owner, engine)) => *owner != std::process::id() || engine.is_closed(),
            None => true,
        }
    }

    /// Raise `DatabaseConnectionError` if the connection is gone (or a statement sent
    /// without waiting failed); never blocks.
    fn check(&self) -> PyResult<()> {
        self.call(Engine::check)
    }

    /// Wait until everything sent is done; raise the first error.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.wait(|engine| block_on(py, engine.flush()))
    }

    /// Try the advisory lock `key`; True when taken.
    fn try_lock(&self, py: Python<'_>, key: i64) -> PyResult<bool> {
        self.wait(|engine| block_on(py, engine.try_lock(key)))
    }

    /// Release the advisory lock `key` after everything sent before (does not wait).
    fn unlock(&self, key: i64) -> PyResult<()> {
        self.call(|engine| engine.unlock(key))
    }

    /// Lock `key` (if given) and read the stored position and up to `count` rows after
    /// it, in one round trip; None if the lock is held elsewhere.
    #[pyo3(signature = (partition, key, count))]
    fn claim(
        &self,
        py: Python<'_>,
        partition: i64,
        key: Option<i64>,
        count: i64,
    ) -> PyResult<Option<PyClaimedBatch>> {
        self.wait(|engine| block_on(py, engine.claim(partition, key, count)))?
            .map(|b| PyClaimedBatch::new(py, b))
            .transpose()
    }

    /// Send the claim of `partition` (lock `key`, the stored position and up to `count`
    /// rows after it) without waiting: the server runs it while the caller handles the
    /// batch before. `take_ahead` returns its result. One claim at a time is ahead.
    fn claim_ahead(&self, partition: i64, key: i64, count: i64) -> PyResult<()> {
        let runtime = runtime()?;
        let _context = runtime.enter();
        self.call(|engine| engine.claim_ahead(partition, key, count))
    }

    /// The claim sent with `claim_ahead`, as `claim` returns it: None if its lock is held
    /// elsewhere.
    fn take_ahead(&self, py: Python<'_>) -> PyResult<Option<PyClaimedBatch>> {
        self.wait(|engine| block_on(py, engine.take_ahead()))?
            .map(|b| PyClaimedBatch::new(py, b))
            .transpose()
    }

    /// Lock `key` (if given) and read up to `count` rows after `after`; None if the lock
    /// is held elsewhere.
    #[pyo3(signature = (partition, key, after, count))]
    fn read_after(
        &self,
        py: Python<'_>,
        partition: i64,
        key: Option<i64>,
        after: i64,
        count: i64,
    ) -> PyResult<Option<PyClaimedBatch>> {
        self.wait(|engine| block_on(py, engine.read_after(partition, key, after, count)))?
            .map(|b| PyClaimedBatch::new(py, b))
            .transpose()
    }

    /// Store `position` for `partition` (never backwards), after everything sent before
    /// (does not wait).
    fn ack(&self, partition: i64, position: i64) -> PyResult<()> {
        self.call(|engine| engine.ack(partition, position))
    }

    /// The committed position of `partition` (-1 if none), read after everything sent.
    fn stored_position(&self, py: Python<'_>, partition: i64) -> PyResult<i64> {
        self.wait(|engine| block_on(py, engine.stored_position(partition)))
    }

    /// The partitions behind their stored position, with both positions (without a state
    /// table: every partition's max position, and -1).
    fn partitions(&self, py: Python<'_>) -> PyResult<Vec<PyPartitionState>> {
        let states = self.wait(|engine| block_on(py, engine.partitions()))?;
        Ok(states.into_iter().map(Into::into).collect())
    }

    /// Close the connection, releasing its locks.
    fn close(&self, py: Python<'_>) {
        // Detached: a call in progress on another thread holds the slot and may need
        // the GIL to finish.
        let taken = py.detach(|| self.slot().take());
        discard(taken);
    }
}

impl PySubscriptionSession {
    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Run a call that does not wait on the database; a failure closes the connection.
    fn call<T>(&self, f: impl FnOnce(&mut Engine) -> Result<T, Error>) -> PyResult<T> {
        self.wait(|engine| f(engine).map_err(Interrupted::Failed))
    }

    /// Run a call; a failure leaves the connection in an unknown state: close it.
    fn wait<T>(&self, f: impl FnOnce(&mut Engine) -> Result<T, Interrupted>) -> PyResult<T> {
        let mut slot = self.slot();
        let pid = std::process::id();
        let result = match &mut *slot {
            Some((owner, engine)) if *owner == pid => f(engine),
            _ => Err(Interrupted::Failed(Error::Lost(
                "the subscription connection is closed".into(),
            ))),
        };
        result.map_err(|e| {
            discard(slot.take());
            PyErr::from(e)
        })
    }
}

fn discard(slot: Slot) {
    if let Some((owner, engine)) = slot {
        if owner == std::process::id() {
            drop(engine);
        } else {
            // The socket belongs to the parent process: never talk on it.
            std::mem::forget(engine);
        }
    }
}

impl Drop for PySubscriptionSession {
    fn drop(&mut self) {
        discard(self.slot().take());
    }
}
