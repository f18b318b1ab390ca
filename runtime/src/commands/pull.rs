//! `pull NAME[:TAG|@DIGEST]`: manifests (and indexes, for linux/amd64), the config and every
//! layer, each verified against its digest and size before it is used; each new layer
//! becomes a thin snapshot of its parent's with the layer applied.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::cli::Global;
use crate::image::{
    parse_manifest, pick_platform, Compression, ConfigSummary, Descriptor, Digest, HashingReader,
    HashingWriter, ManifestKind, Reference,
};
use crate::registry::sources::Sources;
use crate::registry::{auth, Registry};
use crate::storage::{unpack, Storage};
use crate::store::{BlobRef, ImageRecord, LayerRecord, LayerState, Repositories, Store};

/// Configs larger than this are refused.
const MAX_CONFIG_BYTES: u64 = 8 << 20;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image: [REGISTRY[:PORT]/]NAME[:TAG|@DIGEST]
    pub name: String,

    /// No progress output
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let reference = Reference::parse(&args.name)?;
    if reference.tag.is_none() && reference.digest.is_none() && !args.quiet {
        println!("Using default tag: latest");
    }
    let credentials = auth::lookup(&global.root, &reference.registry)?;
    let mut registry = Registry::new(&reference, credentials);
    let mut store = Store::lock(&global.root)?;
    let storage = Storage::open(global)?;
    reconcile(&mut store, &storage)?;

    let started = Instant::now();
    // The repo digest is what the tag or digest names (an index for multi-arch images, as
    // Docker reports it); the manifest digest is the linux/amd64 image manifest's.
    let (repo_digest, manifest_bytes, manifest_digest, config, layers) =
        fetch_manifest(&mut registry, &reference)?;
    if !args.quiet {
        println!(
            "{}: Pulling from {}",
            reference.tag_or_default().unwrap_or(repo_digest.as_str()),
            reference.path
        );
    }
    let config_bytes = fetch_small_blob(&mut registry, &config, MAX_CONFIG_BYTES)
        .context("failed to fetch the image config")?;
    let summary = ConfigSummary::parse(&config_bytes)?;
    if summary.os != "linux" || summary.architecture != "amd64" {
        tracing::warn!(
            os = %summary.os,
            architecture = %summary.architecture,
            "the image is not linux/amd64"
        );
    }
    if summary.rootfs.diff_ids.len() != layers.len() {
        bail!(
            "the config lists {} layers, the manifest {}",
            summary.rootfs.diff_ids.len(),
            layers.len()
        );
    }
    let image_id = config.digest.clone();
    let existed = store.images.contains_key(&image_id);

    let progress = MultiProgress::new();
    if args.quiet {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    // From here on the store changes; a failure takes back what this pull added.
    let mut added = Additions::new(&store);
    let stored = (|| -> anyhow::Result<bool> {
        let mut parent: Option<Digest> = None;
        let mut chain_ids = Vec::new();
        for (layer, diff_id) in layers.iter().zip(&summary.rootfs.diff_ids) {
            let chain_id = Digest::chain(parent.as_ref(), diff_id);
            let short = &layer.digest.hex()[..12];
            let ready = store
                .layers
                .get(&chain_id)
                .is_some_and(|l| l.state == LayerState::Ready);
            if ready {
                if !args.quiet {
                    println!("{short}: Already exists");
                }
            } else {
                let bar = progress.add(ProgressBar::new(layer.size));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix}: {msg:12} [{bar:30}] {bytes}/{total_bytes}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(short.to_string());
                bar.set_message("Downloading");
                let t0 = Instant::now();
                if download_layer(&mut registry, &store, layer, &bar)? {
                    added.blob(&layer.digest);
                }
                let downloaded = t0.elapsed();
                bar.set_message("Extracting");
                let t1 = Instant::now();
                let record = apply_layer(
                    &storage,
                    &mut store,
                    parent.as_ref(),
                    &chain_id,
                    diff_id,
                    layer,
                )?;
                added.layer(&chain_id);
                bar.finish_and_clear();
                tracing::info!(
                    layer = %layer.digest,
                    thin_id = record.thin_id,
                    bytes = layer.size,
                    download_ms = downloaded.as_millis() as u64,
                    apply_ms = t1.elapsed().as_millis() as u64,
                    "layer pulled"
                );
                if !args.quiet {
                    println!("{short}: Pull complete");
                }
            }
            chain_ids.push(chain_id.clone());
            parent = Some(chain_id);
        }

        if write_blob(&store, &manifest_digest, &manifest_bytes)? {
            added.blob(&manifest_digest);
        }
        if write_blob(&store, &image_id, &config_bytes)? {
            added.blob(&image_id);
        }
        store.images.insert(
            image_id.clone(),
            ImageRecord {
                id: image_id.clone(),
                manifest_digest: Some(manifest_digest.clone()),
                layers: chain_ids,
                created: summary.created.clone(),
            },
        );
        let repo = reference.repository();
        let was_tagged = reference
            .tag_or_default()
            .and_then(|tag| store.repositories.get(&format!("{repo}:{tag}")))
            == Some(&image_id);
        if let Some(tag) = reference.tag_or_default() {
            store
                .repositories
                .set(&repo, format!("{repo}:{tag}"), &image_id);
        }
        store
            .repositories
            .set(&repo, format!("{repo}@{repo_digest}"), &image_id);
        store.save_images()?;
        // Where these blobs are, for cross-repository mounts on a later push.
        let mut sources = Sources::load(&global.root)?;
        for d in layers.iter().map(|l| &l.digest).chain([&image_id]) {
            sources.add(d, &reference.registry, &reference.path);
        }
        sources.save(&global.root)?;
        Ok(was_tagged)
    })();
    let was_tagged = match stored {
        Ok(was_tagged) => was_tagged,
        Err(e) => return Err(added.roll_back_on(e, &storage, &mut store)),
    };
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "pull finished"
    );
    if !args.quiet {
        println!("Digest: {repo_digest}");
        if existed && was_tagged {
            println!("Status: Image is up to date for {reference}");
        } else {
            println!("Status: Downloaded newer image for {reference}");
        }
    }
    println!("{reference}");
    Ok(ExitCode::SUCCESS)
}

/// Drops what an interrupted pull, load or commit left: layers still `Preparing` (their
/// filesystems are deleted).
pub(crate) fn reconcile(store: &mut Store, storage: &Storage) -> anyhow::Result<()> {
    let stale: Vec<LayerRecord> = store
        .layers
        .values()
        .filter(|l| l.state == LayerState::Preparing)
        .cloned()
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    for layer in &stale {
        storage.remove_layers(&[layer]).with_context(|| {
            format!(
                "failed to delete what unfinished layer {} left",
                layer.chain_id
            )
        })?;
        tracing::warn!(layer = %layer.chain_id, "dropped a layer an interrupted run left");
        store.layers.remove(&layer.chain_id);
    }
    store.save_layers()
}

/// What the registry has for a reference: the digest of what it names (the repo digest),
/// the image manifest's bytes and digest, its config and its layers.
type FetchedManifest = (Digest, Vec<u8>, Digest, Descriptor, Vec<Descriptor>);

/// The digest of what `reference` names, and the image manifest (following an index to
/// linux/amd64): its bytes, digest, config and layers. Every manifest's digest is checked:
/// against the reference's digest, the index entry, or the registry's
/// `Docker-Content-Digest`.
fn fetch_manifest(
    registry: &mut Registry,
    reference: &Reference,
) -> anyhow::Result<FetchedManifest> {
    let top = registry.manifest(&reference.manifest_reference())?;
    let top_digest = Digest::of(&top.bytes);
    if let Some(expected) = &reference.digest {
        if *expected != top_digest {
            bail!("manifest digest mismatch: asked for {expected}, the registry sent {top_digest}");
        }
    }
    let (bytes, digest, kind) = match parse_manifest(&top.bytes, &top.content_type)? {
        ManifestKind::Index(manifests) => {
            let entry = pick_platform(&manifests)?.clone();
            let m = registry.manifest(entry.digest.as_str())?;
            entry
                .digest
                .verify(&m.bytes, Some(entry.size))
                .context("the platform manifest does not match the index")?;
            let kind = parse_manifest(&m.bytes, &m.content_type)?;
            (m.bytes, entry.digest, kind)
        }
        kind => (top.bytes, top_digest.clone(), kind),
    };
    match kind {
        ManifestKind::Image { config, layers } => Ok((top_digest, bytes, digest, config, layers)),
        ManifestKind::Index(_) => bail!("an index points to another index"),
    }
}

/// Fetches a small blob whole and verifies it.
fn fetch_small_blob(
    registry: &mut Registry,
    d: &Descriptor,
    limit: u64,
) -> anyhow::Result<Vec<u8>> {
    if d.size > limit {
        bail!(
            "blob {} is {} bytes, more than the {limit} allowed",
            d.digest,
            d.size
        );
    }
    let mut bytes = Vec::new();
    registry.blob(&d.digest, d.size)?.read_to_end(&mut bytes)?;
    d.digest.verify(&bytes, Some(d.size))?;
    Ok(bytes)
}

/// Stores a small blob (manifest, config) unless the store has it; `true` when it did not.
pub(crate) fn write_blob(store: &Store, digest: &Digest, bytes: &[u8]) -> anyhow::Result<bool> {
    let path = store.blob_path(digest);
    if path.exists() {
        return Ok(false);
    }
    crate::store::write_atomic(&path, bytes)?;
    Ok(true)
}

/// Downloads a layer blob into the content store, verified: it goes to a temporary file and
/// is renamed into place only when its size and digest match the descriptor; on a mismatch
/// nothing is kept. A blob already in the store is checked again before it is trusted (and
/// fetched again when damaged). `true` when the store did not have the blob at all.
fn download_layer(
    registry: &mut Registry,
    store: &Store,
    layer: &Descriptor,
    bar: &ProgressBar,
) -> anyhow::Result<bool> {
    if layer.urls.as_ref().is_some_and(|u| !u.is_empty()) {
        bail!(
            "layer {} is a foreign layer (fetched from other URLs): not supported",
            layer.digest
        );
    }
    let path = store.blob_path(&layer.digest);
    let existed = path.exists();
    if existed {
        let file =
            File::open(&path).with_context(|| format!("failed to open {}", path.display()))?;
        let mut hashing = HashingReader::new(BufReader::new(file));
        io::copy(&mut hashing, &mut io::sink())?;
        let (digest, size) = hashing.finish();
        if digest == layer.digest && size == layer.size {
            bar.set_position(size);
            return Ok(false);
        }
        tracing::warn!(blob = %layer.digest, "a stored blob was damaged; fetching it again");
        fs::remove_file(&path)?;
    }
    let dir = path.parent().context("blob path without a directory")?;
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.partial", layer.digest.hex()));
    let result = (|| -> anyhow::Result<()> {
        let file =
            File::create(&tmp).with_context(|| format!("failed to create {}", tmp.display()))?;
        let mut out = HashingWriter::new(BufWriter::new(file));
        let mut body = registry.blob(&layer.digest, layer.size)?;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = body
                .read(&mut buf)
                .with_context(|| format!("failed to download blob {}", layer.digest))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
            bar.set_position(out.count());
        }
        let (digest, size, writer) = out.finish();
        if size != layer.size {
            bail!(
                "blob {} has {size} bytes, the manifest says {}: refused",
                layer.digest,
                layer.size
            );
        }
        if digest != layer.digest {
            bail!(
                "blob digest mismatch: expected {}, got {digest}: refused",
                layer.digest
            );
        }
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, &path).with_context(|| format!("failed to store {}", path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| !existed)
}

/// What one pull or load added to the store, so that a failure can take all of it back: the
/// layers it applied and the blobs it stored (never those the store had before: other
/// images use them), and the image and tag records as they were before it. The command
/// holds the store's lock from before it takes this until after any roll-back, so nothing
/// else can have come to use what it added.
pub(crate) struct Additions {
    layers: Vec<Digest>,
    blobs: Vec<Digest>,
    images: BTreeMap<Digest, ImageRecord>,
    repositories: Repositories,
}

impl Additions {
    /// Starts recording, with `store`'s image and tag records as they are now.
    pub(crate) fn new(store: &Store) -> Additions {
        Additions {
            layers: Vec::new(),
            blobs: Vec::new(),
            images: store.images.clone(),
            repositories: store.repositories.clone(),
        }
    }

    /// A layer this command applied (in the order applied: parents first).
    pub(crate) fn layer(&mut self, chain_id: &Digest) {
        self.layers.push(chain_id.clone());
    }

    /// A blob this command put in the content store.
    pub(crate) fn blob(&mut self, digest: &Digest) {
        self.blobs.push(digest.clone());
    }

    /// Puts the store back as it was and returns `failure`, with what the roll-back could
    /// not undo added to it. The image and tag records go back first, so that no saved
    /// record names a deleted layer; then the layers, children first; then the blobs. A
    /// layer whose filesystem cannot be deleted now keeps its record as `Preparing`, for
    /// the next mutating command's reconcile.
    pub(crate) fn roll_back_on(
        self,
        failure: anyhow::Error,
        storage: &Storage,
        store: &mut Store,
    ) -> anyhow::Error {
        let mut failure = failure;
        store.images = self.images;
        store.repositories = self.repositories;
        if let Err(e) = store.save_images() {
            failure = failure.context(format!("and restoring the image records failed: {e:#}"));
        }
        for chain_id in self.layers.iter().rev() {
            let Some(layer) = store.layers.get_mut(chain_id) else {
                continue;
            };
            match storage.remove_layers(&[&*layer]) {
                Ok(()) => {
                    store.layers.remove(chain_id);
                }
                Err(e) => {
                    layer.state = LayerState::Preparing;
                    failure = failure.context(format!(
                        "and deleting layer {chain_id} failed (the next command retries): {e:#}"
                    ));
                }
            }
        }
        if let Err(e) = store.save_layers() {
            failure = failure.context(format!("and saving the layer records failed: {e:#}"));
        }
        for digest in &self.blobs {
            let path = store.blob_path(digest);
            if let Err(e) = fs::remove_file(&path) {
                failure = failure.context(format!("and removing {} failed: {e}", path.display()));
            }
        }
        failure
    }
}

/// Makes the layer's filesystem (with devicemapper, a snapshot of the parent layer's thin or
/// of the base device; with overlay, a directory of its own), applies the blob, checks its
/// diff id. The record is saved `Preparing` before the filesystem exists and `Ready` once it
/// is complete; on failure the filesystem and the record go.
pub(crate) fn apply_layer(
    storage: &Storage,
    store: &mut Store,
    parent: Option<&Digest>,
    chain_id: &Digest,
    diff_id: &Digest,
    layer: &Descriptor,
) -> anyhow::Result<LayerRecord> {
    let parent_record = match parent {
        None => None,
        Some(p) => Some(
            store
                .layers
                .get(p)
                .context("the parent layer has no record")?
                .clone(),
        ),
    };
    let name = format!("thinbox-{}", chain_id.hex());
    let mut record = LayerRecord {
        chain_id: chain_id.clone(),
        diff_id: diff_id.clone(),
        parent: parent.cloned(),
        thin_id: 0,
        device_name: name.clone(),
        size: 0,
        blob: Some(BlobRef {
            digest: layer.digest.clone(),
            media_type: layer.media_type.clone(),
            size: layer.size,
        }),
        state: LayerState::Preparing,
    };
    // Intent first: a crash from here on leaves a record the next pull cleans up.
    store.layers.insert(chain_id.clone(), record.clone());
    store.save_layers()?;
    let result = storage
        .new_layer(parent_record.as_ref(), &name)
        .and_then(|thin_id| {
            record.thin_id = thin_id;
            store.layers.insert(chain_id.clone(), record.clone());
            store.save_layers()?;
            let blob = store.blob_path(&layer.digest);
            let limits = unpack::Limits::from_env()?;
            storage.with_layer_writable(&record, |root, whiteouts| {
                unpack_blob(&blob, &layer.media_type, diff_id, root, whiteouts, &limits)
            })
        });
    match result {
        Ok(applied) => {
            record.size = applied.bytes;
            record.state = LayerState::Ready;
            store.layers.insert(chain_id.clone(), record.clone());
            store.save_layers()?;
            Ok(record)
        }
        Err(e) => {
            let e = e.context(format!("failed to apply layer {}", layer.digest));
            // What cannot be deleted now stays `Preparing`, for the next reconcile.
            if let Err(d) = storage.remove_layers(&[&record]) {
                return Err(e.context(format!("and its cleanup failed: {d:#}")));
            }
            store.layers.remove(chain_id);
            store.save_layers()?;
            Err(e)
        }
    }
}

/// Decompresses the blob at `path` and applies it onto `root`, checking its diff id.
pub(crate) fn unpack_blob(
    path: &Path,
    media_type: &str,
    diff_id: &Digest,
    root: &Path,
    whiteouts: unpack::Whiteouts,
    limits: &unpack::Limits,
) -> anyhow::Result<unpack::Applied> {
    let (counted, compressed) = unpack::Counted::new(
        File::open(path).with_context(|| format!("failed to open {}", path.display()))?,
    );
    let mut file = BufReader::new(counted);
    let head = io::BufRead::fill_buf(&mut file)?.to_vec();
    let decoded: Box<dyn Read> = match Compression::of_layer(media_type, &head)? {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::bufread::GzDecoder::new(file)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(file)?),
    };
    // A decompression bomb stops here, before it fills the layer.
    let decoded = unpack::RatioGuard::new(decoded, compressed, limits);
    let mut tar = HashingReader::new(decoded);
    let applied = unpack::apply_layer_with(root, &mut tar, whiteouts, limits)?;
    // The tar's end-of-archive blocks and any padding count toward the diff id too.
    io::copy(&mut tar, &mut io::sink()).context("failed to read the rest of the layer")?;
    let (actual, _) = tar.finish();
    if actual != *diff_id {
        bail!("layer content digest mismatch: the config says {diff_id}, the tar is {actual}");
    }
    Ok(applied)
}
