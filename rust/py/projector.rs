//! `_native.Projector`: drives the engine's batches from Python, entering Python at most
//! once per batch (to call a Python partitioner or fetch missing message times).

use chrono::NaiveDateTime;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::py::errors::py_err;
use crate::py::runtime::{block_on, Interrupted};
use crate::py::values::py_uuid;
use depeche_rs_core::{
    Assignment, BuiltinPartitioner, BuiltinStep, Error, OriginRow, PendingBatch, PreAssign,
    Projector as Engine, ProjectorConfig,
};

/// A projector for one aggregated stream, holding one connection, and a second one for
/// reading ahead once it has had a catch-up.
///
/// Not shareable between threads at once (a second concurrent call raises); the Python
/// `StreamProjector` serialises calls.
#[pyclass(module = "depeche_rs._native")]
pub struct Projector {
    dsn: String,
    config: ProjectorConfig,
    engine: Option<(u32, Engine)>,
}

type Resolved = Vec<(Option<i64>, Option<NaiveDateTime>)>;

/// What one `Projector.run` did.
#[pyclass(module = "depeche_rs._native", name = "RunOutcome", frozen, get_all)]
pub struct RunOutcome {
    /// Messages projected.
    projected: usize,
    /// More messages were waiting when it stopped (budget, `max_batches`).
    more: bool,
    /// Another projector was inside a batch of the stream, so nothing was done.
    locked: bool,
}

/// How reading ahead went since the projector connected.
#[pyclass(
    module = "depeche_rs._native",
    name = "ReadAheadCounts",
    frozen,
    get_all
)]
pub struct ReadAheadCounts {
    /// Batches whose candidates were read ahead on the second connection.
    used: u64,
    /// Read-aheads thrown away.
    discarded: u64,
    /// Rows of the batches that used one, assigned by Python while the batch before them
    /// was written.
    assigned: u64,
}

/// A message the projector needs Python for: its partition (a Python partitioner) or its
/// time (not recorded when it was written). The `resolve` callback gets a list of them.
/// Values are turned into Python objects only when read.
#[pyclass(module = "depeche_rs._native", name = "ResolveRow")]
pub struct ResolveRow {
    row: OriginRow,
}

#[pymethods]
impl ResolveRow {
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

    /// The message time recorded at write time (naive UTC), or None. A callback that
    /// finds the time itself may set it, for the callback it hands the row on to.
    #[getter]
    fn occurred_at(&self) -> Option<NaiveDateTime> {
        self.row.occurred_at
    }

    #[setter]
    fn set_occurred_at(&mut self, value: Option<NaiveDateTime>) {
        self.row.occurred_at = value;
    }

    /// The message body, JSON text (None when neither a Python partitioner nor the
    /// message time needs it).
    #[getter]
    fn message(&self) -> Option<&str> {
        self.row.message.as_deref()
    }
}

#[pymethods]
impl Projector {
    /// `partitioner` is "stream_name", "hash_mod" (with `modulus`) or None (the caller's
    /// `resolve` callback assigns every partition).
    #[new]
    #[pyo3(signature = (dsn, store, stream, wildcards, batch_size, partitioner=None, modulus=None))]
    fn new(
        dsn: String,
        store: &str,
        stream: &str,
        wildcards: Vec<String>,
        batch_size: usize,
        partitioner: Option<&str>,
        modulus: Option<u32>,
    ) -> PyResult<Self> {
        let partitioner = match (partitioner, modulus) {
            (None, _) => None,
            (Some("stream_name"), _) => Some(BuiltinPartitioner::StreamName),
            (Some("hash_mod"), Some(n)) if n >= 1 => Some(BuiltinPartitioner::HashMod(n)),
            (Some(other), _) => {
                return Err(PyValueError::new_err(format!(
                    "unknown built-in partitioner {other:?} (or hash_mod without a modulus >= 1)"
                )))
            }
        };
        let config = ProjectorConfig::new(store, stream, wildcards, batch_size, partitioner)
            .map_err(py_err)?;
        Ok(Self {
            dsn,
            config,
            engine: None,
        })
    }

    /// Project batches until none is left, the budget is over or `max_batches` ran.
    ///
    /// `resolve(rows, need_partition)` is called with a list of `ResolveRow`s and returns
    /// one `(partition, occurred_at)` per row (naive UTC datetimes).
    #[pyo3(signature = (resolve=None, budget=None, max_batches=None))]
    fn run(
        &mut self,
        py: Python<'_>,
        resolve: Option<Py<PyAny>>,
        budget: Option<Py<PyAny>>,
        max_batches: Option<usize>,
    ) -> PyResult<RunOutcome> {
        let outcome = |projected, more, locked| RunOutcome {
            projected,
            more,
            locked,
        };
        let mut total = 0usize;
        let mut batches = 0usize;
        loop {
            let engine = self.engine(py)?;
            let step = block_on(py, engine.run_builtin_batch());
            let step = match step {
                Ok(step) => step,
                Err(e) => return Err(self.fail(e)),
            };
            let more = match step {
                BuiltinStep::Locked => return Ok(outcome(total, false, true)),
                BuiltinStep::Done(outcome) => {
                    total += outcome.projected;
                    outcome.more
                }
                BuiltinStep::NeedsCaller(batch) => {
                    let more = batch.more();
                    match self.finish_with_python(py, *batch, resolve.as_ref())? {
                        Some(projected) => total += projected,
                        // It used rows read ahead and failed: run it again, read afresh.
                        None => continue,
                    }
                    more
                }
            };
            batches += 1;
            if !more || max_batches.is_some_and(|m| batches >= m) {
                return Ok(outcome(total, more, false));
            }
            if let Some(budget) = &budget {
                if budget.bind(py).call_method0("over_budget")?.is_truthy()? {
                    return Ok(outcome(total, true, false));
                }
            }
        }
    }

    /// How reading ahead went since connecting.
    fn read_ahead_counts(&self) -> ReadAheadCounts {
        let (used, discarded, assigned) = self
            .engine
            .as_ref()
            .map_or((0, 0, 0), |(_, engine)| engine.read_ahead_counts());
        ReadAheadCounts {
            used,
            discarded,
            assigned,
        }
    }

    /// Close the connections (new ones are opened on the next run).
    fn close(&mut self) {
        self.engine = None;
    }
}

impl Projector {
    fn engine(&mut self, py: Python<'_>) -> PyResult<&mut Engine> {
        let pid = std::process::id();
        let stale = match &self.engine {
            Some((owner, engine)) => *owner != pid || engine.is_closed(),
            None => true,
        };
        if stale {
            if let Some((owner, engine)) = self.engine.take() {
                if owner == pid {
                    drop(engine);
                } else {
                    // The socket belongs to the parent process: never talk on it.
                    std::mem::forget(engine);
                }
            }
            let config = self.config.clone();
            let dsn = self.dsn.clone();
            let engine = block_on(py, async move { Engine::connect(config, &dsn).await })
                .map_err(PyErr::from)?;
            self.engine = Some((pid, engine));
        }
        match &mut self.engine {
            Some((_, engine)) => Ok(engine),
            None => Err(pyo3::exceptions::PyRuntimeError::new_err(
                "projector has no connection",
            )),
        }
    }

    fn open_engine(&mut self) -> PyResult<&mut Engine> {
        match &mut self.engine {
            Some((_, engine)) => Ok(engine),
            None => Err(pyo3::exceptions::PyRuntimeError::new_err(
                "the projector lost its connection in the middle of a batch",
            )),
        }
    }

    /// Turn a failed call into the Python error, discarding the connection when its
    /// state is unknown (interrupted midway) or it is gone.
    fn fail(&mut self, error: Interrupted) -> PyErr {
        let discard = match &error {
            Interrupted::Signal(_) => true,
            Interrupted::Failed(e) => e.is_connection_error(),
        };
        if discard || self.engine.as_ref().is_some_and(|(_, e)| e.is_closed()) {
            self.engine = None;
        }
        PyErr::from(error)
    }

    /// Assign the batch's rows through Python and write it. `None`: the batch used rows
    /// read ahead and failed on the database, and must be run again (read afresh).
    fn finish_with_python(
        &mut self,
        py: Python<'_>,
        batch: PendingBatch,
        resolve: Option<&Py<PyAny>>,
    ) -> PyResult<Option<usize>> {
        let builtin = self.config.partitioner;
        let assignments = match assign(py, &batch.rows, builtin, resolve, |id| {
            batch.preassigned(id)
        }) {
            Ok(a) => a,
            Err(e) => {
                let engine = self.open_engine()?;
                if let Err(Interrupted::Signal(_)) = block_on(py, async {
                    engine.abort().await;
                    Ok::<(), Error>(())
                }) {
                    self.engine = None;
                }
                return Err(e);
            }
        };
        // The batch's transaction lives on this connection, even if it has just died:
        // finishing on a new one would be wrong, failing on this one is right.
        let engine = self.open_engine()?;
        let read_ahead = batch.read_ahead();
        // The rows read ahead for the next batch are assigned as they arrive, while this
        // batch is written: the Python work overlaps the server's. A failure there only
        // leaves them to the next batch, except an interruption (Ctrl-C), raised below.
        let interrupted: Arc<Mutex<Option<PyErr>>> = Arc::default();
        let pre: Option<PreAssign<'_>> = resolve.map(|resolve| {
            let resolve = resolve.clone_ref(py);
            let interrupted = Arc::clone(&interrupted);
            Box::new(move |rows: &[OriginRow]| {
                Python::attach(
                    |py| match assign(py, rows, builtin, Some(&resolve), |_| None) {
                        Ok(assigned) => assigned.into_iter().map(Some).collect(),
                        Err(e) => {
                            if !e.is_instance_of::<PyException>(py) {
                                *lock(&interrupted) = Some(e);
                            }
                            Vec::new()
                        }
                    },
                )
            }) as PreAssign<'_>
        });
        let finished = block_on(py, engine.finish_batch_with(batch, &assignments, pre));
        if let Some(e) = lock(&interrupted).take() {
            return Err(e);
        }
        match finished {
            Ok(o) => Ok(Some(o.projected)),
            Err(Interrupted::Failed(e)) if read_ahead && !e.is_connection_error() => Ok(None),
            Err(e) => Err(self.fail(e)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Assign every row: `pre` where it has an assignment (made while the row was read
/// ahead), the built-in partitioner where there is one, Python for the rest.
fn assign(
    py: Python<'_>,
    rows: &[OriginRow],
    builtin: Option<BuiltinPartitioner>,
    resolve: Option<&Py<PyAny>>,
    pre: impl Fn(&uuid::Uuid) -> Option<Assignment>,
) -> PyResult<Vec<Assignment>> {
    let python_needed = |r: &OriginRow| {
        (builtin.is_none() || r.occurred_at.is_none()) && pre(&r.message_id).is_none()
    };
    let needs: Vec<&OriginRow> = rows.iter().filter(|r| python_needed(r)).collect();
    let mut resolved: Resolved = Vec::new();
    if !needs.is_empty() {
        let Some(resolve) = resolve else {
            return Err(PyValueError::new_err(
                "this projector needs a resolve callback (Python partitioner or messages \
                 without a recorded time)",
            ));
        };
        let rows = PyList::empty(py);
        for r in &needs {
            rows.append(ResolveRow { row: (*r).clone() })?;
        }
        resolved = resolve
            .bind(py)
            .call1((rows, builtin.is_none()))?
            .extract()?;
        if resolved.len() != needs.len() {
            return Err(PyValueError::new_err(format!(
                "resolve returned {} results for {} messages",
                resolved.len(),
                needs.len()
            )));
        }
    }
    let mut from_python = resolved.into_iter();
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(a) = pre(&row.message_id) {
            out.push(a);
            continue;
        }
        let python = if python_needed(row) {
            from_python.next()
        } else {
            None
        };
        let partition = match (builtin, python.and_then(|p| p.0)) {
            (Some(b), _) => b.partition(&row.stream),
            (None, Some(p)) => p,
            (None, None) => {
                return Err(PyValueError::new_err(format!(
                    "no partition for message {} of stream {:?}",
                    row.message_id, row.stream
                )))
            }
        };
        let Some(occurred_at) = row.occurred_at.or(python.and_then(|p| p.1)) else {
            return Err(PyValueError::new_err(format!(
                "no message time for message {} of stream {:?}",
                row.message_id, row.stream
            )));
        };
        out.push(Assignment {
            partition,
            occurred_at,
        });
    }
    Ok(out)
}
