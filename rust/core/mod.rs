//! The pure-Rust engine: configuration, SQL, partitioners and the projector loop.

pub mod config;
pub mod connect;
pub mod cursor;
pub mod error;
pub mod partitioner;
pub mod projector;
pub mod sql;

pub use config::{ProjectorConfig, TableNames};
pub use error::{Error, Result};
pub use partitioner::BuiltinPartitioner;
pub use projector::{Assignment, BatchOutcome, BuiltinStep, OriginRow, PendingBatch, Projector};
