//! `inspect IMAGE...`: a JSON array of Docker's image inspect objects.

use std::process::ExitCode;

use anyhow::Context;
use serde_json::{json, Map, Value};

use super::format::render;
use crate::cli::Global;
use crate::store::{ImageRecord, Store};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Images (name[:tag], name@digest, or id)
    #[arg(required = true)]
    pub images: Vec<String>,

    /// A template per image (`{{.Id}}`, `{{json .Config.Cmd}}`)
    #[arg(short, long)]
    pub format: Option<String>,
}

/// The keys Docker always shows in `Config`, in its order, with its empty values.
type Empty = fn() -> Value;
const CONFIG_KEYS: [(&str, Empty); 17] = [
    ("Hostname", || json!("")),
    ("Domainname", || json!("")),
    ("User", || json!("")),
    ("AttachStdin", || json!(false)),
    ("AttachStdout", || json!(false)),
    ("AttachStderr", || json!(false)),
    ("ExposedPorts", || Value::Null),
    ("Tty", || json!(false)),
    ("OpenStdin", || json!(false)),
    ("StdinOnce", || json!(false)),
    ("Env", || Value::Null),
    ("Cmd", || Value::Null),
    ("Image", || json!("")),
    ("Volumes", || Value::Null),
    ("WorkingDir", || json!("")),
    ("Entrypoint", || Value::Null),
    ("Labels", || Value::Null),
];

pub fn describe(store: &Store, image: &ImageRecord) -> anyhow::Result<Value> {
    let config: Value = serde_json::from_slice(&store.read_blob(&image.id)?)
        .with_context(|| format!("the config of image {} is malformed", image.id))?;
    let inner = config.get("config").cloned().unwrap_or(Value::Null);
    let mut docker_config = Map::new();
    for (key, empty) in CONFIG_KEYS {
        docker_config.insert(
            key.to_string(),
            inner.get(key).cloned().unwrap_or_else(empty),
        );
    }
    if let Some(obj) = inner.as_object() {
        for (k, v) in obj {
            docker_config.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let refs = store.repositories.of(&image.id);
    let (digests, tags): (Vec<String>, Vec<String>) =
        refs.into_iter().partition(|r| r.contains('@'));
    let top = image.layers.last().and_then(|l| store.layers.get(l));
    let graph_data = match top {
        Some(layer) => json!({
            "DeviceId": layer.thin_id.to_string(),
            "DeviceName": layer.device_name,
            "DeviceSize": store.device_size().map_or_else(String::new, |s| s.to_string()),
        }),
        None => Value::Null,
    };
    let diff_ids: Vec<String> = image
        .layers
        .iter()
        .filter_map(|l| store.layers.get(l))
        .map(|l| l.diff_id.to_string())
        .collect();
    Ok(json!({
        "Id": image.id,
        "RepoTags": tags,
        "RepoDigests": digests,
        "Parent": "",
        "Comment": config.get("comment").cloned().unwrap_or(json!("")),
        "Created": image.created.clone().unwrap_or_default(),
        "DockerVersion": config.get("docker_version").cloned().unwrap_or(json!("")),
        "Author": config.get("author").cloned().unwrap_or(json!("")),
        "Config": docker_config,
        "Architecture": config.get("architecture").cloned().unwrap_or(json!("")),
        "Os": config.get("os").cloned().unwrap_or(json!("")),
        "Size": store.image_size(image),
        "GraphDriver": { "Name": "devicemapper", "Data": graph_data },
        "RootFS": { "Type": "layers", "Layers": diff_ids },
        "Metadata": { "LastTagTime": "0001-01-01T00:00:00Z" },
    }))
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let store = Store::load(&global.root)?;
    let mut found = Vec::new();
    let mut missing = false;
    for name in &args.images {
        match store.find_image(name) {
            Some(image) => found.push(describe(&store, image)?),
            None => {
                eprintln!("Error: No such image: {name}");
                missing = true;
            }
        }
    }
    match &args.format {
        Some(template) => {
            for v in &found {
                println!("{}", render(template, v)?);
            }
        }
        None => println!("{}", serde_json::to_string_pretty(&Value::Array(found))?),
    }
    Ok(if missing {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
