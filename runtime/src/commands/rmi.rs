//! `rmi IMAGE...`: untags, deletes images left without a name, then deletes the thin of
//! every layer no image uses any more (children before parents) and the blobs only they
//! used.
//!
//! As Docker does, an image a container was made from is not deleted while the container
//! exists: its last name is removed only with `-f` (the image stays, nameless, until its
//! containers are gone), and removing it by id is refused (with `-f` too while one of them
//! runs).

use std::collections::HashSet;
use std::process::ExitCode;

use anyhow::{bail, Context};

use crate::cli::Global;
use crate::container;
use crate::image::{Digest, Reference};
use crate::storage::Storage;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Images (name[:tag], name@digest, or id)
    #[arg(required = true)]
    pub images: Vec<String>,

    /// Remove an image by id even when several repositories name it
    #[arg(short, long)]
    pub force: bool,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let mut store = Store::lock(&global.root)?;
    let mut failed = false;
    for name in &args.images {
        if let Err(e) = remove_one(&mut store, &global.root, name, args.force) {
            eprintln!("Error response from daemon: {e:#}");
            failed = true;
        }
    }
    store.save_images()?;
    collect_garbage(&mut store, global, |layer| println!("Deleted: {layer}"))?;
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn remove_one(
    store: &mut Store,
    root: &std::path::Path,
    name: &str,
    force: bool,
) -> anyhow::Result<()> {
    let image = store
        .find_image(name)
        .with_context(|| format!("No such image: {name}"))?
        .clone();
    let by_reference = store.repositories.get(name).is_some()
        || Reference::parse(name).is_ok_and(|r| store.repositories.get(&r.to_string()).is_some());
    let refs = store.repositories.of(&image.id);
    let users: Vec<container::Container> = container::list(root)?
        .into_iter()
        .filter(|c| c.image_id == image.id)
        .collect();
    if let Some(user) = users.first() {
        let running = users.iter().find(|c| c.is_running());
        // Digest references go with the last tag (below), so only tags count here.
        let tags = refs.iter().filter(|r| !r.contains('@')).count();
        if by_reference && tags <= 1 && !force {
            bail!(
                "conflict: unable to remove repository reference \"{name}\" (must force) - \
                 container {} is using its referenced image {}",
                user.short_id(),
                image.id.short()
            );
        }
        if !by_reference {
            match running {
                Some(c) => bail!(
                    "conflict: unable to delete {} (cannot be forced) - image is being used by \
                     running container {}",
                    image.id.short(),
                    c.short_id()
                ),
                None if !force => bail!(
                    "conflict: unable to delete {} (must be forced) - image is being used by \
                     stopped container {}",
                    image.id.short(),
                    user.short_id()
                ),
                None => {}
            }
        }
    }
    if by_reference {
        let full = if store.repositories.get(name).is_some() {
            name.to_string()
        } else {
            Reference::parse(name)?.to_string()
        };
        store.repositories.remove(&full);
        println!("Untagged: {full}");
        // Digest references of the same repository go with the last tag.
        let repo = full.split(['@']).next().unwrap_or_default();
        let repo = repo
            .rsplit_once(':')
            .filter(|(_, t)| !t.contains('/'))
            .map_or(repo, |(r, _)| r);
        let tags_left = store
            .repositories
            .of(&image.id)
            .iter()
            .any(|r| !r.contains('@') && r.starts_with(repo));
        if !tags_left {
            for r in store.repositories.of(&image.id) {
                if r.starts_with(&format!("{repo}@")) {
                    store.repositories.remove(&r);
                    println!("Untagged: {r}");
                }
            }
        }
    } else {
        let repos: HashSet<&str> = refs
            .iter()
            .map(|r| r.split(['@', ':']).next().unwrap_or_default())
            .collect();
        if repos.len() > 1 && !force {
            bail!(
                "conflict: unable to delete {} (must be forced) - image is referenced in multiple repositories",
                image.id.short()
            );
        }
        for r in &refs {
            store.repositories.remove(r);
            println!("Untagged: {r}");
        }
    }
    // An image in use stays, nameless, until its containers are removed.
    if store.repositories.of(&image.id).is_empty() && users.is_empty() {
        store.images.remove(&image.id);
        println!("Deleted: {}", image.id);
    }
    Ok(())
}

/// Deletes layers (thins, records) and blobs that no image uses, `deleted` told of each
/// layer once it is gone. Besides what `rmi` and `image prune` leave, that is every layer
/// an interrupted `pull` or `load` (killed before it could take its work back) applied.
pub(crate) fn collect_garbage(
    store: &mut Store,
    global: &Global,
    mut deleted: impl FnMut(&Digest),
) -> anyhow::Result<()> {
    let used: HashSet<&Digest> = store
        .images
        .values()
        .flat_map(|i| i.layers.iter())
        .collect();
    let mut unused: Vec<Digest> = store
        .layers
        .keys()
        .filter(|l| !used.contains(l))
        .cloned()
        .collect();
    if unused.is_empty() {
        return remove_unused_blobs(store);
    }
    // Children first: a layer is deleted after every layer above it.
    fn depth<'s>(store: &'s Store, mut l: &'s Digest) -> usize {
        let mut n = 0;
        while let Some(p) = store.layers.get(l).and_then(|r| r.parent.as_ref()) {
            n += 1;
            l = p;
        }
        n
    }
    unused.sort_by_key(|l| std::cmp::Reverse(depth(store, l)));
    let storage = Storage::open(global)?;
    for chain_id in unused {
        let Some(layer) = store.layers.get(&chain_id).cloned() else {
            continue;
        };
        storage.remove_layers(&[&layer])?;
        store.layers.remove(&chain_id);
        store.save_layers()?;
        deleted(&chain_id);
    }
    remove_unused_blobs(store)
}

fn remove_unused_blobs(store: &Store) -> anyhow::Result<()> {
    let mut keep: HashSet<String> = HashSet::new();
    for image in store.images.values() {
        keep.insert(image.id.hex().to_string());
        if let Some(m) = &image.manifest_digest {
            keep.insert(m.hex().to_string());
        }
    }
    for layer in store.layers.values() {
        if let Some(b) = &layer.blob {
            keep.insert(b.digest.hex().to_string());
        }
    }
    let dir = store
        .blob_path(&Digest::of(b""))
        .parent()
        .map(|p| p.to_path_buf());
    let Some(dir) = dir else { return Ok(()) };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    // `.partial` files are blobs being written: by a command holding the store's lock, so
    // never by one running beside this one. What is here was left by a killed command.
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let partial = name.starts_with('.') && name.ends_with(".partial");
        if partial || !keep.contains(&name) && !name.starts_with('.') {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("failed to remove blob {}", entry.path().display()))?;
        }
    }
    Ok(())
}
