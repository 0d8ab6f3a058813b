//! The pure-Rust engine: configuration, SQL, partitioners, the projector loop and the
//! subscription read path.

pub mod config;
pub mod connect;
pub mod cursor;
pub mod error;
pub mod partitioner;
pub mod projector;
pub mod sql;
pub mod subscription;
pub mod subscription_sql;

pub use config::{ProjectorConfig, TableNames};
pub use error::{Error, Result};
pub use partitioner::BuiltinPartitioner;
pub use projector::{
    Assignment, BatchOutcome, BuiltinStep, OriginRow, PendingBatch, PreAssign, Projector,
};
