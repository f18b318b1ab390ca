//! `push NAME[:TAG]`: the image's layer blobs and config, then its manifest, to the
//! repository NAME names. Blobs the repository has are skipped (`HEAD`), blobs another
//! repository of the same registry has are mounted from it, the rest are uploaded. The
//! manifest is the one the image was pulled or loaded with, byte for byte, so a pulled
//! image keeps its digest wherever it is pushed.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::Global;
use crate::image::local::manifest_of;
use crate::image::{parse_manifest, ConfigSummary, ManifestKind, Reference};
use crate::registry::push::BlobPush;
use crate::registry::sources::Sources;
use crate::registry::{auth, Registry};
use crate::store::Store;

/// Blobs up to this size go in one `PUT`; larger ones in `PATCH` chunks of this size.
/// `THINBOX_PUSH_CHUNK_SIZE` (bytes) changes it, so tests can drive the chunked protocol.
const DEFAULT_CHUNK_SIZE: u64 = 32 << 20;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image: [REGISTRY[:PORT]/]NAME[:TAG] (a local name of the image)
    pub name: String,

    /// No progress output
    #[arg(short, long)]
    pub quiet: bool,
}

fn chunk_size() -> u64 {
    std::env::var("THINBOX_PUSH_CHUNK_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_CHUNK_SIZE)
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let reference = Reference::parse(&args.name)?;
    let mut store = Store::lock(&global.root)?;
    let image = store
        .find_image(&reference.to_string())
        .with_context(|| {
            format!(
                "An image does not exist locally with the tag: {}",
                reference.repository()
            )
        })?
        .clone();
    let manifest = manifest_of(&store, &image)?;
    let ManifestKind::Image { config, layers } =
        parse_manifest(&manifest.bytes, &manifest.media_type)?
    else {
        bail!("the stored manifest of {} is an index", image.id);
    };
    let summary = ConfigSummary::parse(&store.read_blob(&image.id)?)?;
    if summary.rootfs.diff_ids.len() != layers.len() {
        bail!(
            "image {}: the config lists {} layers, the manifest {}",
            image.id,
            summary.rootfs.diff_ids.len(),
            layers.len()
        );
    }

    println!("The push refers to repository [{}]", reference.repository());
    let credentials = auth::lookup(&global.root, &reference.registry)?;
    let mut registry = Registry::new(&reference, credentials);
    let mut sources = Sources::load(&global.root)?;
    let chunk = chunk_size();
    let started = Instant::now();

    // Top layer first, as Docker lists them; the config last.
    let mut blobs: Vec<(String, &crate::image::Descriptor)> = layers
        .iter()
        .zip(&summary.rootfs.diff_ids)
        .rev()
        .map(|(l, diff_id)| (diff_id.short().to_string(), l))
        .collect();
    blobs.push((String::new(), &config));
    for (short, blob) in blobs {
        let path = store.blob_path(&blob.digest);
        if !path.exists() {
            bail!(
                "blob {} of image {} is not in the content store",
                blob.digest,
                image.id
            );
        }
        let bar = if args.quiet || short.is_empty() {
            ProgressBar::hidden()
        } else {
            let bar = ProgressBar::new(blob.size);
            bar.set_style(
                ProgressStyle::with_template("{prefix}: {msg:10} [{bar:30}] {bytes}/{total_bytes}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix(short.clone());
            bar.set_message("Pushing");
            bar
        };
        let mount_from = sources.on_registry(&blob.digest, &reference.registry);
        let t0 = Instant::now();
        let outcome = registry
            .push_blob(&blob.digest, &path, blob.size, &mount_from, chunk, &|n| {
                bar.set_position(n)
            })
            .with_context(|| format!("failed to push blob {}", blob.digest))?;
        bar.finish_and_clear();
        tracing::info!(
            blob = %blob.digest,
            bytes = blob.size,
            ms = t0.elapsed().as_millis() as u64,
            ?outcome,
            "blob pushed"
        );
        sources.add(&blob.digest, &reference.registry, registry.path());
        if !args.quiet && !short.is_empty() {
            match outcome {
                BlobPush::Exists => println!("{short}: Layer already exists"),
                BlobPush::Mounted { from } => println!("{short}: Mounted from {from}"),
                BlobPush::Uploaded => println!("{short}: Pushed"),
            }
        }
    }

    let target = reference.manifest_reference();
    let digest = registry.put_manifest(&target, &manifest.bytes, &manifest.media_type)?;
    sources.save(&global.root)?;
    let repo = reference.repository();
    store
        .repositories
        .set(&repo, format!("{repo}@{digest}"), &image.id);
    store.save_images()?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "push finished"
    );
    println!(
        "{}: digest: {digest} size: {}",
        reference.tag_or_default().unwrap_or(digest.as_str()),
        manifest.bytes.len()
    );
    Ok(ExitCode::SUCCESS)
}
