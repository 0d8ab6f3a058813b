//! depeche-rs: the Python bindings (`depeche_rs._native`) of the engine crate
//! `depeche-rs-core` (`rust/core`, no pyo3). `py` holds the classes and the error mapping.

pub mod py;

use pyo3::prelude::*;

/// The native module behind `depeche_rs`; users import `depeche_rs`, never this.
#[pymodule]
mod _native {
    /// The package version: Cargo.toml is its one source (pyproject declares it dynamic).
    #[allow(non_upper_case_globals)]
    #[pymodule_export]
    const __version__: &str = env!("CARGO_PKG_VERSION");
    #[pymodule_export]
    use crate::py::partition::hash_mod_partition;
    #[pymodule_export]
    use crate::py::partition::stream_name_partition;
    #[pymodule_export]
    use crate::py::projector::{Projector, ReadAheadCounts, ResolveRow, RunOutcome};
    #[pymodule_export]
    use crate::py::subscription::{
        PyBatchRow, PyClaimedBatch, PyPartitionState, PyStoredRow, PySubscriptionSession,
    };
}
