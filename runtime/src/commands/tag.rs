//! `tag SOURCE TARGET`: another name for a local image.

use std::process::ExitCode;

use anyhow::Context;

use crate::cli::Global;
use crate::image::Reference;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image: name[:tag], name@digest or id
    pub source: String,

    /// The new name: [REGISTRY[:PORT]/]NAME[:TAG]
    pub target: String,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let target = Reference::parse_tag(&args.target)?;
    let mut store = Store::lock(&global.root)?;
    let id = store
        .find_image(&args.source)
        .with_context(|| format!("No such image: {}", args.source))?
        .id
        .clone();
    let repo = target.repository();
    store.repositories.set(&repo, target.to_string(), &id);
    store.save_images()?;
    Ok(ExitCode::SUCCESS)
}
