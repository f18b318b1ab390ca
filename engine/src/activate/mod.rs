//! Activation: how a thin becomes something the kernel or a VM can use.
//!
//! Three backends share the pool-message vocabulary (`create_thin`, `create_snap`, `delete`,
//! `set_transaction_id`, `reserve_metadata_snap`, `release_metadata_snap`):
//! - [`fuse`] + [`loopdev`]: the userspace path. The pool daemon ([`daemon`]) serves each
//!   active thin as a file in a FUSE mount of its own and attaches a loop device on top, so the
//!   kernel sees a real block device (`/dev/loopN`) on a machine without device-mapper;
//! - [`dm`] + [`kernel`]: the kernel's device-mapper, driven by DM ioctls where
//!   `/dev/mapper/control` works; the kernel then owns the pool, and [`kernel_control`]
//!   drives it through the same [`PoolControl`] as the other owners;
//! - [`nbd`]: NBD exports for qemu and other NBD clients, served by `dmtool serve` or by
//!   the pool daemon.
//!
//! This layer sits above [`crate::thin`] and [`crate::store`] and below the binaries.

pub mod control;
pub mod daemon;
pub mod dm;
pub mod fuse;
pub mod kernel;
pub mod kernel_control;
pub mod loopdev;
pub mod nbd;

pub use control::{Activation, ControlStatus, Local, PoolControl, ThinInfo};

/// Whether the process at the other end of a unix socket may use the pool: root, or this
/// process's own user. A socket's mode is checked by the kernel only at connect time, so
/// this also closes the moment between `bind` and `chmod`.
pub fn peer_is_trusted(stream: &impl std::os::fd::AsFd) -> bool {
    match nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials) {
        Ok(cred) => cred.uid() == 0 || cred.uid() == nix::unistd::geteuid().as_raw(),
        Err(e) => {
            tracing::warn!("cannot tell who connected: {e}");
            false
        }
    }
}
