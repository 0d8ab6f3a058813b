//! PyO3 bindings: the runtime helper, error mapping and the classes of `depeche_rs._native`.

pub mod errors;
pub mod partition;
pub mod projector;
pub mod runtime;
pub mod subscription;
pub mod values;
