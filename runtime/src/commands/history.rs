//! `history IMAGE`: the config's history, newest first, in Docker's columns IMAGE CREATED
//! CREATED BY SIZE COMMENT. Entries that made a layer get that layer's size; the top entry
//! shows the image id and the others `<missing>`, as Docker shows pulled images.

use std::process::ExitCode;

use anyhow::Context;
use serde::Deserialize;
use serde_json::json;

use super::format::{ellipsis, human_since, human_size, listing, seconds_since};
use crate::cli::Global;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image: name[:tag], name@digest or id
    pub image: String,

    /// Do not shorten ids and commands
    #[arg(long)]
    pub no_trunc: bool,

    /// Only image ids
    #[arg(short, long)]
    pub quiet: bool,

    /// Sizes and dates in human form (the default; `-H=false` prints bytes and RFC 3339)
    #[arg(short = 'H', long, default_value_t = true, action = clap::ArgAction::Set)]
    pub human: bool,

    /// A template per entry (`{{.CreatedBy}}`) or `json`
    #[arg(long)]
    pub format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct HistoryEntry {
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    created_by: Option<String>,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    empty_layer: bool,
}

#[derive(Debug, Deserialize)]
struct ConfigHistory {
    #[serde(default)]
    history: Vec<HistoryEntry>,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let store = Store::load(&global.root)?;
    let image = store
        .find_image(&args.image)
        .with_context(|| format!("No such image: {}", args.image))?;
    let config: ConfigHistory = serde_json::from_slice(&store.read_blob(&image.id)?)
        .with_context(|| format!("the config of image {} is malformed", image.id))?;
    let mut sizes = image
        .layers
        .iter()
        .map(|l| store.layers.get(l).map_or(0, |r| r.size));
    let mut rows: Vec<(HistoryEntry, u64)> = if config.history.is_empty() {
        // No history in the config: one line per layer.
        sizes
            .map(|s| {
                let entry = HistoryEntry {
                    created: image.created.clone(),
                    ..HistoryEntry::default()
                };
                (entry, s)
            })
            .collect()
    } else {
        config
            .history
            .into_iter()
            .map(|h| {
                let size = if h.empty_layer {
                    0
                } else {
                    sizes.next().unwrap_or(0)
                };
                (h, size)
            })
            .collect()
    };
    rows.reverse();

    let mut values = Vec::new();
    for (i, (h, size)) in rows.iter().enumerate() {
        let id = if i == 0 {
            if args.no_trunc {
                image.id.to_string()
            } else {
                image.id.short().to_string()
            }
        } else {
            "<missing>".to_string()
        };
        let created = h.created.clone().unwrap_or_default();
        let created_shown = if args.human {
            seconds_since(&created).map_or("N/A".to_string(), human_since)
        } else {
            created.clone()
        };
        let by = h.created_by.clone().unwrap_or_default().replace('\t', " ");
        let by = if args.no_trunc { by } else { ellipsis(&by, 45) };
        values.push(json!({
            "ID": id,
            "CreatedAt": created,
            "CreatedSince": created_shown,
            "CreatedBy": by,
            "Size": if args.human { human_size(*size) } else { size.to_string() },
            "Comment": h.comment.clone().unwrap_or_default(),
        }));
    }

    let mut out = String::new();
    if args.quiet {
        for v in &values {
            out.push_str(v["ID"].as_str().unwrap_or_default());
            out.push('\n');
        }
    } else {
        out = listing(
            &values,
            args.format.as_deref(),
            &[
                ("IMAGE", "ID"),
                ("CREATED", "CreatedSince"),
                ("CREATED BY", "CreatedBy"),
                ("SIZE", "Size"),
                ("COMMENT", "Comment"),
            ],
        )?;
    }
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_commands_are_cut_like_docker() {
        assert_eq!(ellipsis("short", 45), "short");
        let long = "x".repeat(50);
        let cut = ellipsis(&long, 45);
        assert_eq!(cut.chars().count(), 45);
        assert!(cut.ends_with('…'));
    }
}
