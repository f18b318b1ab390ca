//! dmtool under thin-provisioning-tools' names: invoked through a link named `thin_check`,
//! `thin_dump`, ... it runs the verb of that name with that tool's options, and the `links`
//! verb makes those links.
//!
//! [`TOOLS`] is the one place a name meets its verb.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

/// Each tool name and the dmtool verb it runs.
pub const TOOLS: [(&str, &str); 9] = [
    ("thin_check", "check"),
    ("thin_dump", "dump"),
    ("thin_restore", "restore"),
    ("thin_ls", "ls"),
    ("thin_delta", "delta"),
    ("thin_rmap", "rmap"),
    ("thin_metadata_size", "metadata-size"),
    ("thin_repair", "repair"),
    ("thin_trim", "trim"),
];

/// The command line to parse for `argv`: `thin_ls ARGS...` becomes `dmtool ls ARGS...`; any
/// other argv[0] is dmtool itself.
pub fn invocation(argv: Vec<OsString>) -> Vec<OsString> {
    let name = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("dmtool");
    let Some(&(_, verb)) = TOOLS.iter().find(|(t, _)| *t == name) else {
        return argv;
    };
    let mut args = vec![OsString::from("dmtool"), OsString::from(verb)];
    args.extend(argv.into_iter().skip(1));
    args
}

/// The name `metadata-size` reports itself by: the tool's when run through its link.
pub fn program_name() -> String {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let name = Path::new(&argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("dmtool");
    if TOOLS.iter().any(|(t, _)| *t == name) {
        name.to_string()
    } else {
        "dmtool metadata-size".to_string()
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to put the links in (it must exist)
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// Replace links (or files) that are already there
    #[arg(short, long)]
    pub force: bool,
}

/// Makes `DIR/thin_check` and the others symlinks to this executable. Each link made is
/// printed; a name already taken (without --force)
/// fails the run but not the other links.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("failed to find dmtool's own executable")?;
    let exe = exe.canonicalize().unwrap_or(exe);
    if !args.dir.is_dir() {
        anyhow::bail!("{} is not a directory", args.dir.display());
    }
    let mut failed = false;
    for (tool, _) in TOOLS {
        let link = args.dir.join(tool);
        if let Err(e) = make_link(&exe, &link, args.force) {
            eprintln!("dmtool: {e:#}");
            failed = true;
            continue;
        }
        println!("{}", link.display());
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn make_link(exe: &Path, link: &Path, force: bool) -> anyhow::Result<()> {
    if let Ok(meta) = link.symlink_metadata() {
        if std::fs::read_link(link).is_ok_and(|target| target == exe) {
            return Ok(());
        }
        if !force {
            anyhow::bail!(
                "{} already exists ({}); use --force to replace it",
                link.display(),
                if meta.file_type().is_symlink() {
                    "a link elsewhere"
                } else {
                    "not a link"
                }
            );
        }
        std::fs::remove_file(link)
            .with_context(|| format!("failed to remove {}", link.display()))?;
    }
    std::os::unix::fs::symlink(exe, link)
        .with_context(|| format!("failed to link {} to {}", link.display(), exe.display()))
}
