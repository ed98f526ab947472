// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! The bitmap a kernel dirty query fills (iommufd GET_DIRTY_BITMAP, type1 GET_BITMAP, device
//! DMA logging REPORT): bit `(a - iova) / page_size` of a `u64[]` stands for IOVA `a`.
//!
//! The kernel only ever **sets** bits, never clears the buffer (DESIGN rule 8). So a
//! [`DirtyBitmap`] is zeroed by [`DirtyBitmap::prepare`] before every call, and describes one
//! mapped range at a time; the buffer is reused across calls, which is exactly why the zeroing
//! matters.

use thiserror::Error;

/// A range the kernel would refuse, named by its values.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BitmapError {
    #[error("page size {0:#x} is not a power of two")]
    PageSize(u64),
    #[error("range iova {iova:#x} length {length:#x} is empty or not aligned to page size {page_size:#x}")]
    Unaligned {
        iova: u64,
        length: u64,
        page_size: u64,
    },
    #[error("range iova {iova:#x} length {length:#x} overflows the address space")]
    Overflow { iova: u64, length: u64 },
}

/// A zeroed, set-only bitmap for one IOVA range.
#[derive(Debug, Default, Clone)]
pub struct DirtyBitmap {
    iova: u64,
    length: u64,
    page_size: u64,
    words: Vec<u64>,
}

impl DirtyBitmap {
    /// Bytes of bitmap the kernel wants for `length` at `page_size`:
    /// `DIV_ROUND_UP(length / page_size, 64) * 8`.
    pub fn bytes_for(length: u64, page_size: u64) -> u64 {
        (length / page_size).div_ceil(64) * 8
    }

    /// Describe `[iova, iova + length)` at `page_size` and zero every bit: call before every
    /// kernel query.
    pub fn prepare(&mut self, iova: u64, length: u64, page_size: u64) -> Result<(), BitmapError> {
        let words = Self::check(iova, length, page_size)?;
        self.iova = iova;
        self.length = length;
        self.page_size = page_size;
        self.words.clear();
        self.words.resize(words, 0);
        Ok(())
    }

    /// Whether [`Self::prepare`] would take the range, without allocating anything (a
    /// guest's mapping may be of any size): the words its bitmap needs.
    pub fn check(iova: u64, length: u64, page_size: u64) -> Result<usize, BitmapError> {
        if page_size == 0 || !page_size.is_power_of_two() {
            return Err(BitmapError::PageSize(page_size));
        }
        if length == 0 || !iova.is_multiple_of(page_size) || !length.is_multiple_of(page_size) {
            return Err(BitmapError::Unaligned {
                iova,
                length,
                page_size,
            });
        }
        if iova.checked_add(length - 1).is_none() {
            return Err(BitmapError::Overflow { iova, length });
        }
        usize::try_from((length / page_size).div_ceil(64))
            .map_err(|_| BitmapError::Overflow { iova, length })
    }

    pub fn iova(&self) -> u64 {
        self.iova
    }

    pub fn length(&self) -> u64 {
        self.length
    }

    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The buffer handed to the kernel (its address goes in `data` / `bitmap`).
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// Set the bit of `iova`, as the kernel does (fakes use this); outside the range: ignored.
    pub fn set(&mut self, iova: u64) {
        if iova < self.iova || iova - self.iova >= self.length {
            return;
        }
        let bit = (iova - self.iova) / self.page_size;
        self.words[(bit / 64) as usize] |= 1 << (bit % 64);
    }

    /// Fill every bit of the range (a query that failed: the whole range is dirty).
    pub fn set_all(&mut self) {
        let pages = self.length / self.page_size;
        for (i, w) in self.words.iter_mut().enumerate() {
            let left = pages - (i as u64) * 64;
            *w = if left >= 64 {
                u64::MAX
            } else {
                (1 << left) - 1
            };
        }
    }

    /// The dirty IOVA runs `(iova, length)`, adjacent pages merged.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let pages = self.length / self.page_size;
        for (i, &w) in self.words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let bit = i as u64 * 64 + u64::from(w.trailing_zeros());
                w &= w - 1;
                if bit >= pages {
                    break;
                }
                let a = self.iova + bit * self.page_size;
                match out.last_mut() {
                    Some((s, l)) if *s + *l == a => *l += self.page_size,
                    _ => out.push((a, self.page_size)),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_is_page_offset_from_iova() {
        let mut b = DirtyBitmap::default();
        b.prepare(0x10_0000, 130 * 0x1000, 0x1000).unwrap();
        assert_eq!(b.words_mut().len(), 3);
        b.set(0x10_0000 + 65 * 0x1000);
        assert_eq!(b.words_mut()[1], 2);
        b.set(0x10_0000 + 66 * 0x1000);
        b.set(0x10_0000 + 129 * 0x1000);
        assert_eq!(
            b.runs(),
            vec![
                (0x10_0000 + 65 * 0x1000, 0x2000),
                (0x10_0000 + 129 * 0x1000, 0x1000)
            ]
        );
    }

    #[test]
    fn prepare_zeroes_a_reused_buffer() {
        let mut b = DirtyBitmap::default();
        b.prepare(0, 0x10000, 0x1000).unwrap();
        b.set_all();
        assert_eq!(b.runs(), vec![(0, 0x10000)]);
        b.prepare(0, 0x10000, 0x1000).unwrap();
        assert!(b.runs().is_empty());
    }

    #[test]
    fn bytes_for_matches_the_kernel_formula() {
        assert_eq!(DirtyBitmap::bytes_for(0x1000, 0x1000), 8);
        assert_eq!(DirtyBitmap::bytes_for(64 * 0x1000, 0x1000), 8);
        assert_eq!(DirtyBitmap::bytes_for(65 * 0x1000, 0x1000), 16);
    }

    #[test]
    fn refuses_what_the_kernel_refuses() {
        let mut b = DirtyBitmap::default();
        assert_eq!(b.prepare(0, 0x1000, 0), Err(BitmapError::PageSize(0)));
        assert_eq!(
            b.prepare(0, 0x3000, 0x3000),
            Err(BitmapError::PageSize(0x3000))
        );
        assert!(matches!(
            b.prepare(0x800, 0x1000, 0x1000),
            Err(BitmapError::Unaligned { iova: 0x800, .. })
        ));
        assert!(matches!(
            b.prepare(0, 0, 0x1000),
            Err(BitmapError::Unaligned { length: 0, .. })
        ));
        assert!(matches!(
            b.prepare(u64::MAX - 0xfff, 0x2000, 0x1000),
            Err(BitmapError::Overflow { .. })
        ));
    }
}
