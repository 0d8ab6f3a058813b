//! One tokio runtime per process, and the one helper every blocking call goes through.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use tokio::runtime::Runtime;

use crate::py::errors::py_err;
use depeche_rs_core::Error;

static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);

/// The process's runtime, rebuilt after a fork: the parent's worker threads do not exist
/// in the child, so its runtime is leaked rather than shut down.
pub fn runtime() -> PyResult<Arc<Runtime>> {
    let pid = std::process::id();
    let mut slot = RUNTIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((owner, rt)) = slot.as_ref() {
        if *owner == pid {
            return Ok(Arc::clone(rt));
        }
    }
    if let Some((_, stale)) = slot.take() {
        std::mem::forget(stale);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("depeche-rs")
        .enable_all()
        .build()
        .map_err(|e| {
            pyo3::exceptions::PyRuntimeError::new_err(format!(
                "cannot start the tokio runtime: {e}"
            ))
        })?;
    let rt = Arc::new(rt);
    *slot = Some((pid, Arc::clone(&rt)));
    Ok(rt)
}

/// How often a blocked call comes back to Python to look for Ctrl-C.
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Why [`block_on`] did not return the future's value.
pub enum Interrupted {
    /// The future failed.
    Failed(Error),
    /// A signal handler raised (e.g. KeyboardInterrupt); the future was dropped midway,
    /// so the connection it used is in an unknown state and must be discarded.
    Signal(PyErr),
}

impl From<Interrupted> for PyErr {
    fn from(value: Interrupted) -> PyErr {
        match value {
            Interrupted::Failed(e) => py_err(e),
            Interrupted::Signal(e) => e,
        }
    }
}

/// Run `future` to completion with the GIL released, coming back every
/// [`SIGNAL_CHECK_INTERVAL`] to run Python's signal handlers, so Ctrl-C interrupts
/// even a call blocked on a lock or a slow query.
pub fn block_on<F, T>(py: Python<'_>, future: F) -> Result<T, Interrupted>
where
    F: Future<Output = Result<T, Error>> + Send,
    T: Send,
{
    let rt = runtime().map_err(Interrupted::Signal)?;
    let mut future = Box::pin(future);
    loop {
        let slice = py.detach(|| {
            rt.block_on(async { tokio::time::timeout(SIGNAL_CHECK_INTERVAL, &mut future).await })
        });
        match slice {
            Ok(result) => {
                // A signal that arrived during the last slice still wins, after the work
                // completed, so nothing is left half done.
                py.check_signals().map_err(Interrupted::Signal)?;
                return result.map_err(Interrupted::Failed);
            }
            Err(_elapsed) => py.check_signals().map_err(Interrupted::Signal)?,
        }
    }
}
