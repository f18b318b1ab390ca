//! One module per subcommand, plus what they share: opening a pool with its volume store.

pub mod activate;
pub mod check;
pub mod daemon;
pub mod dump;
pub mod pool;
pub mod repair;
pub mod restore;
pub mod serve;
pub mod thin;
pub mod thin_io;
pub mod trim;
pub mod trim_journal;

pub mod delta;
pub mod links;
pub mod ls;
pub mod metadata_size;
pub mod rmap;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use engine::activate::daemon::RunDir;
use engine::activate::kernel_control::{self, KernelControl};
use engine::activate::{Local, PoolControl};
use engine::store::{ReconcileReport, Volumes};
use engine::{Error, PoolOptions};

use crate::cli::{Command, PoolCommand, PoolLocation, ThinCommand};

/// `verbose` is the global -v count (delta reads it as thin_delta's --verbose).
pub fn run(command: Command, verbose: u8) -> anyhow::Result<ExitCode> {
    match command {
        Command::Pool(PoolCommand::Create(args)) => pool::create(args),
        Command::Pool(PoolCommand::Status(args)) => pool::status(args),
        Command::Pool(PoolCommand::Resize(args)) => pool::resize(args),
        Command::Pool(PoolCommand::Set(args)) => pool::set(args),
        Command::Pool(PoolCommand::Start(args)) => daemon::start(args),
        Command::Pool(PoolCommand::Stop(args)) => daemon::stop(args),
        Command::Thin(ThinCommand::Activate(args)) => activate::activate(args),
        Command::Thin(ThinCommand::Deactivate(args)) => activate::deactivate(args),
        Command::Thin(ThinCommand::Create(args)) => thin::create(args),
        Command::Thin(ThinCommand::Snap(args)) => thin::snap(args),
        Command::Thin(ThinCommand::Delete(args)) => thin::delete(args),
        Command::Thin(ThinCommand::Rename(args)) => thin::rename(args),
        Command::Thin(ThinCommand::Ls(args)) => thin::ls(args),
        Command::Thin(ThinCommand::Write(args)) => thin_io::write(args),
        Command::Thin(ThinCommand::Read(args)) => thin_io::read(args),
        Command::Thin(ThinCommand::Import(args)) => thin_io::import(args),
        Command::Thin(ThinCommand::Export(args)) => thin_io::export(args),
        Command::Thin(ThinCommand::TrimJournal(args)) => trim_journal::run(args),
        Command::Check(args) => check::run(args),
        Command::Dump(args) => dump::run(args),
        Command::Restore(args) => restore::run(args),
        Command::Repair(args) => repair::run(args),
        Command::Trim(args) => trim::run(args),
        Command::Serve(args) => serve::run(args),

        Command::Ls(args) => ls::run(args),
        Command::Delta(args) => delta::run(args, verbose > 0),
        Command::Rmap(args) => rmap::run(args),
        Command::MetadataSize(args) => metadata_size::run(args, &links::program_name()),
        Command::Links(args) => links::run(args),
    }
}

/// What a command means to do with the pool.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Change it: fails if the metadata needs checking.
    Change,
    /// Only look: a pool whose metadata needs checking is opened read-only instead.
    Look,
}

/// The pool at `loc` through whoever owns it, in this order: its userspace daemon when one
/// answers on its socket, the kernel when it has the pool, otherwise opened here as its one
/// owner (see [`open_volumes`]).
pub fn control(loc: &PoolLocation, access: Access) -> anyhow::Result<Box<dyn PoolControl>> {
    let run = RunDir::for_pool(&loc.paths());
    if let Some(client) = run
        .connect()
        .with_context(|| format!("failed to reach the daemon of pool {}", loc.name()))?
    {
        tracing::debug!(socket = %run.socket().display(), "going through the pool daemon");
        return Ok(Box::new(client));
    }
    if let Some(kernel) = kernel(loc)? {
        tracing::debug!(pool = %kernel.pool().node().display(), "going through the kernel");
        return Ok(Box::new(kernel));
    }
    Ok(Box::new(Local::new(open_volumes(loc, access)?)))
}

/// The pool at `loc` as the kernel owns it, with its volume store reconciled; `None` when
/// the kernel does not have it (or this machine has no device-mapper).
pub fn kernel(loc: &PoolLocation) -> anyhow::Result<Option<KernelControl>> {
    let found = kernel_control::find(&loc.paths())
        .with_context(|| format!("failed to look for pool {} in the kernel", loc.name()))?;
    let Some((pool, devices)) = found else {
        return Ok(None);
    };
    let control = KernelControl::open(pool, devices, &loc.store_path())
        .with_context(|| format!("failed to open pool {} in the kernel", loc.name()))?;
    note_reconcile(control.reconcile_report());
    Ok(Some(control))
}

/// Fails, naming the owner, when the kernel has the pool whose metadata is `metadata`: the
/// offline tools and opening the pool here must not touch it then.
pub fn refuse_if_kernel_owns(metadata: &std::path::Path) -> anyhow::Result<()> {
    let owner = kernel_control::owner_of_metadata(metadata)
        .with_context(|| format!("failed to look for {} in the kernel", metadata.display()))?;
    match owner {
        Some(node) => anyhow::bail!(
            "pool metadata {} is active in the kernel as {}; stop it first (dmtool pool stop)",
            metadata.display(),
            node.display()
        ),
        None => Ok(()),
    }
}

/// Opens the pool at `loc` as its one owner, with its volume store reconciled, and says on
/// stderr what reconciling found.
pub fn open_volumes(loc: &PoolLocation, access: Access) -> anyhow::Result<Volumes> {
    let paths = loc.paths();
    refuse_if_kernel_owns(&paths.metadata)?;
    let store = loc.store_path();
    let opened = match Volumes::open(&paths, &store, PoolOptions::default()) {
        Err(Error::NeedsCheck) if access == Access::Look => {
            tracing::warn!("pool metadata needs checking (run dmtool check); opened read-only");
            let options = PoolOptions {
                read_only: true,
                ..PoolOptions::default()
            };
            Volumes::open(&paths, &store, options)
        }
        other => other,
    };
    let volumes = opened.with_context(|| format!("failed to open pool {}", loc.name()))?;
    note_reconcile(volumes.reconcile_report());
    Ok(volumes)
}

/// Commits what a command did (the kernel commits after every pool message; so do we).
pub fn commit(volumes: &Volumes, loc: &PoolLocation) -> anyhow::Result<()> {
    volumes
        .pool()
        .commit()
        .with_context(|| format!("failed to commit pool {}", loc.name()))
}

fn note_reconcile(report: &ReconcileReport) {
    if let Some(p) = &report.pending {
        let fate = if p.applied {
            "completed"
        } else {
            "rolled back"
        };
        eprintln!(
            "dmtool: warning: found an unfinished change ({}): {fate}, since {}",
            p.intent, p.reason
        );
    }
    if let Some((store, pool)) = report.transaction_id_moved {
        eprintln!(
            "dmtool: warning: the pool's transaction id moved from {store} to {pool} outside \
             dmtool"
        );
    }
    for v in &report.dropped {
        let name = v
            .name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        eprintln!(
            "dmtool: warning: thin {}{name} is no longer in the pool; its record was dropped",
            v.id
        );
    }
    // Orphans persist until deleted, so they are not repeated on every command; `thin ls`
    // lists them.
    for id in &report.orphans {
        tracing::info!(thin_id = %id, "thin has no size record (orphan)");
    }
}

/// Opens metadata for the offline tools, read-only. A directory means `DIR/metadata`. With
/// `exclusive`, the pool's ownership lock is taken (and returned, to hold) so that a pool
/// some owner is changing is refused rather than misread.
///
/// Only the blocks the metadata space map covers are given to the tools
/// ([`engine::thin::files::metadata_extent`]): on a device split into metadata and data,
/// the data region is never read as metadata.
pub fn open_metadata(
    path: &std::path::Path,
    exclusive: bool,
) -> anyhow::Result<(Arc<dyn engine::io::BlockDevice>, Option<std::fs::File>)> {
    use engine::io::lock::{lock_exclusive, LockError};
    use engine::io::{FileDevice, OpenMode};

    let path = if path.is_dir() {
        path.join("metadata")
    } else {
        path.to_path_buf()
    };
    refuse_if_kernel_owns(&path)?;
    let dev = FileDevice::open(&path, OpenMode::ReadOnly)
        .with_context(|| format!("failed to open metadata {}", path.display()))?;
    // Only the blocks the metadata space map covers go to the tools.
    let extent = |dev: FileDevice| engine::thin::files::metadata_extent(Arc::new(dev)).0;
    if !exclusive {
        return Ok((extent(dev), None));
    }
    let lock = dev
        .file()
        .try_clone()
        .with_context(|| format!("failed to open metadata {}", path.display()))?;
    // A duplicated descriptor shares the open file description, and with it the flock.
    match lock_exclusive(&lock) {
        Ok(()) => Ok((extent(dev), Some(lock))),
        Err(LockError::Held(holder)) => anyhow::bail!(
            "metadata {} is in use by its pool's owner ({holder}); stop the owner first, or \
             use --metadata-snap",
            path.display()
        ),
        Err(LockError::Io(e)) => {
            Err(anyhow::Error::new(e)
                .context(format!("failed to lock metadata {}", path.display())))
        }
    }
}

/// Takes the pool ownership lock of the metadata `dev` at `path` (held while the returned
/// file is open), naming the holder when someone else has it.
pub fn lock_metadata(
    dev: &engine::io::FileDevice,
    path: &std::path::Path,
) -> anyhow::Result<std::fs::File> {
    use engine::io::lock::{lock_exclusive, LockError};
    let lock = dev
        .file()
        .try_clone()
        .with_context(|| format!("failed to open metadata {}", path.display()))?;
    match lock_exclusive(&lock) {
        Ok(()) => Ok(lock),
        Err(LockError::Held(holder)) => anyhow::bail!(
            "metadata {} is in use by its pool's owner ({holder}); stop the owner first",
            path.display()
        ),
        Err(LockError::Io(e)) => {
            Err(anyhow::Error::new(e)
                .context(format!("failed to lock metadata {}", path.display())))
        }
    }
}
