//! `load [-i FILE]`: images from a Docker archive (Docker 25's layout or the older one,
//! plain or compressed), an OCI archive, or an OCI layout directory; stdin without `-i`.
//! Everything is verified before anything is stored (see `archive::load`); each new layer
//! then becomes a thin snapshot of its parent's with the layer applied, exactly as a pull
//! does. A load stores all of the archive's images or, when one fails, none of them.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};

use super::pull::{apply_layer, reconcile, write_blob, Additions};
use crate::archive::load::{read_images, Layout, LoadImage, LoadLayer};
use crate::cli::Global;
use crate::image::{Digest, HashingReader};
use crate::storage::unpack::Limits;
use crate::storage::Storage;
use crate::store::{ImageRecord, LayerState, Store};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Read from this archive (or OCI layout directory) instead of stdin
    #[arg(short, long, value_name = "FILE")]
    pub input: Option<PathBuf>,

    /// No progress output (there is none yet besides the loaded names)
    #[arg(short, long)]
    pub quiet: bool,
}

/// Copies a verified archive blob into the content store, checking it again on the way
/// (the source may be a directory someone else can write). `true` when it was not there.
fn store_blob(store: &Store, layer: &LoadLayer) -> anyhow::Result<bool> {
    let path = store.blob_path(&layer.blob.digest);
    if path.exists() {
        return Ok(false);
    }
    let dir = path.parent().context("blob path without a directory")?;
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.partial", layer.blob.digest.hex()));
    let result = (|| -> anyhow::Result<()> {
        let src = File::open(&layer.path)
            .with_context(|| format!("failed to open {}", layer.path.display()))?;
        let mut reader = HashingReader::new(BufReader::with_capacity(256 << 10, src));
        let mut out = BufWriter::new(File::create(&tmp)?);
        io::copy(&mut reader, &mut out)?;
        let (digest, size) = reader.finish();
        if digest != layer.blob.digest || size != layer.blob.size {
            bail!("blob {} changed while it was loaded", layer.blob.digest);
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, &path).with_context(|| format!("failed to store {}", path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| true)
}

/// Applies the layers of `image` that the store does not have; their chain ids.
fn apply_image(
    storage: &Storage,
    store: &mut Store,
    image: &LoadImage,
    added: &mut Additions,
) -> anyhow::Result<Vec<Digest>> {
    let mut parent: Option<Digest> = None;
    let mut chain_ids = Vec::new();
    for layer in &image.layers {
        let chain_id = Digest::chain(parent.as_ref(), &layer.diff_id);
        let ready = store
            .layers
            .get(&chain_id)
            .is_some_and(|l| l.state == LayerState::Ready);
        if !ready {
            if store_blob(store, layer)? {
                added.blob(&layer.blob.digest);
            }
            let record = apply_layer(
                storage,
                store,
                parent.as_ref(),
                &chain_id,
                &layer.diff_id,
                &layer.blob,
            )?;
            added.layer(&chain_id);
            tracing::info!(layer = %layer.diff_id, thin_id = record.thin_id, "layer loaded");
        }
        chain_ids.push(chain_id.clone());
        parent = Some(chain_id);
    }
    Ok(chain_ids)
}

/// Stores every image of the archive: layers, blobs, image records and tags, the records
/// saved once all are in.
fn add_images(
    storage: &Storage,
    store: &mut Store,
    images: &[LoadImage],
    added: &mut Additions,
) -> anyhow::Result<()> {
    for image in images {
        let chain_ids = apply_image(storage, store, image, added)?;
        if write_blob(store, &image.id, &image.config)? {
            added.blob(&image.id);
        }
        if let Some((bytes, digest)) = &image.manifest {
            if write_blob(store, digest, bytes)? {
                added.blob(digest);
            }
        }
        store.images.insert(
            image.id.clone(),
            ImageRecord {
                id: image.id.clone(),
                manifest_digest: image.manifest.as_ref().map(|(_, d)| d.clone()),
                layers: chain_ids,
                created: image.summary.created.clone(),
            },
        );
        for tag in &image.tags {
            let repo = tag.repository();
            store.repositories.set(&repo, tag.to_string(), &image.id);
        }
    }
    store.save_images()
}

fn open_layout(input: Option<&Path>, root: &Path) -> anyhow::Result<Layout> {
    let scratch = root
        .join("tmp")
        .join(format!("load-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    match input {
        Some(path) if path.is_dir() => Layout::directory(path),
        Some(path) => {
            let file =
                File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
            Layout::extract(Box::new(file) as Box<dyn Read>, scratch)
        }
        None => {
            if io::stdin().is_terminal() {
                bail!("requested load from stdin, but stdin is empty");
            }
            Layout::extract(Box::new(io::stdin()), scratch)
        }
    }
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut store = Store::lock(&global.root)?;
    let layout = open_layout(args.input.as_deref(), &global.root)?;
    let images = read_images(&layout, &Limits::from_env()?).context("the archive was refused")?;
    let verified = started.elapsed();

    let storage = Storage::open(global)?;
    reconcile(&mut store, &storage)?;
    // All or nothing: the user sees one failed command, so an image that fails takes the
    // images stored before it back too.
    let mut added = Additions::new(&store);
    if let Err(e) = add_images(&storage, &mut store, &images, &mut added) {
        return Err(added.roll_back_on(e, &storage, &mut store));
    }
    let mut out = io::stdout().lock();
    for image in &images {
        if image.tags.is_empty() {
            writeln!(out, "Loaded image ID: {}", image.id)?;
        }
        for tag in &image.tags {
            writeln!(out, "Loaded image: {tag}")?;
        }
    }
    tracing::info!(
        verify_ms = verified.as_millis() as u64,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "load finished"
    );
    Ok(ExitCode::SUCCESS)
}
