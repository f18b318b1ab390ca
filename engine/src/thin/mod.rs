//! The dm-thin vocabulary: metadata, the pool, thin device IO.

mod cache;
pub mod device;
pub mod files;
pub mod metadata;
pub mod pool;
