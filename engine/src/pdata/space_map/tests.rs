use super::*;

#[test]
fn bit_order_matches_the_disk_format() {
    // From the two-devs fixture: word 0 = 0x555555556AA55555 means entries 0-9 count 2,
    // 10-14 count 1, 15-31 count 2.
    let mut words = Box::new([0u64; WORDS_PER_BITMAP]);
    words[0] = 0x5555_5555_6AA5_5555;
    let bm = Bitmap::from_words(words);
    for e in 0..32 {
        let expected = if (10..15).contains(&e) { 1 } else { 2 };
        assert_eq!(bm.get(e), expected, "entry {e}");
    }
    let mut rebuilt = Bitmap::empty();
    for e in 0..32 {
        rebuilt.set(e, bm.get(e));
    }
    assert_eq!(rebuilt.words[0], 0x5555_5555_6AA5_5555);
}

#[test]
fn counts_overflow_past_two() {
    let mut sm = SpaceMap::new(40_000);
    for _ in 0..5 {
        sm.inc(16_321).unwrap();
    }
    assert_eq!(sm.count(16_321).unwrap(), 5);
    assert_eq!(sm.overflow().get(&16_321), Some(&5));
    for expected in (0..5).rev() {
        assert_eq!(sm.dec(16_321).unwrap(), expected);
    }
    assert!(sm.overflow().is_empty());
    assert_eq!(sm.dec(16_321), Err(CountError::Underflow(16_321)));
    assert_eq!(sm.inc(40_000), Err(CountError::OutOfRange(40_000)));
    assert_eq!(sm.nr_allocated(), 0);
}

#[test]
fn a_count_at_its_largest_is_an_error_not_a_wrap_to_free() {
    // A damaged reference-count tree can say u32::MAX; one more reference must not wrap the
    // block to 0 (free, then handed out again while still in use).
    let mut sm = SpaceMap::new(100);
    sm.set(7, u32::MAX).unwrap();
    assert_eq!(sm.inc(7), Err(CountError::Overflow(7)));
    assert_eq!(sm.count(7).unwrap(), u32::MAX);
}

#[test]
fn blocks_freed_in_a_transaction_are_not_reused_before_commit() {
    let mut sm = SpaceMap::new(10);
    let a = sm.alloc().unwrap();
    sm.commit();
    sm.dec(a).unwrap();
    let mut got = vec![];
    while let Some(b) = sm.alloc() {
        got.push(b);
    }
    assert_eq!(got.len(), 9);
    assert!(!got.contains(&a));
    sm.commit();
    for b in got {
        sm.dec(b).unwrap();
    }
    sm.commit();
    assert_eq!(sm.nr_allocated(), 0);
    assert!(sm.alloc().is_some());
}

#[test]
fn allocation_spans_bitmaps_and_respects_the_end() {
    let mut sm = SpaceMap::new(ENTRIES_PER_BITMAP + 3);
    for _ in 0..ENTRIES_PER_BITMAP + 3 {
        assert!(sm.alloc().is_some());
    }
    assert_eq!(sm.alloc(), None);
    assert_eq!(sm.nr_free(), 0);
    sm.extend(ENTRIES_PER_BITMAP * 3);
    assert_eq!(sm.alloc(), Some(ENTRIES_PER_BITMAP + 3));
    assert_eq!(sm.nr_bitmaps(), 3);
}

#[test]
fn rollback_restores_the_committed_counts() {
    let mut sm = SpaceMap::new(100);
    sm.set(5, 4).unwrap();
    sm.commit();
    sm.set(5, 1).unwrap();
    sm.alloc().unwrap();
    assert!(sm.bitmap_dirty(0));
    sm.rollback();
    assert_eq!(sm.count(5).unwrap(), 4);
    assert_eq!(sm.nr_allocated(), 1);
    assert!(!sm.bitmap_dirty(0));
}

#[test]
fn iter_counts_lists_every_nonzero_count() {
    let mut sm = SpaceMap::new(50_000);
    sm.set(0, 1).unwrap();
    sm.set(16_320, 2).unwrap();
    sm.set(49_999, 7).unwrap();
    assert_eq!(
        sm.iter_counts().collect::<Vec<_>>(),
        vec![(0, 1), (16_320, 2), (49_999, 7)]
    );
}

#[test]
fn first_free_is_exact() {
    let mut sm = SpaceMap::new(100);
    for _ in 0..40 {
        sm.alloc();
    }
    assert_eq!(sm.bitmap(0).first_free(), 40);
}

/// `end_of_lowest_free` against counting block by block, over several bitmaps, with blocks
/// freed in the running transaction (free in the current map only) and a partial last bitmap.
#[test]
fn end_of_lowest_free_counts_blocks_free_in_both_maps() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
    for round in 0..20 {
        let nr_blocks = 3 * ENTRIES_PER_BITMAP + rng.gen_range(0..ENTRIES_PER_BITMAP);
        let mut sm = SpaceMap::new(nr_blocks);
        let full_bitmap = rng.gen_range(0..3) as u64;
        for b in 0..nr_blocks {
            let dense = b / ENTRIES_PER_BITMAP == full_bitmap;
            if dense || rng.gen_bool(0.3) {
                sm.set(b, 1).unwrap();
            }
        }
        sm.commit();
        // Some frees (still taken in the committed map) and new allocations.
        for _ in 0..rng.gen_range(0..200) {
            let b = rng.gen_range(0..nr_blocks);
            if sm.count(b).unwrap() > 0 {
                sm.set(b, 0).unwrap();
            } else {
                sm.set(b, 1).unwrap();
            }
        }
        let free: Vec<u64> = (0..nr_blocks)
            .filter(|&b| sm.count(b).unwrap() == 0 && sm.committed_count(b) == 0)
            .collect();
        for n in [
            0,
            1,
            2,
            17,
            1000,
            20_000,
            free.len() as u64,
            free.len() as u64 + 1,
        ] {
            let expected = match n {
                0 => 0,
                n if n as usize > free.len() => nr_blocks,
                n => free[n as usize - 1] + 1,
            };
            assert_eq!(sm.end_of_lowest_free(n), expected, "round {round}, n {n}");
        }
        let from = rng.gen_range(0..nr_blocks);
        assert_eq!(
            sm.next_free(from),
            free.iter().copied().find(|&b| b >= from)
        );
    }
}
