//! `thin write` and `thin read`: stream bytes into and out of a thin, 1 MiB at a time,
//! never past the thin's size (from the volume store). `thin import` and `thin export`:
//! image files, holes kept (see `engine::image`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use engine::units::format_size;
use engine::ThinId;

use engine::activate::PoolControl;

use super::{control, Access};
use crate::cli::{parse_bytes, parse_thin_id, PoolLocation};
use crate::progress::{self, Unit};

/// Bytes moved per read or write.
const CHUNK: usize = 1 << 20;

#[derive(Debug, clap::Args)]
pub struct WriteArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Thin id
    #[arg(value_parser = parse_thin_id)]
    pub id: ThinId,

    /// Byte offset in the thin to start at (k, M, G, T suffixes)
    #[arg(long, value_name = "BYTES", default_value = "0", value_parser = parse_bytes)]
    pub offset: u64,

    /// Read from FILE instead of stdin
    #[arg(short, long, value_name = "FILE")]
    pub input: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Thin id
    #[arg(value_parser = parse_thin_id)]
    pub id: ThinId,

    /// Byte offset in the thin to start at (k, M, G, T suffixes)
    #[arg(long, value_name = "BYTES", default_value = "0", value_parser = parse_bytes)]
    pub offset: u64,

    /// Bytes to read [default: up to the end of the thin]
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub length: Option<u64>,
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn fill(input: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

pub fn write(args: WriteArgs) -> anyhow::Result<ExitCode> {
    let (mut input, input_name, input_len): (Box<dyn Read>, String, Option<u64>) = match &args.input
    {
        Some(path) => {
            let file = File::open(path)
                .with_context(|| format!("failed to open input {}", path.display()))?;
            let len = file
                .metadata()
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len());
            (Box::new(file), path.display().to_string(), len)
        }
        None => (Box::new(io::stdin().lock()), "stdin".into(), None),
    };
    let mut pool = control(&args.loc, Access::Change)?;
    let what = format!("thin {} in pool {}", args.id, args.loc.name());
    let (size, room) = size_and_room(pool.as_mut(), args.id, args.offset, &what, "write")?;
    if let Some(len) = input_len.filter(|&len| len > room) {
        bail!(
            "{input_name} ({len} bytes) does not fit in {what} ({}) from offset {}",
            format_size(size),
            args.offset
        );
    }
    let mut buf = vec![0u8; CHUNK];
    let mut pos = args.offset;
    loop {
        let n =
            fill(&mut input, &mut buf).with_context(|| format!("failed to read {input_name}"))?;
        if n == 0 {
            break;
        }
        if n as u64 > size - pos {
            // What came before stays written (the pool commits it when it is closed).
            bail!(
                "{input_name} does not fit in {what} ({}) from offset {}: stopped at byte {pos} \
                 after writing {} bytes",
                format_size(size),
                args.offset,
                pos - args.offset
            );
        }
        pool.write(args.id, pos, &buf[..n])
            .with_context(|| format!("failed to write {what} at byte {pos}"))?;
        pos += n as u64;
    }
    pool.flush()
        .with_context(|| format!("failed to flush {what}"))?;
    tracing::info!(bytes = pos - args.offset, thin_id = %args.id, "written");
    Ok(ExitCode::SUCCESS)
}

pub fn read(args: ReadArgs) -> anyhow::Result<ExitCode> {
    let mut pool = control(&args.loc, Access::Look)?;
    let what = format!("thin {} in pool {}", args.id, args.loc.name());
    let (size, room) = size_and_room(pool.as_mut(), args.id, args.offset, &what, "read")?;
    let length = args.length.unwrap_or(room);
    if length > room {
        bail!(
            "{length} bytes from offset {} go past the end of {what} ({})",
            args.offset,
            format_size(size)
        );
    }
    let mut out = io::stdout().lock();
    let mut buf = vec![0u8; CHUNK];
    let end = args.offset + length;
    let mut pos = args.offset;
    while pos < end {
        let n = CHUNK.min((end - pos) as usize);
        pool.read(args.id, pos, &mut buf[..n])
            .with_context(|| format!("failed to read {what} at byte {pos}"))?;
        out.write_all(&buf[..n])
            .context("failed to write to stdout")?;
        pos += n as u64;
    }
    out.flush().context("failed to write to stdout")?;
    Ok(ExitCode::SUCCESS)
}

/// The thin's size and the bytes from `offset` to its end (an offset past the end is an
/// error naming both).
fn size_and_room(
    pool: &mut dyn PoolControl,
    id: engine::ThinId,
    offset: u64,
    what: &str,
    verb: &str,
) -> anyhow::Result<(u64, u64)> {
    let size = pool
        .size_of(id)
        .with_context(|| format!("failed to {verb} {what}"))?;
    let room = size.checked_sub(offset).with_context(|| {
        format!(
            "offset {offset} is past the end of {what} ({})",
            format_size(size)
        )
    })?;
    Ok((size, room))
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Thin id
    #[arg(value_parser = parse_thin_id)]
    pub id: ThinId,

    /// Raw or sparse image file to copy in (from the thin's byte 0)
    #[arg(short, long, value_name = "FILE")]
    pub input: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Thin id
    #[arg(value_parser = parse_thin_id)]
    pub id: ThinId,

    /// Image file to write (created or truncated; it gets the thin's size)
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
}

pub fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    let file = File::open(&args.input)
        .with_context(|| format!("failed to open image {}", args.input.display()))?;
    let mut pool = control(&args.loc, Access::Change)?;
    let what = format!("thin {} in pool {}", args.id, args.loc.name());
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = progress::bar(len, "importing", Unit::Bytes);
    let report = engine::image::import(pool.as_mut(), args.id, &file, &mut |done, _| {
        bar.set_position(done)
    });
    bar.finish_and_clear();
    let report =
        report.with_context(|| format!("failed to import {} into {what}", args.input.display()))?;
    tracing::info!(
        bytes = report.bytes,
        written = report.written,
        holes = report.holes,
        "imported"
    );
    Ok(ExitCode::SUCCESS)
}

pub fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let mut pool = control(&args.loc, Access::Look)?;
    let what = format!("thin {} in pool {}", args.id, args.loc.name());
    let size = pool
        .size_of(args.id)
        .with_context(|| format!("failed to export {what}"))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&args.output)
        .with_context(|| format!("failed to create image {}", args.output.display()))?;
    let bar = progress::bar(size, "exporting", Unit::Bytes);
    let report = engine::image::export(pool.as_mut(), args.id, &file, &mut |done, _| {
        bar.set_position(done)
    });
    bar.finish_and_clear();
    let report =
        report.with_context(|| format!("failed to export {what} to {}", args.output.display()))?;
    tracing::info!(
        bytes = report.bytes,
        written = report.written,
        holes = report.holes,
        "exported"
    );
    Ok(ExitCode::SUCCESS)
}
