//! The `dirty` workload's invariant.
//!
//! Each vCPU adds one to the first byte of every page of its share, first page to last,
//! over and over (a `u8`, so 255 wraps to 0). At any instant, then, the pages of one share
//! hold a single value, except that the pages the writer has not reached yet in its
//! current pass hold one less: reading the share in order there is at most one place
//! where the counter steps down by one (mod 256). A lost dirty page shows up as any other
//! difference. This is the check of QEMU's migration tests, one share at a time.

use core::fmt;

/// A share whose counters are consistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyCounters {
    /// Pages read.
    pub pages: u64,
    /// The counter of the first page (the pages the writer has already passed).
    pub value: u8,
    /// Index of the first page holding `value - 1`: where the writer was. `None` when
    /// every page holds `value`.
    pub edge: Option<u64>,
}

/// Why a share's counters are not consistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyError {
    /// The iterator was empty.
    Empty,
    /// Page `index` holds `found`; only `expected` (or, before the writer's position has
    /// been seen, `expected - 1`) was allowed.
    Mismatch {
        index: u64,
        expected: u8,
        found: u8,
        /// Where the writer's step down was seen already, if it was.
        edge: Option<u64>,
    },
}

impl fmt::Display for DirtyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DirtyError::Empty => write!(f, "no pages to check"),
            DirtyError::Mismatch {
                index,
                expected,
                found,
                edge: Some(edge),
            } => write!(
                f,
                "page {index} has counter {found}, expected {expected} \
                 (the writer's position was already seen at page {edge})"
            ),
            DirtyError::Mismatch {
                index,
                expected,
                found,
                edge: None,
            } => write!(
                f,
                "page {index} has counter {found}, expected {expected} or {}",
                expected.wrapping_sub(1)
            ),
        }
    }
}

/// Checks the first bytes of one vCPU's share of the `dirty` workload region, in page
/// order (see [`crate::share`]): all equal, except one step down by one (mod 256) where
/// the writer was.
pub fn check_dirty_counters(
    pages: impl IntoIterator<Item = u8>,
) -> Result<DirtyCounters, DirtyError> {
    let mut it = pages.into_iter();
    let value = it.next().ok_or(DirtyError::Empty)?;
    let mut current = value;
    let mut edge = None;
    let mut n = 1u64;
    for found in it {
        if found != current {
            if edge.is_none() && found == current.wrapping_sub(1) {
                edge = Some(n);
                current = found;
            } else {
                return Err(DirtyError::Mismatch {
                    index: n,
                    expected: current,
                    found,
                    edge,
                });
            }
        }
        n += 1;
    }
    Ok(DirtyCounters {
        pages: n,
        value,
        edge,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;
    use std::vec;

    #[test]
    fn all_equal_is_fine() {
        assert_eq!(
            check_dirty_counters(vec![5u8; 100]),
            Ok(DirtyCounters {
                pages: 100,
                value: 5,
                edge: None
            })
        );
    }

    #[test]
    fn one_step_down_is_the_writer() {
        let mut v = vec![9u8; 10];
        v[4..].fill(8);
        assert_eq!(
            check_dirty_counters(v),
            Ok(DirtyCounters {
                pages: 10,
                value: 9,
                edge: Some(4)
            })
        );
    }

    #[test]
    fn step_down_wraps_around() {
        let mut v = vec![0u8; 6];
        v[3..].fill(255);
        assert_eq!(check_dirty_counters(v).unwrap().edge, Some(3));
    }

    #[test]
    fn a_lost_page_is_caught() {
        // Page 6 missed an increment: a second step down.
        let mut v = vec![3u8; 10];
        v[2..].fill(2);
        v[6] = 1;
        let e = check_dirty_counters(v).unwrap_err();
        assert_eq!(
            e,
            DirtyError::Mismatch {
                index: 6,
                expected: 2,
                found: 1,
                edge: Some(2)
            }
        );
        assert!(e.to_string().contains("page 6 has counter 1"), "{e}");
        // A page ahead of the others, a step up, or a jump of two.
        for bad in [[4u8, 4, 5, 4], [4, 5, 5, 5], [4, 4, 2, 2]] {
            assert!(check_dirty_counters(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn empty_share_is_an_error() {
        assert_eq!(check_dirty_counters([]), Err(DirtyError::Empty));
    }
}
