//! Progress bars for long operations: drawn on stderr when it is a terminal, hidden in
//! scripts (and in tests), so output stays parseable.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// What a bar counts.
pub enum Unit {
    Bytes,
    Blocks,
}

/// A bar of `len` units labelled `what`; hidden unless stderr is a terminal.
pub fn bar(len: u64, what: &str, unit: Unit) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let template = match unit {
        Unit::Bytes => "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        Unit::Blocks => "{msg} [{bar:40}] {pos}/{len} blocks eta {eta}",
    };
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}
