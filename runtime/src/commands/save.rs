//! `save [-o FILE] IMAGE...`: the images as one archive in Docker 25's layout (Docker's
//! `manifest.json` plus an OCI layout; see `archive`), gzip-compressed when FILE ends in
//! `.gz`, to stdout without `-o`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::archive::save::{write_archive, SaveImage};
use crate::cli::Global;
use crate::image::{Digest, Reference};
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Images (name[:tag], name@digest, or id; by id the image is saved without a name)
    #[arg(required = true)]
    pub images: Vec<String>,

    /// Write to this file instead of stdout (gzip-compressed when it ends in .gz)
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// The images named, each once, with the names they were named by.
fn select(store: &Store, names: &[String]) -> anyhow::Result<Vec<SaveImage>> {
    let mut by_id: BTreeMap<Digest, SaveImage> = BTreeMap::new();
    let mut order = Vec::new();
    for name in names {
        let image = store
            .find_image(name)
            .with_context(|| format!("No such image: {name}"))?;
        let tag = Reference::parse(name).ok().filter(|r| {
            r.digest.is_none() && store.repositories.get(&r.to_string()) == Some(&image.id)
        });
        let entry = by_id.entry(image.id.clone()).or_insert_with(|| {
            order.push(image.id.clone());
            SaveImage {
                image: image.clone(),
                tags: Vec::new(),
            }
        });
        if let Some(tag) = tag {
            if !entry.tags.contains(&tag) {
                entry.tags.push(tag);
            }
        }
    }
    Ok(order
        .into_iter()
        .filter_map(|id| by_id.remove(&id))
        .collect())
}

fn write_to(
    store: &Store,
    images: &[SaveImage],
    out: impl Write,
    gzip: bool,
) -> anyhow::Result<()> {
    if gzip {
        let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        write_archive(store, images, gz)?.finish()?.flush()?;
    } else {
        write_archive(store, images, out)?.flush()?;
    }
    Ok(())
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let store = Store::lock(&global.root)?;
    let images = select(&store, &args.images)?;
    let started = Instant::now();
    match &args.output {
        None => {
            if io::stdout().is_terminal() {
                bail!("cowardly refusing to save to a terminal. Use the -o flag or redirect");
            }
            write_to(&store, &images, BufWriter::new(io::stdout().lock()), false)?;
        }
        Some(path) => {
            let gzip = path.extension().is_some_and(|e| e == "gz");
            // Into a temporary file beside the target, renamed when complete: a failed
            // save leaves no half archive under the name asked for.
            let name = path.file_name().context("the output has no file name")?;
            let tmp = path.with_file_name(format!(".{}.partial", name.to_string_lossy()));
            let result = (|| {
                let file = File::create(&tmp)
                    .with_context(|| format!("failed to create {}", tmp.display()))?;
                let mut out = BufWriter::new(file);
                write_to(&store, &images, &mut out, gzip)?;
                out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                fs::rename(&tmp, path)
                    .with_context(|| format!("failed to write {}", path.display()))
            })();
            if result.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            result?;
        }
    }
    tracing::info!(
        images = images.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "save finished"
    );
    Ok(ExitCode::SUCCESS)
}
