//! `container prune`, `image prune [-a]` and `system prune [-a]`: Docker's clean-up verbs.
//!
//! - `container prune` deletes every container that is not running (created, exited, dead).
//! - `image prune` deletes dangling images: no name, and no container made from them; `-a`
//!   every image no container was made from, names and all.
//! - `system prune` does both, and `image prune` too, `-a` as for images.
//!
//! Each then deletes the layers no image uses any more and their blobs, as `rmi` does. That
//! includes layers an interrupted `pull` or `load` applied but never recorded an image for
//! (a `kill -9`, a power cut: a failing command takes back its own work, a killed one
//! cannot); until then they only serve as a cache for pulling the same layers again.
//!
//! The reclaimed space is measured, not estimated: the pool's used data (devicemapper) or
//! the blocks under the overlay directory, plus the blob store's blocks, before and after.
//!
//! Without `-f` each asks first, as Docker does, and does nothing unless the answer on
//! stdin is `y`. Docker's `--filter` is not offered.

use std::collections::HashSet;
use std::io::{self, BufRead, Write};
use std::process::ExitCode;

use anyhow::Context;

use super::format::human_size;
use super::pull::reconcile;
use super::rmi::collect_garbage;
use crate::cli::Global;
use crate::container;
use crate::image::Digest;
use crate::storage::{allocated_bytes, Storage};
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct ContainerArgs {
    /// Do not ask for confirmation
    #[arg(short, long)]
    pub force: bool,
}

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// Remove every image without a container, not just dangling ones
    #[arg(short, long)]
    pub all: bool,

    /// Do not ask for confirmation
    #[arg(short, long)]
    pub force: bool,
}

/// `image ...`: Docker's image management verbs (`ls` and `rm` are `images` and `rmi`).
#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// List images (as `images`)
    #[command(alias = "list")]
    Ls(super::images::Args),
    /// Remove images (as `rmi`)
    #[command(alias = "remove")]
    Rm(super::rmi::Args),
    /// Remove dangling images (-a: every image without a container) and unused layers
    #[command(after_help = "Example: thinbox image prune -af")]
    Prune(ImageArgs),
}

/// `container ...`: Docker's container management verbs (`ls` and `rm` are `ps` and `rm`).
#[derive(Debug, clap::Subcommand)]
pub enum ContainerCommand {
    /// List containers (as `ps`)
    #[command(alias = "list")]
    Ls(super::ps::Args),
    /// Remove containers (as `rm`)
    #[command(alias = "remove")]
    Rm(super::rm::Args),
    /// Remove all stopped containers
    #[command(after_help = "Example: thinbox container prune -f")]
    Prune(ContainerArgs),
}

pub fn image_command(command: ImageCommand, global: &Global) -> anyhow::Result<ExitCode> {
    match command {
        ImageCommand::Ls(args) => super::images::run(args, global),
        ImageCommand::Rm(args) => super::rmi::run(args, global),
        ImageCommand::Prune(args) => images(args, global),
    }
}

pub fn container_command(command: ContainerCommand, global: &Global) -> anyhow::Result<ExitCode> {
    match command {
        ContainerCommand::Ls(args) => super::ps::run(args, global),
        ContainerCommand::Rm(args) => super::rm::run(args, global),
        ContainerCommand::Prune(args) => containers(args, global),
    }
}

/// What one prune removes.
#[derive(Clone, Copy)]
struct Scope {
    containers: bool,
    /// `None`: no images; `Some(false)`: dangling ones; `Some(true)`: all without a container.
    images: Option<bool>,
}

impl Scope {
    fn warning(self) -> String {
        let images = match self.images {
            Some(true) => "all images without at least one container associated to them",
            _ => "all dangling images",
        };
        match (self.containers, self.images) {
            (true, Some(_)) => format!(
                "WARNING! This will remove:\n  - all stopped containers\n  - {images}\n  \
                 - all layers no image uses\n"
            ),
            (true, None) => "WARNING! This will remove all stopped containers.\n".to_string(),
            (false, _) => format!("WARNING! This will remove {images}.\n"),
        }
    }
}

pub fn containers(args: ContainerArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let scope = Scope {
        containers: true,
        images: None,
    };
    prune(scope, args.force, global)
}

pub fn images(args: ImageArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let scope = Scope {
        containers: false,
        images: Some(args.all),
    };
    prune(scope, args.force, global)
}

pub fn system(args: ImageArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let scope = Scope {
        containers: true,
        images: Some(args.all),
    };
    prune(scope, args.force, global)
}

/// Asks on stdout, reads the answer from stdin: `y` or `yes` goes on.
fn confirmed(warning: &str) -> anyhow::Result<bool> {
    let mut out = io::stdout().lock();
    write!(out, "{warning}Are you sure you want to continue? [y/N] ")?;
    out.flush()?;
    let mut answer = String::new();
    io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// Empties `ROOT/tmp`, where `load` extracts archives. Only `load` writes there, holding
/// the store's lock as the caller does now, so whatever is there a killed `load` left (it
/// may be a whole archive's worth).
fn remove_scratch(global: &Global) -> anyhow::Result<()> {
    let dir = global.root.join("tmp");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry?.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.with_context(|| format!("failed to remove {}", path.display()))?;
    }
    Ok(())
}

/// Bytes the storage, the blob store and the scratch directory take on the host.
fn bytes_in_use(storage: Option<&Storage>, global: &Global) -> anyhow::Result<u64> {
    let pool = match storage {
        Some(storage) => storage.bytes_in_use()?,
        None => 0,
    };
    Ok(pool
        + allocated_bytes(&global.root.join("blobs"))?
        + allocated_bytes(&global.root.join("tmp"))?)
}

fn prune(scope: Scope, force: bool, global: &Global) -> anyhow::Result<ExitCode> {
    if !force && !confirmed(&scope.warning())? {
        return Ok(ExitCode::SUCCESS);
    }
    // The lock keeps `create` and `run` from taking an image this is about to delete.
    let mut store = Store::lock(&global.root)?;
    let storage = Storage::open_existing(global)?;
    let before = bytes_in_use(storage.as_ref(), global)?;
    if scope.images.is_some() {
        // What an interrupted command was in the middle of goes first: a layer half
        // applied (as the verbs that add layers do), and a killed load's scratch.
        if let Some(storage) = &storage {
            reconcile(&mut store, storage)?;
        }
        remove_scratch(global)?;
    }
    let mut failed = false;

    if scope.containers {
        let mut header = false;
        for c in container::list(&global.root)? {
            if c.is_running() {
                continue;
            }
            match container::supervise::remove(global, &c) {
                Ok(()) => {
                    if !std::mem::replace(&mut header, true) {
                        println!("Deleted Containers:");
                    }
                    println!("{}", c.id);
                }
                // A `--rm` supervisor finished it meanwhile.
                Err(_) if !c.dir(&global.root).exists() => {}
                Err(e) => {
                    eprintln!("Error response from daemon: {e:#}");
                    failed = true;
                }
            }
        }
        if header {
            println!();
        }
    }

    if let Some(all) = scope.images {
        let used: HashSet<Digest> = container::list(&global.root)?
            .into_iter()
            .map(|c| c.image_id)
            .collect();
        let doomed: Vec<Digest> = store
            .images
            .keys()
            .filter(|id| !used.contains(*id))
            .filter(|id| all || store.repositories.of(id).is_empty())
            .cloned()
            .collect();
        let mut lines = Vec::new();
        for id in doomed {
            for name in store.repositories.of(&id) {
                store.repositories.remove(&name);
                lines.push(format!("untagged: {name}"));
            }
            store.images.remove(&id);
            lines.push(format!("deleted: {id}"));
        }
        store.save_images()?;
        // Layers print as they go, so that a failure part way shows what did happen.
        let mut header = !lines.is_empty();
        if header {
            println!("Deleted Images:");
            for line in &lines {
                println!("{line}");
            }
        }
        let collected = collect_garbage(&mut store, global, |layer| {
            if !std::mem::replace(&mut header, true) {
                println!("Deleted Images:");
            }
            println!("deleted: {layer}");
        });
        if let Err(e) = collected {
            eprintln!("Error response from daemon: {e:#}");
            failed = true;
        }
        if header {
            println!();
        }
    }

    let after = bytes_in_use(storage.as_ref(), global)?;
    println!(
        "Total reclaimed space: {}",
        human_size(before.saturating_sub(after))
    );
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
