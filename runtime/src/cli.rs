//! The command line: global options (state directory, storage options) and the verbs.

use std::path::PathBuf;

use clap::{ArgAction, Parser, Subcommand};

use crate::commands::{daemon, images, info, inspect, login, pull, rmi};
use crate::commands::{diff, exec, kill, logs, ps, rm, run, start, stop};

/// Docker-style images on a thin pool: each layer a snapshot of its parent's thin device.
#[derive(Debug, Parser)]
#[command(name = "thinbox", version, propagate_version = true)]
#[command(after_help = "Example: thinbox pull 127.0.0.1:5000/library/busybox:latest")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,

    #[command(subcommand)]
    pub command: Command,
}

/// Options every verb takes.
#[derive(Clone, Debug, clap::Args)]
pub struct Global {
    /// State directory: the pool (ROOT/devicemapper), image and layer records, blobs
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = "/var/lib/thinbox"
    )]
    pub root: PathBuf,

    /// Storage driver options, Docker's names: dm.basesize, dm.fs, dm.mkfsarg, dm.mountopt,
    /// dm.blocksize, dm.loopdatasize, dm.loopmetadatasize, dm.thinpooldev, dm.min_free_space
    /// (used when the storage is first created; later runs keep what was chosen then, except
    /// dm.mountopt and dm.min_free_space)
    #[arg(long = "storage-opt", global = true, value_name = "KEY=VALUE")]
    pub storage_opts: Vec<String>,

    /// Storage driver: devicemapper (block copy-on-write on a thin pool, the default) or
    /// overlay (file copy-on-write with overlayfs); chosen when the storage is first created
    #[arg(long = "storage-driver", global = true, value_name = "DRIVER")]
    pub storage_driver: Option<String>,

    /// More diagnostics on stderr: -v info, -vv debug, -vvv trace (RUST_LOG overrides)
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Download an image from a registry
    #[command(after_help = "Example: thinbox pull 127.0.0.1:5000/test/busybox:base")]
    Pull(pull::Args),
    /// List images
    #[command(after_help = "Example: thinbox images --format '{{.Repository}}:{{.Tag}}'")]
    Images(images::Args),
    /// Remove one or more images (and the thin devices of layers no image uses any more)
    #[command(after_help = "Example: thinbox rmi 127.0.0.1:5000/test/busybox:base")]
    Rmi(rmi::Args),
    /// Show containers' or images' details as JSON, in Docker's shape
    #[command(after_help = "Example: thinbox inspect --format '{{.Id}}' busybox")]
    Inspect(inspect::Args),
    /// Show the storage driver's state: pool, base device, space
    #[command(after_help = "Example: thinbox info --format json")]
    Info(info::Args),
    /// Store credentials for a registry
    #[command(after_help = "Example: thinbox login -u alice --password-stdin 127.0.0.1:5000")]
    Login(login::LoginArgs),
    /// Forget the credentials of a registry
    #[command(after_help = "Example: thinbox logout 127.0.0.1:5000")]
    Logout(login::LogoutArgs),
    /// Create a container (a writable snapshot of the image's top layer) without starting it
    #[command(after_help = "Example: thinbox create --name web busybox sleep 100")]
    Create(run::CreateArgs),
    /// Create and run a container
    #[command(after_help = "Example: thinbox run --rm busybox sh -c 'echo hi'")]
    Run(run::RunArgs),
    /// List containers
    #[command(after_help = "Example: thinbox ps -a")]
    Ps(ps::Args),
    /// Start stopped containers
    #[command(after_help = "Example: thinbox start -a web")]
    Start(start::Args),
    /// Stop running containers (SIGTERM, then SIGKILL)
    #[command(after_help = "Example: thinbox stop -t 2 web")]
    Stop(stop::Args),
    /// Send a signal to running containers
    #[command(after_help = "Example: thinbox kill -s TERM web")]
    Kill(kill::Args),
    /// Remove containers (their thins return their space to the pool)
    #[command(after_help = "Example: thinbox rm -f web")]
    Rm(rm::Args),
    /// Show a container's output
    #[command(after_help = "Example: thinbox logs -f web")]
    Logs(logs::Args),
    /// Run a command in a running container
    #[command(after_help = "Example: thinbox exec web cat /etc/hostname")]
    Exec(exec::Args),
    /// Show a container's changes against its image (A added, C changed, D deleted)
    #[command(after_help = "Example: thinbox diff web")]
    Diff(diff::Args),
    /// Create a new image from a container's changes
    #[command(
        after_help = "Examples:\n  thinbox commit -c 'CMD [\"cat\", \"/hello\"]' -m 'add hello' web hello:v1\n  \
                            thinbox commit -p=false --author 'Jane <jane@example.com>' web"
    )]
    Commit(crate::commands::commit::Args),
    /// A detached container's supervisor (started by run -d and start)
    #[command(hide = true)]
    ContainerShim(start::ShimArgs),
    /// The pool daemon (started on demand; `stop` ends it)
    #[command(hide = true, subcommand)]
    PoolDaemon(daemon::Command),
    /// Upload an image to a registry
    #[command(after_help = "Example: thinbox push 127.0.0.1:5000/test/busybox:base")]
    Push(crate::commands::push::Args),
    /// Give an image another name
    #[command(after_help = "Example: thinbox tag busybox 127.0.0.1:5000/test/busybox:v1")]
    Tag(crate::commands::tag::Args),
    /// Show the history of an image
    #[command(after_help = "Example: thinbox history busybox")]
    History(crate::commands::history::Args),
    /// Write images to a tar archive (Docker's and the OCI layout), stdout by default
    #[command(after_help = "Example: thinbox save -o busybox.tar.gz busybox")]
    Save(crate::commands::save::Args),
    /// Load images from an archive or OCI layout, stdin by default
    #[command(after_help = "Example: thinbox load -i busybox.tar")]
    Load(crate::commands::load::Args),
    /// Manage thinbox (`system df`: disk usage; `system prune`: remove what nothing uses)
    #[command(subcommand)]
    System(crate::commands::system_df::Command),
    /// Manage images (`image ls`, `image rm`, `image prune`)
    #[command(subcommand)]
    Image(crate::commands::prune::ImageCommand),
    /// Manage containers (`container ls`, `container rm`, `container prune`)
    #[command(subcommand)]
    Container(crate::commands::prune::ContainerCommand),
}
