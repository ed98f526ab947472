// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! The device's migrated state: a small versioned binary blob, plain data.
//!
//! | bytes  | contents                                  |
//! |--------|-------------------------------------------|
//! | 0..4   | magic `"FDMS"`                            |
//! | 4..8   | version, u32 = [`STATE_VERSION`]          |
//! | 8..16  | ADDR, u64                                 |
//! | 16..24 | LEN, u64                                  |
//! | 24..32 | SEED, u64                                 |
//! | 32..36 | STATUS, u32                               |
//! | 36..44 | GENERATION, u64                           |
//! | 44..52 | JOBS, u64                                 |
//! | 52..60 | PAGES, u64                                |
//! | 60..62 | config-space command register, u16        |
//! | 62..66 | BAR 0 (address bits), u32                 |
//!
//! All little-endian, exactly [`STATE_BYTES`] long. DMA mappings are not part of it: the
//! destination's client maps its own memory. STATUS is never BUSY in a blob (leaving
//! RUNNING waits for the job in flight, whose results are saved), and a blob saying BUSY
//! is refused.

use guest_pattern::user_device::{STATUS_BAD_JOB, STATUS_OK, STATUS_STOPPED, STATUS_UNMAPPED};
use thiserror::Error;

use crate::config::{ConfigSpace, BAR0_MASK, CMD_WRITABLE};

pub const STATE_MAGIC: [u8; 4] = *b"FDMS";
pub const STATE_VERSION: u32 = 1;
pub const STATE_BYTES: usize = 66;

/// The registers of BAR 0 that hold state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Registers {
    pub addr: u64,
    pub len: u64,
    pub seed: u64,
    pub status: u32,
    pub generation: u64,
    pub jobs: u64,
    pub pages: u64,
}

/// Everything that migrates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    pub regs: Registers,
    pub config: ConfigSpace,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    #[error("state blob of {0} bytes, version 1 has {STATE_BYTES}")]
    Length(usize),
    #[error("not a ferry-dma-device state blob (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("state blob version {0}, this device reads version {STATE_VERSION}")]
    Version(u32),
    #[error("state blob: {0} out of range")]
    Value(&'static str),
}

/// Reads little-endian fields off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().expect("split at N")
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

impl DeviceState {
    pub fn encode(&self) -> Vec<u8> {
        let r = &self.regs;
        let mut b = Vec::with_capacity(STATE_BYTES);
        b.extend_from_slice(&STATE_MAGIC);
        b.extend_from_slice(&STATE_VERSION.to_le_bytes());
        for v in [r.addr, r.len, r.seed] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&r.status.to_le_bytes());
        for v in [r.generation, r.jobs, r.pages] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.config.command.to_le_bytes());
        b.extend_from_slice(&self.config.bar0.to_le_bytes());
        debug_assert_eq!(b.len(), STATE_BYTES);
        b
    }

    /// Parses a blob: any bytes at all give a state or an error, never a panic.
    pub fn decode(b: &[u8]) -> Result<DeviceState, StateError> {
        if b.len() >= 8 {
            // Magic and version first: they say more than a length does.
            let magic: [u8; 4] = b[0..4].try_into().expect("4 bytes");
            if magic != STATE_MAGIC {
                return Err(StateError::Magic(magic));
            }
            let version = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
            if version != STATE_VERSION {
                return Err(StateError::Version(version));
            }
        }
        if b.len() != STATE_BYTES {
            return Err(StateError::Length(b.len()));
        }
        let mut r = Reader(&b[8..]);
        let regs = Registers {
            addr: r.u64(),
            len: r.u64(),
            seed: r.u64(),
            status: r.u32(),
            generation: r.u64(),
            jobs: r.u64(),
            pages: r.u64(),
        };
        let config = ConfigSpace {
            command: r.u16(),
            bar0: r.u32(),
        };
        if ![STATUS_OK, STATUS_BAD_JOB, STATUS_UNMAPPED, STATUS_STOPPED].contains(&regs.status) {
            return Err(StateError::Value("STATUS"));
        }
        if config.command & !CMD_WRITABLE != 0 {
            return Err(StateError::Value("command register"));
        }
        if config.bar0 & !BAR0_MASK != 0 {
            return Err(StateError::Value("BAR 0"));
        }
        Ok(DeviceState { regs, config })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceState {
        DeviceState {
            regs: Registers {
                addr: 0x1234_5000,
                len: 0x3000,
                seed: 0xdead_beef_0bad_cafe,
                status: STATUS_UNMAPPED,
                generation: 0x8000_0000_0000_0042,
                jobs: 17,
                pages: 40,
            },
            config: ConfigSpace {
                command: CMD_WRITABLE,
                bar0: 0xfebf_f000,
            },
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let s = sample();
        let b = s.encode();
        assert_eq!(b.len(), STATE_BYTES);
        assert_eq!(&b[0..4], b"FDMS");
        assert_eq!(&b[4..8], &1u32.to_le_bytes());
        assert_eq!(&b[8..16], &0x1234_5000u64.to_le_bytes());
        assert_eq!(&b[32..36], &STATUS_UNMAPPED.to_le_bytes());
        assert_eq!(&b[44..52], &17u64.to_le_bytes());
        assert_eq!(&b[60..62], &CMD_WRITABLE.to_le_bytes());
        assert_eq!(&b[62..66], &0xfebf_f000u32.to_le_bytes());
        assert_eq!(DeviceState::decode(&b), Ok(s));
    }

    #[test]
    fn malformed_blobs_are_refused() {
        let good = sample().encode();
        assert_eq!(DeviceState::decode(&[]), Err(StateError::Length(0)));
        assert_eq!(
            DeviceState::decode(&good[..65]),
            Err(StateError::Length(65))
        );
        let mut long = good.clone();
        long.push(0);
        assert_eq!(DeviceState::decode(&long), Err(StateError::Length(67)));
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(DeviceState::decode(&b), Err(StateError::Magic(_))));
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(DeviceState::decode(&b), Err(StateError::Version(2)));
        let mut b = good.clone();
        b[32] = 9;
        assert_eq!(DeviceState::decode(&b), Err(StateError::Value("STATUS")));
        b[32] = guest_pattern::user_device::STATUS_BUSY as u8;
        assert_eq!(DeviceState::decode(&b), Err(StateError::Value("STATUS")));
        let mut b = good.clone();
        b[60] = 0x01;
        assert!(DeviceState::decode(&b).is_err());
        let mut b = good.clone();
        b[62] = 0x01;
        assert_eq!(DeviceState::decode(&b), Err(StateError::Value("BAR 0")));
    }

    /// Not a fuzzer, but every prefix, every single-byte change and a stream of
    /// pseudo-random blobs must decode or fail without panicking.
    #[test]
    fn arbitrary_bytes_never_panic() {
        let good = sample().encode();
        for n in 0..=good.len() + 8 {
            let mut b = good.clone();
            b.resize(n, 0xa5);
            let _ = DeviceState::decode(&b);
        }
        for i in 0..good.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                if let Ok(s) = DeviceState::decode(&b) {
                    assert_eq!(s.encode(), b);
                }
            }
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = (x % 80) as usize;
            let mut b: Vec<u8> = (0..n).map(|i| (x >> (i % 8 * 8)) as u8).collect();
            if x & 1 == 0 && n >= 8 {
                b[..8].copy_from_slice(&good[..8]);
            }
            let _ = DeviceState::decode(&b);
        }
    }
}
