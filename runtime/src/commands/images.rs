//! `images`: REPOSITORY TAG IMAGE ID CREATED SIZE, newest first.

use std::process::ExitCode;

use serde_json::json;

use super::format::{human_since, human_size, listing, seconds_since};
use crate::cli::Global;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only image ids
    #[arg(short, long)]
    pub quiet: bool,

    /// Full image ids
    #[arg(long)]
    pub no_trunc: bool,

    /// Show digests
    #[arg(long)]
    pub digests: bool,

    /// A template per image (`{{.Repository}}:{{.Tag}}`, `{{json .}}`) or `json`
    #[arg(long)]
    pub format: Option<String>,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let store = Store::load(&global.root)?;
    let mut rows = Vec::new();
    for image in store.images.values() {
        let refs = store.repositories.of(&image.id);
        let digest = image
            .manifest_digest
            .as_ref()
            .map_or("<none>".to_string(), |d| d.to_string());
        let mut tags: Vec<(String, String)> = refs
            .iter()
            .filter(|r| !r.contains('@'))
            .filter_map(|r| {
                r.rsplit_once(':')
                    .map(|(repo, tag)| (repo.to_string(), tag.to_string()))
            })
            .collect();
        if tags.is_empty() {
            let repo = refs
                .iter()
                .find_map(|r| r.split_once('@').map(|(repo, _)| repo.to_string()))
                .unwrap_or_else(|| "<none>".to_string());
            tags.push((repo, "<none>".to_string()));
        }
        let since = image.created.as_deref().and_then(seconds_since);
        for (repo, tag) in tags {
            rows.push((
                since.unwrap_or(u64::MAX),
                json!({
                    "Repository": repo,
                    "Tag": tag,
                    "Digest": digest,
                    "ID": if args.no_trunc { image.id.to_string() } else { image.id.short().to_string() },
                    "CreatedAt": image.created.clone().unwrap_or_default(),
                    "CreatedSince": since.map_or("N/A".to_string(), human_since),
                    "Size": human_size(store.image_size(image)),
                }),
            ));
        }
    }
    rows.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| a.1["Repository"].as_str().cmp(&b.1["Repository"].as_str()))
    });
    let mut out = String::new();
    if args.quiet {
        let mut seen = Vec::new();
        for (_, r) in &rows {
            let id = r["ID"].as_str().unwrap_or_default().to_string();
            if !seen.contains(&id) {
                out.push_str(&id);
                out.push('\n');
                seen.push(id);
            }
        }
    } else {
        let mut table = vec![("REPOSITORY", "Repository"), ("TAG", "Tag")];
        if args.digests {
            table.push(("DIGEST", "Digest"));
        }
        table.extend([
            ("IMAGE ID", "ID"),
            ("CREATED", "CreatedSince"),
            ("SIZE", "Size"),
        ]);
        out = listing(rows.iter().map(|(_, r)| r), args.format.as_deref(), &table)?;
    }
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
