//! `system df`: TYPE TOTAL ACTIVE SIZE RECLAIMABLE for images, containers, local volumes
//! and build cache, from the records the store keeps. Image sizes count each layer once
//! however many images share it; an image is active when a container uses it; what no
//! active image uses is reclaimable, and so are layers no image uses (left by an interrupted
//! pull or load; `system prune` deletes them). Containers are read from `ROOT/containers/*/
//! config.v2.json` when there are any (their writable thins' usage is not measured yet:
//! 0B). There are no volumes and no build cache.

use std::collections::HashSet;
use std::path::Path;
use std::process::ExitCode;

use serde_json::json;

use super::format::{human_size, listing};
use crate::cli::Global;
use crate::image::Digest;
use crate::store::Store;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Show disk usage
    #[command(after_help = "Example: thinbox system df")]
    Df(Args),
    /// Remove stopped containers, dangling images (-a: unused ones) and unused layers
    #[command(after_help = "Example: thinbox system prune -af")]
    Prune(super::prune::ImageArgs),
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A template per row (`{{.Type}} {{.Size}}`) or `json`
    #[arg(long)]
    pub format: Option<String>,
}

/// A container as `system df` needs it: the image it uses and whether it runs.
struct ContainerUse {
    image_id: Option<Digest>,
    running: bool,
}

/// The containers the other verbs recorded (none when there is no containers directory).
fn containers(root: &Path) -> Vec<ContainerUse> {
    let Ok(dir) = std::fs::read_dir(root.join("containers")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read(e.path().join("config.v2.json")).ok())
        .filter_map(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .map(|v| ContainerUse {
            image_id: v["image_id"].as_str().and_then(|d| Digest::parse(d).ok()),
            running: v["state"]["status"].as_str() == Some("Running"),
        })
        .collect()
}

fn reclaimable(bytes: u64, total: u64) -> String {
    match (bytes * 100).checked_div(total) {
        None => human_size(bytes),
        Some(percent) => format!("{} ({percent}%)", human_size(bytes)),
    }
}

pub fn run(command: Command, global: &Global) -> anyhow::Result<ExitCode> {
    match command {
        Command::Df(args) => df(args, global),
        Command::Prune(args) => super::prune::system(args, global),
    }
}

fn df(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let store = Store::load(&global.root)?;
    let containers = containers(&global.root);
    let active: HashSet<&Digest> = containers
        .iter()
        .filter_map(|c| c.image_id.as_ref())
        .filter(|id| store.images.contains_key(*id))
        .collect();
    let layer_size = |l: &Digest| store.layers.get(l).map_or(0, |r| r.size);
    let all_layers: HashSet<&Digest> = store.images.values().flat_map(|i| &i.layers).collect();
    let active_layers: HashSet<&Digest> = store
        .images
        .values()
        .filter(|i| active.contains(&i.id))
        .flat_map(|i| &i.layers)
        .collect();
    // Layers no image uses (an interrupted pull or load applied them) count as images'
    // space, all of it reclaimable (`system prune`).
    let unused_size: u64 = store
        .layers
        .values()
        .filter(|l| !all_layers.contains(&l.chain_id))
        .map(|l| l.size)
        .sum();
    let images_size: u64 = all_layers.iter().map(|l| layer_size(l)).sum::<u64>() + unused_size;
    let images_reclaimable: u64 = all_layers
        .difference(&active_layers)
        .map(|l| layer_size(l))
        .sum::<u64>()
        + unused_size;
    let running = containers.iter().filter(|c| c.running).count();

    let rows = [
        json!({
            "Type": "Images",
            "TotalCount": store.images.len().to_string(),
            "Active": active.len().to_string(),
            "Size": human_size(images_size),
            "Reclaimable": reclaimable(images_reclaimable, images_size),
        }),
        json!({
            "Type": "Containers",
            "TotalCount": containers.len().to_string(),
            "Active": running.to_string(),
            "Size": human_size(0),
            "Reclaimable": human_size(0),
        }),
        json!({
            "Type": "Local Volumes", "TotalCount": "0", "Active": "0",
            "Size": human_size(0), "Reclaimable": human_size(0),
        }),
        json!({
            "Type": "Build Cache", "TotalCount": "0", "Active": "0",
            "Size": human_size(0), "Reclaimable": human_size(0),
        }),
    ];
    let out = listing(
        &rows,
        args.format.as_deref(),
        &[
            ("TYPE", "Type"),
            ("TOTAL", "TotalCount"),
            ("ACTIVE", "Active"),
            ("SIZE", "Size"),
            ("RECLAIMABLE", "Reclaimable"),
        ],
    )?;
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
