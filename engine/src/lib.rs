//! thinbox's engine: a userspace thin pool whose metadata is byte-compatible with the Linux
//! kernel's dm-thin-pool format.
//!
//! Layers, bottom up (each uses only the ones below it):
//! - [`io`]: block devices (files, loop and raw devices, memory);
//! - [`block`]: checksummed 4 KiB metadata blocks;
//! - [`tm`]: the transaction manager (shadowing, commit order);
//! - [`pdata`]: b-trees and space maps;
//! - [`thin`]: superblock, details and mapping trees, the pool and thin device IO;
//! - [`tools`]: check and dump, which read metadata without trusting it;
//! - [`image`]: raw and sparse image files copied into and out of thins, holes kept;
//! - [`journal`]: a cleanly unmounted ext4 journal's log given back to the pool;
//! - [`store`]: the volume store beside a pool (sizes and names dm-thin does not keep);
//! - [`activate`]: thins as block devices (FUSE + loop under the pool daemon, the kernel's
//!   device-mapper) and NBD exports, behind one [`activate::PoolControl`] interface.
//!
//! The public entry points are [`Pool`] and [`Thin`].

#![deny(unsafe_code)]

pub mod activate;
pub mod block;
pub mod error;
pub mod image;
pub mod io;
pub mod journal;
pub mod pdata;
pub mod store;
pub mod thin;
pub mod tm;
pub mod tools;
pub mod units;

pub use error::{Damage, DeviceRole, Error, Result};
pub use store::{Volume, VolumeStore, Volumes};
pub use thin::device::Thin;
pub use thin::files::{Layout, NewPool, PoolPaths, SplitLayout};
pub use thin::metadata::{BlockTime, DeviceDetails, Superblock};
pub use thin::pool::{NoSpacePolicy, Pool, PoolEvent, PoolMode, PoolOptions, PoolStatus};
pub use units::{DataBlockSize, ThinId};
