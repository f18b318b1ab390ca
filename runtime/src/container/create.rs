//! `create`: a record and a writable thin snapshot of the image's top layer.

use std::fs;

use anyhow::{bail, Context};

use super::spec::{container_config, ImageProcess, ProcessSpec, RunOptions};
use super::{check_name, generate_name, list, new_id, now_rfc3339, Container, State, Status};
use crate::cli::Global;
use crate::storage::Storage;
use crate::store::Store;

/// What a new container is made from.
#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    pub image: String,
    pub name: Option<String>,
    /// `--hostname`: empty means the id's first 12 digits.
    pub run: RunOptions,
    pub open_stdin: bool,
    pub auto_remove: bool,
    pub runtime: Option<String>,
}

/// The external runtimes `--runtime` takes.
pub const RUNTIMES: [&str; 2] = ["runc", "crun"];

/// Creates a container. The record is written `Creating` before the thin is made and
/// `Created` after, so an interruption leaves a record `rm` can clean up.
pub fn create(global: &Global, opts: CreateOptions) -> anyhow::Result<Container> {
    if let Some(r) = &opts.runtime {
        if !RUNTIMES.contains(&r.as_str()) {
            bail!("unknown runtime {r:?} (runc or crun; the built-in runner without --runtime)");
        }
    }
    let root = &global.root;
    // The lock keeps names unique and the image in place while the snapshot is taken.
    let store = Store::lock(root)?;
    let image = store
        .find_image(&opts.image)
        .with_context(|| format!("No such image: {}", opts.image))?
        .clone();
    let config_bytes = store.read_blob(&image.id)?;
    let image_config = ImageProcess::from_config(&config_bytes)?;
    let layers = store.image_layers(&image.id)?;

    let existing = list(root)?;
    let id = new_id()?;
    let taken: Vec<String> = existing.iter().map(|c| c.name.clone()).collect();
    let name = match opts.name {
        Some(name) => {
            let name = name.strip_prefix('/').unwrap_or(&name).to_string();
            check_name(&name)?;
            if let Some(other) = existing.iter().find(|c| c.name == name) {
                bail!(
                    "Conflict. The container name \"/{name}\" is already in use by container \
                     \"{}\". You have to remove (or rename) that container to be able to reuse \
                     that name.",
                    other.id
                );
            }
            name
        }
        None => generate_name(&id, &taken),
    };
    let mut run = opts.run;
    if run.hostname.is_empty() {
        run.hostname = id[..12].to_string();
    }
    let process = ProcessSpec::resolve(&image_config, &run)?;
    let config = container_config(&config_bytes, &run)?;

    let storage = Storage::open(global)?;
    let mut c = Container {
        device_name: format!("thinbox-{id}"),
        id,
        name,
        image: opts.image,
        image_id: image.id.clone(),
        created: now_rfc3339(),
        process,
        hostname: run.hostname,
        tty: run.tty,
        open_stdin: opts.open_stdin,
        auto_remove: opts.auto_remove,
        runtime: opts.runtime,
        thin_id: 0,
        origin_thin_id: 0,
        config: Some(config),
        state: State {
            status: Some(Status::Creating),
            ..State::default()
        },
    };
    c.save(root)?;
    match storage.new_container(&layers, &c.device_name) {
        Ok((thin, origin)) => {
            c.thin_id = thin;
            c.origin_thin_id = origin;
            c.state.status = Some(Status::Created);
            c.save(root)?;
            tracing::info!(container = %c.id, thin_id = thin, origin, driver = storage.kind().name(), "created");
            Ok(c)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(c.dir(root));
            Err(e.context("failed to create the container's device"))
        }
    }
}
