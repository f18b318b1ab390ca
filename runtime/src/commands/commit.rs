//! `commit [-a AUTHOR] [-c CHANGE] [-m MESSAGE] [-p=true|false] CONTAINER [REPO[:TAG]]`: a
//! new image from a container.
//!
//! With devicemapper, the new top layer is a thin snapshot of the container's own thin
//! (constant time, whatever the container wrote), taken while its processes are paused
//! (unless `-p=false`) and its filesystem frozen (`FIFREEZE`, as `fsfreeze` does: dirty
//! data written, the journal clean, so the snapshot mounts like a cleanly unmounted
//! filesystem). The layer's blob, which push and save need, is the tar of the snapshot's
//! differences from the image's top layer (the parent mounted read-only under ROOT/mnt),
//! with OCI whiteouts for what was deleted. With overlay, the blob is packed from the
//! container's merged view (paused, not frozen: overlayfs cannot be) and applied to a new
//! layer directory.
//!
//! The new image's config is the container's (Docker's rule: a committed image runs what
//! its container ran), with the `-c` instructions applied, a history entry, and the layer's
//! diff id appended.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::ArgAction;
use engine::activate::daemon::Client;
use engine::ThinId;
use serde_json::{json, Map, Value};

use crate::cli::Global;
use crate::commands::pull::{reconcile, unpack_blob, write_blob};
use crate::container::diff::{changes, INIT_PATHS};
use crate::container::{self, find, now_rfc3339, pause, rootfs, sys, Container};
use crate::image::{change, Digest, HashingWriter, Reference};
use crate::storage::pack::write_layer;
use crate::storage::unpack::Limits;
use crate::storage::{DeviceMapper, Storage};
use crate::store::{BlobRef, ImageRecord, LayerRecord, LayerState, Store};

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Author (e.g. "Jane Doe <jane@example.com>")
    #[arg(short, long)]
    pub author: Option<String>,

    /// Apply a Dockerfile instruction to the image's config: CMD, ENTRYPOINT, ENV, EXPOSE,
    /// LABEL, STOPSIGNAL, USER, VOLUME, WORKDIR (repeatable)
    #[arg(short, long = "change", value_name = "INSTRUCTION")]
    pub changes: Vec<String>,

    /// Commit message
    #[arg(short, long)]
    pub message: Option<String>,

    /// Pause the container during the commit (-p=false to leave it running)
    #[arg(
        short,
        long,
        value_name = "BOOL",
        action = ArgAction::Set,
        num_args = 0..=1,
        require_equals = true,
        default_value_t = true,
        default_missing_value = "true"
    )]
    pub pause: bool,

    /// The container (name, id or id prefix)
    pub container: String,

    /// A name for the new image: [REGISTRY[:PORT]/]NAME[:TAG]
    pub repository: Option<String>,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let root = &global.root;
    let target = args
        .repository
        .as_deref()
        .map(Reference::parse_tag)
        .transpose()?;
    let mut store = Store::lock(root)?;
    let c = find(root, &args.container)?;
    let image = store
        .images
        .get(&c.image_id)
        .cloned()
        .with_context(|| format!("the image of container {} is gone", c.short_id()))?;
    let image_config: Value = serde_json::from_slice(&store.read_blob(&image.id)?)
        .with_context(|| format!("the config of image {} is malformed", image.id))?;
    // The changes are checked before any work is done.
    let mut config = match (&c.config, image_config.get("config")) {
        (Some(Value::Object(own)), _) => own.clone(),
        (_, Some(Value::Object(from_image))) => from_image.clone(),
        _ => Map::new(),
    };
    change::apply_all(&mut config, &args.changes)?;
    // A container's host name is not the image's business (Docker keeps it; we do not).
    config.remove("Hostname");

    let storage = Storage::open(global)?;
    reconcile(&mut store, &storage)?;

    let layer = make_layer(&storage, &mut store, root, &c, args.pause)?;
    let config_bytes = new_config(&image_config, config, &c, &args, &layer)?;
    let id = Digest::of(&config_bytes);
    write_blob(&store, &id, &config_bytes)?;
    let mut layers = image.layers.clone();
    layers.push(layer.chain_id.clone());
    let created = serde_json::from_slice::<Value>(&config_bytes)?["created"]
        .as_str()
        .map(str::to_string);
    store.images.insert(
        id.clone(),
        ImageRecord {
            id: id.clone(),
            manifest_digest: None,
            layers,
            created,
        },
    );
    if let Some(target) = &target {
        store
            .repositories
            .set(&target.repository(), target.to_string(), &id);
    }
    store.save_images()?;
    tracing::info!(container = %c.id, image = %id, layer_thin = layer.thin_id, "committed");
    println!("{id}");
    Ok(ExitCode::SUCCESS)
}

/// The image config: the parent image's, with `config` replaced, the layer's diff id and a
/// history entry appended.
fn new_config(
    parent: &Value,
    config: Map<String, Value>,
    c: &Container,
    args: &Args,
    layer: &LayerRecord,
) -> anyhow::Result<Vec<u8>> {
    let mut out = match parent {
        Value::Object(o) => o.clone(),
        _ => bail!("the image config is not an object"),
    };
    let now = now_rfc3339();
    let diff_ids = out
        .get("rootfs")
        .and_then(|r| r.get("diff_ids"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut history = out
        .get("history")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_else(|| {
            // The image spec pairs each non-empty history entry with a layer.
            vec![
                json!({ "created": parent.get("created").cloned().unwrap_or(Value::Null) });
                diff_ids.len()
            ]
        });
    let mut entry = Map::new();
    entry.insert("created".into(), json!(now));
    entry.insert("created_by".into(), json!(c.command_line()));
    if let Some(author) = &args.author {
        entry.insert("author".into(), json!(author));
    }
    if let Some(message) = &args.message {
        entry.insert("comment".into(), json!(message));
    }
    history.push(Value::Object(entry));
    let mut diff_ids = diff_ids;
    diff_ids.push(json!(layer.diff_id));

    out.insert("created".into(), json!(now));
    out.insert("config".into(), Value::Object(config));
    out.insert("container".into(), json!(c.id));
    out.insert(
        "rootfs".into(),
        json!({ "type": "layers", "diff_ids": diff_ids }),
    );
    out.insert("history".into(), Value::Array(history));
    match &args.author {
        Some(author) => out.insert("author".into(), json!(author)),
        None => out.remove("author"),
    };
    match &args.message {
        Some(message) => out.insert("comment".into(), json!(message)),
        None => out.remove("comment"),
    };
    Ok(serde_json::to_vec(&Value::Object(out))?)
}

/// The new layer. With devicemapper: the container's thin snapshotted (paused and frozen if
/// it runs), its blob written from the snapshot's differences to the image's top layer.
/// With overlay: the blob written from the container's differences (paused if it runs),
/// then applied to a new layer directory. The record is `Preparing` (under a provisional
/// key) from before the filesystem exists until the layer is complete; on failure the
/// filesystem, the record and the partial blob go.
fn make_layer(
    storage: &Storage,
    store: &mut Store,
    root: &Path,
    c: &Container,
    pause_first: bool,
) -> anyhow::Result<LayerRecord> {
    let layers = store.image_layers(&c.image_id)?;
    let name = format!("thinbox-commit-{}", &container::new_id()?[..24]);
    let provisional = Digest::of(name.as_bytes());
    let mut record = LayerRecord {
        chain_id: provisional.clone(),
        diff_id: provisional.clone(),
        parent: layers.last().map(|l| l.chain_id.clone()),
        thin_id: 0,
        device_name: name.clone(),
        size: 0,
        blob: None,
        state: LayerState::Preparing,
    };
    store.layers.insert(provisional.clone(), record.clone());
    store.save_layers()?;
    let partial = root
        .join("blobs")
        .join("sha256")
        .join(format!(".{name}.partial"));
    let lower_mnt = root.join("mnt").join(format!("{name}-parent"));
    let result = match storage {
        Storage::DeviceMapper(dm) => (|| {
            let mut client = dm.control()?;
            let thin = snapshot(dm, &mut client, root, c, &name, pause_first)?;
            record.thin_id = thin.get();
            store.layers.insert(provisional.clone(), record.clone());
            store.save_layers()?;
            dm.with_mounted(&mut client, thin, |upper| {
                storage.with_image_readonly(&layers, &lower_mnt, |lower| {
                    remove_runner_paths(lower, upper)?;
                    write_blob_of_changes(lower, upper, &partial)
                })
            })
        })(),
        Storage::Overlay(_) => (|| {
            let live = c.mountpoint(root);
            let running = c.is_running() && rootfs::is_mounted(&live);
            let paused = match running && pause_first {
                true => Some(pause::pause(root, c)?),
                false => None,
            };
            let blob = storage.with_image_readonly(&layers, &lower_mnt, |lower| {
                if running {
                    return write_blob_of_changes(lower, &live, &partial);
                }
                let own = root.join("mnt").join(format!("{name}-container"));
                storage.with_container_readonly(&layers, c, &own, |upper| {
                    write_blob_of_changes(lower, upper, &partial)
                })
            });
            if let Some(paused) = paused {
                paused.resume()?;
            }
            let blob = blob?;
            storage.new_layer(layers.last(), &name)?;
            storage.with_layer_writable(&record, |dir, whiteouts| {
                let limits = Limits::own_blob();
                unpack_blob(
                    &partial,
                    LAYER_MEDIA_TYPE,
                    &blob.diff_id,
                    dir,
                    whiteouts,
                    &limits,
                )
            })?;
            Ok(blob)
        })(),
    };
    let result = result.and_then(|blob| {
        let path = store.blob_path(&blob.digest);
        fs::rename(&partial, &path)
            .with_context(|| format!("failed to store {}", path.display()))?;
        Ok(LayerRecord {
            chain_id: Digest::chain(record.parent.as_ref(), &blob.diff_id),
            diff_id: blob.diff_id,
            size: blob.content_bytes,
            blob: Some(BlobRef {
                digest: blob.digest,
                media_type: LAYER_MEDIA_TYPE.to_string(),
                size: blob.size,
            }),
            state: LayerState::Ready,
            ..record.clone()
        })
    });
    let _ = fs::remove_file(&partial);
    let done = match result {
        Ok(done) => done,
        Err(e) => {
            let e = e.context(format!("failed to commit container {}", c.short_id()));
            // What cannot be deleted now stays `Preparing`, for the next reconcile.
            if let Err(d) = storage.remove_layers(&[&record]) {
                return Err(e.context(format!("and its cleanup failed: {d:#}")));
            }
            store.layers.remove(&provisional);
            store.save_layers()?;
            return Err(e);
        }
    };
    store.layers.remove(&provisional);
    // The same changes on the same parent were committed before: that layer serves.
    if let Some(existing) = store
        .layers
        .get(&done.chain_id)
        .filter(|l| l.state == LayerState::Ready)
        .cloned()
    {
        storage.remove_layers(&[&done])?;
        store.save_layers()?;
        return Ok(existing);
    }
    store.layers.insert(done.chain_id.clone(), done.clone());
    store.save_layers()?;
    Ok(done)
}

/// Snapshots the container's thin. A running container (its rootfs mounted) is paused
/// first when asked, and its filesystem frozen around the snapshot either way.
fn snapshot(
    dm: &DeviceMapper,
    client: &mut Client,
    root: &Path,
    c: &Container,
    name: &str,
    pause_first: bool,
) -> anyhow::Result<ThinId> {
    let origin = ThinId::new(c.thin_id).context("bad thin id in the container's record")?;
    let live = c.mountpoint(root);
    if !(c.is_running() && rootfs::is_mounted(&live)) {
        return dm.create_snapshot(client, origin, name);
    }
    let paused = if pause_first {
        Some(pause::pause(root, c)?)
    } else {
        None
    };
    let frozen = Frozen::freeze(&live)?;
    let snap = dm.create_snapshot(client, origin, name);
    let thawed = frozen.thaw();
    let resumed = paused.map_or(Ok(()), pause::Paused::resume);
    // The caller deletes the snapshot on error (its record names it by device name).
    let snap = snap?;
    thawed.and(resumed)?;
    Ok(snap)
}

/// A filesystem frozen (its dirty data and journal written, writers held); thawed by
/// [`Frozen::thaw`] or when dropped.
struct Frozen {
    mountpoint: Option<PathBuf>,
}

impl Frozen {
    fn freeze(mountpoint: &Path) -> anyhow::Result<Frozen> {
        sys::freeze_fs(mountpoint)?;
        Ok(Frozen {
            mountpoint: Some(mountpoint.to_path_buf()),
        })
    }

    fn thaw(mut self) -> anyhow::Result<()> {
        match self.mountpoint.take() {
            Some(m) => thaw(&m),
            None => Ok(()),
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Some(m) = self.mountpoint.take() {
            if let Err(e) = thaw(&m) {
                tracing::warn!("{e:#}");
            }
        }
    }
}

/// Thaws, retrying a few times: a filesystem left frozen hangs every writer in the container
/// (`kill` and the next commit thaw it too, through `pause::recover`).
fn thaw(mountpoint: &Path) -> anyhow::Result<()> {
    let mut tries = 0;
    loop {
        match sys::thaw_fs(mountpoint) {
            Ok(_) => return Ok(()),
            Err(e) if tries < 5 => {
                tracing::warn!(error = %e, "thawing {} failed; retrying", mountpoint.display());
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20 << tries));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "failed to thaw the filesystem at {} (it stays frozen until `thinbox \
                         kill` or the next commit)",
                        mountpoint.display()
                    )
                })
            }
        }
    }
}

/// Removes from the new layer what the runner made as mount points (`/proc`, `/dev`,
/// `/etc/hostname`, ...) when the image did not have them: they are not the image's, and a
/// layer's thin must hold exactly its parent plus its tar.
fn remove_runner_paths(lower: &Path, upper: &Path) -> anyhow::Result<()> {
    for path in INIT_PATHS {
        let rel = path.trim_start_matches('/');
        if fs::symlink_metadata(lower.join(rel)).is_ok() {
            continue;
        }
        let made = upper.join(rel);
        match fs::symlink_metadata(&made) {
            Ok(m) if m.is_dir() => {
                let _ = fs::remove_dir(&made);
            }
            Ok(m) if m.is_file() && m.len() == 0 => fs::remove_file(&made)
                .with_context(|| format!("failed to remove {}", made.display()))?,
            _ => {}
        }
    }
    Ok(())
}

/// A written layer blob.
struct Blob {
    digest: Digest,
    size: u64,
    diff_id: Digest,
    content_bytes: u64,
}

/// Writes the gzipped layer tar of `upper`'s changes against `lower` to `partial`, hashing
/// the tar (diff id) and the blob (digest) on the way.
fn write_blob_of_changes(lower: &Path, upper: &Path, partial: &Path) -> anyhow::Result<Blob> {
    let list = changes(lower, upper).context("failed to compare the container with its image")?;
    if let Some(dir) = partial.parent() {
        fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    }
    let file =
        File::create(partial).with_context(|| format!("failed to create {}", partial.display()))?;
    let blob_hash = HashingWriter::new(BufWriter::new(file));
    let gzip = flate2::write::GzEncoder::new(blob_hash, flate2::Compression::default());
    let mut tar_hash = HashingWriter::new(gzip);
    let packed = write_layer(upper, &list, &mut tar_hash)?;
    let (diff_id, _, gzip) = tar_hash.finish();
    let (digest, size, writer) = gzip.finish()?.finish();
    let mut file = writer.into_inner().map_err(|e| e.into_error())?;
    file.flush()?;
    file.sync_all()?;
    tracing::debug!(
        entries = packed.entries,
        whiteouts = packed.whiteouts,
        bytes = packed.bytes,
        blob_bytes = size,
        "layer blob written"
    );
    Ok(Blob {
        digest,
        size,
        diff_id,
        content_bytes: packed.bytes,
    })
}
