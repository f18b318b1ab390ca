//! `diff CONTAINER`: A/C/D lines, the container's filesystem against its image's top layer.

use std::process::ExitCode;

use crate::cli::Global;
use crate::container::diff::changes;
use crate::container::{find, rootfs};
use crate::storage::Storage;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    pub container: String,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let root = &global.root;
    let c = find(root, &args.container)?;
    let layers = Store::load(root)?.image_layers(&c.image_id)?;
    let storage = Storage::open(global)?;
    let parent_mnt = root.join("mnt").join(format!("{}-diff-parent", c.id));
    let list = storage.with_image_readonly(&layers, &parent_mnt, |parent| {
        let live = c.mountpoint(root);
        if c.is_running() && rootfs::is_mounted(&live) {
            return Ok(changes(parent, &live)?);
        }
        let own = root.join("mnt").join(format!("{}-diff", c.id));
        storage.with_container_readonly(&layers, &c, &own, |mine| Ok(changes(parent, mine)?))
    })?;
    let mut out = String::new();
    for (kind, path) in list {
        out.push_str(&format!("{} {path}\n", kind.letter()));
    }
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
