//! crc32c (Castagnoli) for the memory chunks' checksums: every page is checked on its way.
//!
//! The `crc32c` crate uses SSE4.2's `crc32` instruction (three streams at once), about
//! 8 GB/s here: a sixth of the CPU either end spends per page. Where the CPU has AVX-512
//! with VPCLMULQDQ, long inputs are folded 256 bytes at a time by carry-less
//! multiplication instead (four 512-bit accumulators), and only the last 16 bytes of the
//! fold and the tail go through the `crc32` instruction. Same function, same values:
//! the tests compare it with the crate on every length around the block size.

/// The crc32c of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// The crc32c of the bytes whose crc32c is `crc`, followed by `data`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if data.len() >= x86::MIN_LEN && x86::available() {
        // SAFETY: `available` checked that this CPU has every feature the function is
        // compiled for.
        return unsafe { x86::crc32c_append_folded(crc, data) };
    }
    crc32c::crc32c_append(crc, data)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Shorter inputs are not worth setting the fold up for.
    pub const MIN_LEN: usize = 1024;
    const BLOCK: usize = 256;

    /// Folding constants for the reflected polynomial 0x82F63B78: folding 128 bits over a
    /// distance of D bits multiplies their low half by x^(D+31) mod P and their high half
    /// by x^(D-33) mod P (bit-reflected; computed and checked against a bitwise crc32c).
    const K2048: (u64, u64) = (0xdcb1_7aa4, 0xb9e0_2b86);
    const K512: (u64, u64) = (0x740e_ef02, 0x9e4a_ddf8);
    const K128: (u64, u64) = (0xf20c_0dfe, 0x493c_7d27);

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("vpclmulqdq")
            && is_x86_feature_detected!("pclmulqdq")
            && is_x86_feature_detected!("sse4.2")
    }

    /// The first 64 bytes of `bytes` (zeros if there are fewer: never, as called).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load64(bytes: &[u8]) -> __m512i {
        match bytes.first_chunk::<64>() {
            // SAFETY: `b` is 64 readable bytes; the load is unaligned.
            Some(b) => unsafe { _mm512_loadu_si512(b.as_ptr().cast()) },
            None => _mm512_setzero_si512(),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,vpclmulqdq")]
    fn fold512(x: __m512i, k: __m512i, next: __m512i) -> __m512i {
        let lo = _mm512_clmulepi64_epi128(x, k, 0x00);
        let hi = _mm512_clmulepi64_epi128(x, k, 0x11);
        // lo ^ hi ^ next
        _mm512_ternarylogic_epi64(lo, hi, next, 0x96)
    }

    #[inline]
    #[target_feature(enable = "pclmulqdq,sse2")]
    fn fold128(x: __m128i, k: __m128i, next: __m128i) -> __m128i {
        let lo = _mm_clmulepi64_si128(x, k, 0x00);
        let hi = _mm_clmulepi64_si128(x, k, 0x11);
        _mm_xor_si128(_mm_xor_si128(lo, hi), next)
    }

    /// # Safety
    /// The CPU must have every feature enabled here ([`available`]).
    #[target_feature(enable = "avx512f,vpclmulqdq,pclmulqdq,sse4.2")]
    pub unsafe fn crc32c_append_folded(crc: u32, data: &[u8]) -> u32 {
        let blocks = data.len() / BLOCK;
        let folded = &data[..blocks * BLOCK];
        // The running crc enters as the first 32 bits of the message (inverted, as the
        // crc32c convention has it).
        let init = _mm512_maskz_set1_epi32(1, !crc as i32);
        let mut a0 = _mm512_xor_si512(load64(folded.get(0..).unwrap_or_default()), init);
        let mut a1 = load64(folded.get(64..).unwrap_or_default());
        let mut a2 = load64(folded.get(128..).unwrap_or_default());
        let mut a3 = load64(folded.get(192..).unwrap_or_default());
        let k = _mm512_broadcast_i32x4(_mm_set_epi64x(K2048.1 as i64, K2048.0 as i64));
        for b in 1..blocks {
            let at = b * BLOCK;
            a0 = fold512(a0, k, load64(folded.get(at..).unwrap_or_default()));
            a1 = fold512(a1, k, load64(folded.get(at + 64..).unwrap_or_default()));
            a2 = fold512(a2, k, load64(folded.get(at + 128..).unwrap_or_default()));
            a3 = fold512(a3, k, load64(folded.get(at + 192..).unwrap_or_default()));
        }
        let k = _mm512_broadcast_i32x4(_mm_set_epi64x(K512.1 as i64, K512.0 as i64));
        let a = fold512(fold512(fold512(a0, k, a1), k, a2), k, a3);
        let k = _mm_set_epi64x(K128.1 as i64, K128.0 as i64);
        let mut x = _mm512_extracti32x4_epi32::<0>(a);
        x = fold128(x, k, _mm512_extracti32x4_epi32::<1>(a));
        x = fold128(x, k, _mm512_extracti32x4_epi32::<2>(a));
        x = fold128(x, k, _mm512_extracti32x4_epi32::<3>(a));
        // The fold keeps the message's crc: what is left is those 16 bytes, then the tail.
        let mut state = _mm_crc32_u64(0, _mm_cvtsi128_si64(x) as u64);
        state = _mm_crc32_u64(state, _mm_extract_epi64::<1>(x) as u64);
        let tail = &data[blocks * BLOCK..];
        let mut words = tail.chunks_exact(8);
        for w in &mut words {
            state = _mm_crc32_u64(state, u64::from_le_bytes(w.try_into().unwrap_or([0; 8])));
        }
        let mut state = state as u32;
        for &byte in words.remainder() {
            state = _mm_crc32_u8(state, byte);
        }
        !state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn same_values_as_the_crate_at_every_length_and_alignment() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        let data = bytes(8 * 4096 + 300, 7);
        for len in (0..2200).chain([4096, 4097, 8 * 4096 - 1, 8 * 4096 + 255]) {
            for skew in [0, 1, 7] {
                let d = &data[skew..skew + len];
                assert_eq!(crc32c(d), crc32c::crc32c(d), "length {len} at +{skew}");
                assert_eq!(
                    crc32c_append(0x1234_5678, d),
                    crc32c::crc32c_append(0x1234_5678, d),
                    "append, length {len} at +{skew}"
                );
            }
        }
        // Piece by piece as one.
        let whole = crc32c::crc32c(&data);
        let (a, b) = data.split_at(5000);
        assert_eq!(crc32c_append(crc32c(a), b), whole);
        assert_eq!(
            crc32c(&vec![0u8; 1 << 20]),
            crc32c::crc32c(&vec![0u8; 1 << 20])
        );
    }

    /// The folded path is the one tested above only on a CPU that has it: say which.
    #[test]
    fn reports_the_path_in_use() {
        #[cfg(target_arch = "x86_64")]
        eprintln!(
            "crc32c: {}",
            if x86::available() {
                "AVX-512 VPCLMULQDQ folding"
            } else {
                "the crc32c crate (SSE4.2)"
            }
        );
    }
}
