//! `rmap`: which thin devices map given data blocks, as `thin_rmap` 0.9.0 reports it.
//!
//! The top-level mapping tree is walked in device order and each device's mapping tree in
//! virtual block order; mappings whose data block lies in any of the regions are gathered
//! into runs (consecutive data blocks of one device at consecutive virtual blocks). A mapping
//! subtree shared by snapshots is reported once, under the first device that reaches it:
//! `thin_rmap` walks the whole two-level tree visiting each node once. The runs are then
//! ordered by their first data block with the same unstable sort `thin_rmap` uses (the
//! introsort of GNU libstdc++'s `std::sort`), so runs starting at the same data block come
//! out in the order it prints them.

use std::collections::HashSet;
use std::ops::Range;

use crate::block::read_u64;
use crate::error::Error;
use crate::io::BlockDevice;
use crate::thin::metadata::BlockTime;

use super::walk::{MetadataRoot, Reader, TreeKind};

/// Data blocks `data` mapped by `thin_id` at virtual blocks from `vblock`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RmapRun {
    /// First data block and one past the last.
    pub data: Range<u64>,
    /// The device mapping them.
    pub thin_id: u64,
    /// The virtual block mapped to `data.start`.
    pub vblock: u64,
}

impl RmapRun {
    /// The virtual blocks mapped to `data`.
    pub fn vblocks(&self) -> Range<u64> {
        self.vblock..self.vblock.saturating_add(self.data.end - self.data.start)
    }
}

/// Finds every mapping of a data block in `regions` (half-open ranges; they may overlap) in
/// the live trees of `dev`.
///
/// `Err(Corrupt | Io)`: the trees cannot be read. Never a panic on damaged input.
pub fn rmap(dev: &dyn BlockDevice, regions: &[Range<u64>]) -> Result<Vec<RmapRun>, Error> {
    let mut reader = Reader::new(dev);
    let (sb, sb_loc) = reader.chosen_superblock(MetadataRoot::Live)?;
    let roots = reader.mapping_roots(sb_loc, &sb)?;
    let mut seen = HashSet::new();
    let mut runs: Vec<RmapRun> = Vec::new();
    for (&thin_id, &(leaf, root)) in &roots {
        reader.walk(
            leaf,
            root,
            TreeKind::Mapping,
            Some(&mut seen),
            &mut |_, vblock, v| {
                let data = BlockTime::decode(read_u64(v, 0)).block;
                if !regions.iter().any(|r| r.contains(&data)) {
                    return Ok::<(), Error>(());
                }
                match runs.last_mut() {
                    Some(r)
                        if r.thin_id == thin_id
                            && r.data.end == data
                            && r.vblock.checked_add(r.data.end - r.data.start) == Some(vblock) =>
                    {
                        r.data.end += 1
                    }
                    _ => runs.push(RmapRun {
                        data: data..data + 1,
                        thin_id,
                        vblock,
                    }),
                }
                Ok(())
            },
        )?;
    }
    libstdcxx_sort(&mut runs, |a, b| a.data.start < b.data.start);
    Ok(runs)
}

/// Below this many elements libstdc++'s introsort leaves a range to the insertion sort.
const THRESHOLD: usize = 16;

/// Sorts `v` exactly as GNU libstdc++'s `std::sort` does with the comparison `less`: the
/// same element moves, so equal elements end in the same (unstable) order. An introsort:
/// median-of-three quicksort down to ranges of 16, heapsort past a depth of 2·log2(n), then
/// one insertion sort over everything.
fn libstdcxx_sort<T: Clone>(v: &mut [T], less: impl Fn(&T, &T) -> bool + Copy) {
    let n = v.len();
    if n < 2 {
        return;
    }
    let depth = 2 * (usize::BITS - 1 - n.leading_zeros()) as usize;
    introsort_loop(v, depth, less);
    final_insertion_sort(v, less);
}

fn introsort_loop<T: Clone>(v: &mut [T], mut depth: usize, less: impl Fn(&T, &T) -> bool + Copy) {
    let mut len = v.len();
    while len > THRESHOLD {
        if depth == 0 {
            heap_sort(&mut v[..len], less);
            return;
        }
        depth -= 1;
        let cut = partition_pivot(&mut v[..len], less);
        introsort_loop(&mut v[cut..len], depth, less);
        len = cut;
    }
}

/// Moves the median of elements 1, mid and last to the front and partitions the rest around
/// it; returns where the right part starts.
fn partition_pivot<T: Clone>(v: &mut [T], less: impl Fn(&T, &T) -> bool) -> usize {
    let (len, mid) = (v.len(), v.len() / 2);
    let (a, b, c) = (1, mid, len - 1);
    let median = if less(&v[a], &v[b]) {
        if less(&v[b], &v[c]) {
            b
        } else if less(&v[a], &v[c]) {
            c
        } else {
            a
        }
    } else if less(&v[a], &v[c]) {
        a
    } else if less(&v[b], &v[c]) {
        c
    } else {
        b
    };
    v.swap(0, median);
    // Hoare partition of v[1..] around v[0]; the sentinels on both sides keep it in bounds.
    let (mut first, mut last) = (1, len);
    loop {
        while less(&v[first], &v[0]) {
            first += 1;
        }
        last -= 1;
        while less(&v[0], &v[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        v.swap(first, last);
        first += 1;
    }
}

fn final_insertion_sort<T: Clone>(v: &mut [T], less: impl Fn(&T, &T) -> bool + Copy) {
    if v.len() > THRESHOLD {
        insertion_sort(&mut v[..THRESHOLD], less);
        for i in THRESHOLD..v.len() {
            linear_insert(v, i, less);
        }
    } else {
        insertion_sort(v, less);
    }
}

fn insertion_sort<T: Clone>(v: &mut [T], less: impl Fn(&T, &T) -> bool + Copy) {
    for i in 1..v.len() {
        if less(&v[i], &v[0]) {
            v[..=i].rotate_right(1);
        } else {
            linear_insert(v, i, less);
        }
    }
}

/// Moves `v[i]` left past every element greater than it (something to its left is not).
fn linear_insert<T: Clone>(v: &mut [T], mut i: usize, less: impl Fn(&T, &T) -> bool) {
    let value = v[i].clone();
    while less(&value, &v[i - 1]) {
        v[i] = v[i - 1].clone();
        i -= 1;
    }
    v[i] = value;
}

fn heap_sort<T: Clone>(v: &mut [T], less: impl Fn(&T, &T) -> bool + Copy) {
    let len = v.len();
    // make_heap
    if len >= 2 {
        let mut parent = (len - 2) / 2;
        loop {
            let value = v[parent].clone();
            adjust_heap(v, parent, len, value, less);
            if parent == 0 {
                break;
            }
            parent -= 1;
        }
    }
    // sort_heap: pop the largest to the end, one at a time.
    let mut end = len;
    while end > 1 {
        end -= 1;
        let value = v[end].clone();
        v[end] = v[0].clone();
        adjust_heap(&mut v[..end], 0, end, value, less);
    }
}

/// Sifts the hole at `hole` down to a leaf (always taking the larger child), then pushes
/// `value` up from there.
fn adjust_heap<T: Clone>(
    v: &mut [T],
    mut hole: usize,
    len: usize,
    value: T,
    less: impl Fn(&T, &T) -> bool,
) {
    let top = hole;
    let mut child = hole;
    while len > 0 && child < (len - 1) / 2 {
        child = 2 * (child + 1);
        if less(&v[child], &v[child - 1]) {
            child -= 1;
        }
        v[hole] = v[child].clone();
        hole = child;
    }
    if len >= 2 && len.is_multiple_of(2) && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        v[hole] = v[child - 1].clone();
        hole = child - 1;
    }
    // push_heap
    while hole > top {
        let parent = (hole - 1) / 2;
        if !less(&v[parent], &value) {
            break;
        }
        v[hole] = v[parent].clone();
        hole = parent;
    }
    v[hole] = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic shuffle source (xorshift).
    fn keys(n: usize, seed: u64, modulo: u64) -> Vec<(u64, usize)> {
        let mut x = seed | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % modulo, i)
            })
            .collect()
    }

    #[test]
    fn the_sort_orders_by_key_and_keeps_every_element() {
        for n in [0, 1, 2, 5, 16, 17, 40, 1000] {
            for modulo in [3, 1_000_000] {
                let mut v = keys(n, n as u64 + modulo, modulo);
                let mut want: Vec<_> = v.clone();
                libstdcxx_sort(&mut v, |a, b| a.0 < b.0);
                assert!(v.windows(2).all(|w| w[0].0 <= w[1].0), "n {n}");
                want.sort();
                let mut got = v.clone();
                got.sort();
                assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn the_heap_sort_fallback_sorts_too() {
        for n in [2, 3, 4, 7, 8, 33, 100] {
            let mut v = keys(n, 7, 10);
            heap_sort(&mut v, |a, b| a.0 < b.0);
            assert!(v.windows(2).all(|w| w[0].0 <= w[1].0), "n {n}: {v:?}");
        }
    }
}
