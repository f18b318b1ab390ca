//! `inspect NAME...`: a JSON array of Docker's inspect objects, for containers and images
//! (a name that is both is the container, as in Docker; `--type` chooses).

use std::process::ExitCode;

use anyhow::Context;
use serde_json::{json, Map, Value};

use super::format::render;
use crate::cli::Global;
use crate::container::{self, Container};
use crate::storage::overlay::overlay_dir;
use crate::storage::DriverKind;
use crate::store::{ImageRecord, Store};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Containers (name, id or id prefix) or images (name[:tag], name@digest, or id)
    #[arg(required = true, value_name = "NAME")]
    pub images: Vec<String>,

    /// A template per object (`{{.Id}}`, `{{json .Config.Cmd}}`, `{{.State.Status}}`)
    #[arg(short, long)]
    pub format: Option<String>,

    /// Only look for this kind of object
    #[arg(long = "type", value_enum)]
    pub kind: Option<Kind>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Container,
    Image,
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

/// Docker's `GraphDriver` of an image: its top layer's thin with devicemapper, its layer
/// directories with overlay2.
fn image_graph_driver(store: &Store, image: &ImageRecord) -> Value {
    let layers: Vec<&crate::store::LayerRecord> = image
        .layers
        .iter()
        .filter_map(|l| store.layers.get(l))
        .collect();
    match DriverKind::of_root(store.root()) {
        Some(DriverKind::Overlay) => {
            let dir = overlay_dir(store.root());
            let diff = |name: &str| dir.join(name).join("diff").display().to_string();
            let (lower, upper) = match layers.split_last() {
                Some((top, rest)) => (
                    rest.iter()
                        .rev()
                        .map(|l| diff(&l.device_name))
                        .collect::<Vec<_>>(),
                    diff(&top.device_name),
                ),
                None => (Vec::new(), String::new()),
            };
            let mut data = json!({ "UpperDir": upper });
            if !lower.is_empty() {
                data["LowerDir"] = json!(lower.join(":"));
            }
            json!({ "Name": "overlay2", "Data": data })
        }
        _ => {
            let data = match layers.last() {
                Some(layer) => json!({
                    "DeviceId": layer.thin_id.to_string(),
                    "DeviceName": layer.device_name,
                    "DeviceSize": store.device_size().map_or_else(String::new, |s| s.to_string()),
                }),
                None => Value::Null,
            };
            json!({ "Name": "devicemapper", "Data": data })
        }
    }
}

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
    let graph_driver = image_graph_driver(store, image);
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
        "GraphDriver": graph_driver,
        "RootFS": { "Type": "layers", "Layers": diff_ids },
        "Metadata": { "LastTagTime": "0001-01-01T00:00:00Z" },
    }))
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let store = Store::load(&global.root)?;
    let containers = if args.kind == Some(Kind::Image) {
        Vec::new()
    } else {
        container::list(&global.root)?
    };
    let mut found = Vec::new();
    let mut missing = false;
    for name in &args.images {
        let as_container = (args.kind != Some(Kind::Image))
            .then(|| find_container(&containers, name))
            .flatten();
        if let Some(c) = as_container {
            found.push(describe_container(&store, c, &global.root));
            continue;
        }
        match store
            .find_image(name)
            .filter(|_| args.kind != Some(Kind::Container))
        {
            Some(image) => found.push(describe(&store, image)?),
            None => {
                let what = match args.kind {
                    None => "object",
                    Some(Kind::Image) => "image",
                    Some(Kind::Container) => "container",
                };
                eprintln!("Error: No such {what}: {name}");
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

/// A container by full id, name, or unique id prefix (of at least 4 digits here, so that a
/// short image name is not taken for an id prefix).
fn find_container<'c>(all: &'c [Container], name: &str) -> Option<&'c Container> {
    let name = name.strip_prefix('/').unwrap_or(name);
    if let Some(c) = all.iter().find(|c| c.id == name || c.name == name) {
        return Some(c);
    }
    if name.len() < 4 {
        return None;
    }
    let mut matches = all.iter().filter(|c| c.id.starts_with(name));
    match (matches.next(), matches.next()) {
        (Some(one), None) => Some(one),
        _ => None,
    }
}

/// Docker's container inspect object, the fields thinbox has.
pub fn describe_container(store: &Store, c: &Container, root: &std::path::Path) -> Value {
    let graph_driver = match DriverKind::of_root(root) {
        Some(DriverKind::Overlay) => {
            let dir = overlay_dir(root).join(&c.device_name);
            let lower = store
                .images
                .get(&c.image_id)
                .map(|image| image_graph_driver(store, image))
                .and_then(|g| {
                    let d = &g["Data"];
                    let mut all: Vec<String> = d["UpperDir"]
                        .as_str()
                        .map(str::to_string)
                        .into_iter()
                        .collect();
                    all.extend(d["LowerDir"].as_str().map(str::to_string));
                    (!all.is_empty()).then(|| all.join(":"))
                });
            json!({
                "Name": "overlay2",
                "Data": {
                    "LowerDir": lower,
                    "UpperDir": dir.join("diff"),
                    "WorkDir": dir.join("work"),
                    "MergedDir": c.mountpoint(root),
                },
            })
        }
        _ => json!({
            "Name": "devicemapper",
            "Data": {
                "DeviceId": c.thin_id.to_string(),
                "DeviceName": c.device_name,
                "DeviceSize": store.device_size().map_or_else(String::new, |s| s.to_string()),
            },
        }),
    };
    let status = c.status();
    let running = status == container::Status::Running;
    let mut config = c.config.clone().unwrap_or_else(|| json!({}));
    if let Some(obj) = config.as_object_mut() {
        obj.insert("Image".into(), json!(c.image));
        obj.insert("Hostname".into(), json!(c.hostname));
        obj.insert("Tty".into(), json!(c.tty));
        obj.insert("OpenStdin".into(), json!(c.open_stdin));
    }
    let (path, args) = c
        .process
        .args
        .split_first()
        .map_or((String::new(), Vec::new()), |(p, a)| {
            (p.clone(), a.to_vec())
        });
    json!({
        "Id": c.id,
        "Created": c.created,
        "Path": path,
        "Args": args,
        "State": {
            "Status": status.name(),
            "Running": running,
            "Paused": false,
            "Restarting": false,
            "OOMKilled": false,
            "Dead": status == container::Status::Dead,
            "Pid": if running { c.state.pid.unwrap_or(0) } else { 0 },
            "ExitCode": c.state.exit_code.unwrap_or(0),
            "Error": c.state.error.clone().unwrap_or_default(),
            "StartedAt": c.state.started_at.clone().unwrap_or_else(|| "0001-01-01T00:00:00Z".into()),
            "FinishedAt": c.state.finished_at.clone().unwrap_or_else(|| "0001-01-01T00:00:00Z".into()),
        },
        "Image": c.image_id,
        "LogPath": c.log_path(root),
        "Name": format!("/{}", c.name),
        "RestartCount": 0,
        "Driver": graph_driver["Name"],
        "Platform": "linux",
        "HostConfig": {
            "AutoRemove": c.auto_remove,
            "Runtime": c.runtime.clone().unwrap_or_else(|| "thinbox".into()),
            "NetworkMode": "host",
            "CapAdd": (!c.cap_add.is_empty()).then(|| c.cap_add.clone()),
            "CapDrop": (!c.cap_drop.is_empty()).then(|| c.cap_drop.clone()),
        },
        "GraphDriver": graph_driver,
        "Mounts": [],
        "Config": config,
    })
}
