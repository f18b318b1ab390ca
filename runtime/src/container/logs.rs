//! Docker's json-file log: one JSON object per line, `{"log":"…\n","stream":"stdout",
//! "time":"RFC 3339 with nanoseconds"}`, a line of output per entry (a partial last line is
//! written when its stream ends; lines over 16 KiB are split, as Docker splits them).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Docker splits longer lines into several entries.
const MAX_ENTRY: usize = 16 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub log: String,
    pub stream: String,
    pub time: String,
}

/// Appends entries to a log file.
pub struct LogWriter {
    file: File,
}

impl LogWriter {
    pub fn open(path: &Path) -> anyhow::Result<LogWriter> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("failed to open the log {}", path.display()))?;
        Ok(LogWriter { file })
    }

    pub fn write(&mut self, stream: &str, text: &[u8]) -> std::io::Result<()> {
        let entry = Entry {
            log: String::from_utf8_lossy(text).into_owned(),
            stream: stream.to_string(),
            time: super::now_rfc3339(),
        };
        let mut line = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)
    }
}

/// Cuts a byte stream into log entries: whole lines, or 16 KiB pieces of longer ones.
#[derive(Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feeds `data`; returns the complete entries it finished.
    pub fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        self.pending.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            match self.pending.iter().position(|&b| b == b'\n') {
                Some(i) if i < MAX_ENTRY => {
                    out.push(self.pending.drain(..=i).collect());
                }
                _ if self.pending.len() >= MAX_ENTRY => {
                    out.push(self.pending.drain(..MAX_ENTRY).collect());
                }
                _ => return out,
            }
        }
    }

    /// The partial last line, if any.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        (!self.pending.is_empty()).then(|| std::mem::take(&mut self.pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    fn read_all(path: &Path) -> Vec<Entry> {
        BufReader::new(File::open(path).unwrap())
            .lines()
            .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn lines_are_split_and_partials_kept() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"a\nb"), vec![b"a\n".to_vec()]);
        assert_eq!(s.push(b"c\nd\n"), vec![b"bc\n".to_vec(), b"d\n".to_vec()]);
        assert_eq!(s.push(b"tail"), Vec::<Vec<u8>>::new());
        assert_eq!(s.finish(), Some(b"tail".to_vec()));
        assert_eq!(s.finish(), None);
        let long = vec![b'x'; MAX_ENTRY + 10];
        let out = s.push(&long);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), MAX_ENTRY);
    }

    #[test]
    fn entries_round_trip_in_dockers_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c-json.log");
        let mut w = LogWriter::open(&path).unwrap();
        w.write("stdout", b"hello\n").unwrap();
        w.write("stderr", b"oops\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["log"], "hello\n");
        assert_eq!(first["stream"], "stdout");
        assert!(first["time"].as_str().unwrap().ends_with('Z'));
        let all = read_all(&path);
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].stream, "stderr");
    }
}
