//! `delta`: how two thin devices' mappings differ, as `thin_delta` 0.9.0 computes it.
//!
//! Each device's mappings are first gathered into runs of consecutive virtual blocks mapped
//! to consecutive data blocks (the blocks' times are ignored). The two run lists are then
//! merged in virtual block order into pieces: blocks only the left device maps, only the
//! right one maps, both map to the same data block, or both map to different data blocks.
//! A piece ends wherever either side's run ends, so one run can give several pieces; the
//! formatter decides whether to join them.

use crate::block::read_u64;
use crate::error::Error;
use crate::io::BlockDevice;
use crate::thin::metadata::{BlockTime, Superblock};

use super::walk::{MetadataRoot, Reader, TreeKind};

/// Which of the two devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// `--thin1`/`--snap1`.
    Left,
    /// `--thin2`/`--snap2`.
    Right,
}

/// Why a delta failed.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// The device is not in the top-level mapping tree.
    #[error("thin device {thin_id} is not in the metadata")]
    NoSuchThin { side: Side, thin_id: u64 },
    /// The metadata cannot be read or is damaged; `NoMetadataSnap` when a held snapshot was
    /// asked for and none is held.
    #[error(transparent)]
    Metadata(#[from] Error),
}

/// One piece of the difference, over `len` virtual blocks from `vblock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Only the left device maps these blocks.
    LeftOnly { vblock: u64, data: u64, len: u64 },
    /// Only the right device maps these blocks.
    RightOnly { vblock: u64, data: u64, len: u64 },
    /// Both map them, to the same data blocks.
    Same { vblock: u64, data: u64, len: u64 },
    /// Both map them, to different data blocks.
    Different {
        vblock: u64,
        left_data: u64,
        right_data: u64,
        len: u64,
    },
}

/// What [`delta`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    /// The superblock whose trees were read (the held copy for a metadata snapshot).
    pub superblock: Superblock,
    /// Where that superblock is: 0 for the live one, else the held snapshot's block.
    pub superblock_location: u64,
    /// The differences, in virtual block order.
    pub pieces: Vec<Piece>,
}

/// A run of mappings: `len` virtual blocks from `vblock` onto data blocks from `data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    vblock: u64,
    data: u64,
    len: u64,
}

impl Run {
    fn take(&mut self, n: u64) {
        // Wraps only when the run ends at the last key, and then nothing is left to read.
        self.vblock = self.vblock.wrapping_add(n);
        self.data += n;
        self.len -= n;
    }
}

/// Compares the mappings of `left` and `right` in the trees under `root`.
///
/// * `Err(NoSuchThin)`: either device is not in the mapping tree (the left one is looked up
///   first);
/// * `Err(Metadata)`: as for [`super::dump::dump`]. Never a panic on damaged input.
pub fn delta(
    dev: &dyn BlockDevice,
    root: MetadataRoot,
    left: u64,
    right: u64,
) -> Result<Delta, DeltaError> {
    let mut reader = Reader::new(dev);
    let (sb, sb_loc) = reader.chosen_superblock(root)?;
    let roots = reader.mapping_roots(sb_loc, &sb)?;
    let find = |side, thin_id| {
        roots
            .get(&thin_id)
            .copied()
            .ok_or(DeltaError::NoSuchThin { side, thin_id })
    };
    let (l, r) = (find(Side::Left, left)?, find(Side::Right, right)?);
    let left_runs = runs(&mut reader, l)?;
    let right_runs = runs(&mut reader, r)?;
    Ok(Delta {
        superblock: sb,
        superblock_location: sb_loc,
        pieces: diff(&left_runs, &right_runs),
    })
}

/// The runs of the mapping tree at `root` (pointed at by top-level leaf `leaf`).
fn runs(reader: &mut Reader<'_>, (leaf, root): (u64, u64)) -> Result<Vec<Run>, Error> {
    let mut runs: Vec<Run> = Vec::new();
    reader.walk(leaf, root, TreeKind::Mapping, None, &mut |_, vblock, v| {
        let data = BlockTime::decode(read_u64(v, 0)).block;
        match runs.last_mut() {
            Some(r) if r.vblock.checked_add(r.len) == Some(vblock) && r.data + r.len == data => {
                r.len += 1
            }
            _ => runs.push(Run {
                vblock,
                data,
                len: 1,
            }),
        }
        Ok::<(), Error>(())
    })?;
    Ok(runs)
}

/// Merges two run lists (each in virtual block order, not overlapping) into pieces.
fn diff(left: &[Run], right: &[Run]) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let (mut li, mut ri) = (left.iter().copied(), right.iter().copied());
    let (mut l, mut r) = (li.next(), ri.next());
    while let (Some(a), Some(b)) = (l.as_mut(), r.as_mut()) {
        if a.vblock < b.vblock {
            let n = a.len.min(b.vblock - a.vblock);
            pieces.push(Piece::LeftOnly {
                vblock: a.vblock,
                data: a.data,
                len: n,
            });
            a.take(n);
        } else if b.vblock < a.vblock {
            let n = b.len.min(a.vblock - b.vblock);
            pieces.push(Piece::RightOnly {
                vblock: b.vblock,
                data: b.data,
                len: n,
            });
            b.take(n);
        } else {
            let n = a.len.min(b.len);
            pieces.push(if a.data == b.data {
                Piece::Same {
                    vblock: a.vblock,
                    data: a.data,
                    len: n,
                }
            } else {
                Piece::Different {
                    vblock: a.vblock,
                    left_data: a.data,
                    right_data: b.data,
                    len: n,
                }
            });
            a.take(n);
            b.take(n);
        }
        if a.len == 0 {
            l = li.next();
        }
        if r.is_some_and(|b| b.len == 0) {
            r = ri.next();
        }
    }
    for a in l.into_iter().chain(li) {
        pieces.push(Piece::LeftOnly {
            vblock: a.vblock,
            data: a.data,
            len: a.len,
        });
    }
    for b in r.into_iter().chain(ri) {
        pieces.push(Piece::RightOnly {
            vblock: b.vblock,
            data: b.data,
            len: b.len,
        });
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(vblock: u64, data: u64, len: u64) -> Run {
        Run { vblock, data, len }
    }

    #[test]
    fn a_longer_left_run_ends_as_left_only() {
        let p = diff(&[run(0, 0, 10)], &[run(0, 0, 5)]);
        assert_eq!(
            p,
            [
                Piece::Same {
                    vblock: 0,
                    data: 0,
                    len: 5
                },
                Piece::LeftOnly {
                    vblock: 5,
                    data: 5,
                    len: 5
                }
            ]
        );
    }

    #[test]
    fn pieces_follow_virtual_block_order() {
        let p = diff(&[run(0, 0, 5), run(20, 100, 5)], &[run(0, 0, 10)]);
        assert_eq!(p.len(), 3);
        assert!(matches!(
            p[1],
            Piece::RightOnly {
                vblock: 5,
                len: 5,
                ..
            }
        ));
        assert!(matches!(
            p[2],
            Piece::LeftOnly {
                vblock: 20,
                data: 100,
                len: 5
            }
        ));
        let q = diff(&[run(3, 7, 4)], &[run(0, 50, 2), run(3, 9, 1)]);
        assert!(matches!(
            q[0],
            Piece::RightOnly {
                vblock: 0,
                len: 2,
                ..
            }
        ));
        assert!(matches!(
            q[1],
            Piece::Different {
                vblock: 3,
                left_data: 7,
                right_data: 9,
                len: 1
            }
        ));
        assert!(matches!(
            q[2],
            Piece::LeftOnly {
                vblock: 4,
                data: 8,
                len: 3
            }
        ));
        assert!(diff(&[], &[]).is_empty());
    }
}
