//! One tokio runtime per process, and the one helper every blocking call goes through.

use std::future::Future;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use tokio::runtime::Runtime;

use crate::core::Error;

static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);

/// The process's runtime, rebuilt after a fork: the parent's worker threads do not exist
/// in the child, so its runtime is leaked rather than shut down.
pub fn runtime() -> PyResult<Arc<Runtime>> {
    let pid = std::process::id();
    let mut slot = RUNTIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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
            pyo3::exceptions::PyRuntimeError::new_err(format!("cannot start the tokio runtime: {e}"))
        })?;
    let rt = Arc::new(rt);
    *slot = Some((pid, Arc::clone(&rt)));
    Ok(rt)
}

/// Run `future` to completion with the GIL released, then check for Ctrl-C.
///
/// The future's error becomes the matching Python exception; a pending signal
/// (KeyboardInterrupt) wins over the result, after the future has completed, so a batch
/// is never left half done.
pub fn block_on<F, T>(py: Python<'_>, future: F) -> PyResult<T>
where
    F: Future<Output = Result<T, Error>> + Send,
    T: Send,
{
    let rt = runtime()?;
    let result = py.detach(|| rt.block_on(future));
    py.check_signals()?;
    result.map_err(PyErr::from)
}
