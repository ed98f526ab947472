//! Time from the TSC, calibrated against PIT channel 2 (the in-kernel KVM PIT, with port
//! 0x61 for its gate and output). When that fails the frequency comes from CPUID (leaf
//! 0x15, 0x16, or the hypervisor's 0x40000010), else a guess of 2 GHz.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::{cpuid, inb, outb, rdtsc};

const PIT_HZ: u64 = 1_193_182;
/// PIT ticks per measurement: about 10 ms.
const PIT_COUNT: u16 = 11_932;
const ASSUMED_HZ: u64 = 2_000_000_000;

static TSC_HZ: AtomicU64 = AtomicU64::new(ASSUMED_HZ);

/// Where the TSC frequency came from.
#[derive(Clone, Copy)]
pub enum Source {
    Pit,
    Cpuid15,
    Cpuid16,
    Hypervisor,
    Assumed,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Pit => "PIT calibration",
            Source::Cpuid15 => "CPUID 0x15",
            Source::Cpuid16 => "CPUID 0x16",
            Source::Hypervisor => "CPUID 0x40000010",
            Source::Assumed => "a guess (no PIT, no CPUID frequency)",
        }
    }
}

/// TSC ticks per second.
pub fn hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// The TSC now.
pub fn now() -> u64 {
    rdtsc()
}

/// Busy-waits `us` microseconds.
pub fn delay_us(us: u64) {
    let end = now() + hz() / 1_000_000 * us;
    while now() < end {
        core::hint::spin_loop();
    }
}

fn plausible(hz: u64) -> bool {
    (100_000_000..=20_000_000_000).contains(&hz)
}

/// One PIT channel 2 one-shot of `PIT_COUNT` ticks, timed with the TSC.
fn pit_measure() -> Option<u64> {
    let saved = inb(0x61);
    // Gate on, speaker off; channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count).
    outb(0x61, (saved & !0x02) | 0x01);
    outb(0x43, 0xb0);
    outb(0x42, PIT_COUNT as u8);
    outb(0x42, (PIT_COUNT >> 8) as u8);
    let t0 = rdtsc();
    let mut result = None;
    // In mode 0 the output stays low until the count runs out; high right away means
    // there is no PIT behind the port (it reads 0xff).
    if inb(0x61) & 0x20 == 0 {
        for _ in 0..50_000_000u32 {
            if inb(0x61) & 0x20 != 0 {
                result = Some(rdtsc() - t0);
                break;
            }
            // Give up after ~10 s even at 20 GHz.
            if rdtsc() - t0 > 200_000_000_000 {
                break;
            }
        }
    }
    outb(0x61, saved);
    result.map(|ticks| ticks * PIT_HZ / u64::from(PIT_COUNT))
}

/// Measures the TSC frequency; remembers it for [`hz`] and says where it came from.
pub fn calibrate() -> Source {
    // Best of three: a late poll only makes a measurement longer.
    let pit = (0..3).filter_map(|_| pit_measure()).min();
    let (hz, source) = match pit {
        Some(hz) if plausible(hz) => (hz, Source::Pit),
        _ => from_cpuid(),
    };
    TSC_HZ.store(hz, Ordering::Relaxed);
    source
}

fn from_cpuid() -> (u64, Source) {
    let max = cpuid(0, 0)[0];
    if max >= 0x15 {
        let [den, num, crystal, _] = cpuid(0x15, 0);
        let hz = u64::from(crystal) * u64::from(num) / u64::from(den.max(1));
        if den != 0 && plausible(hz) {
            return (hz, Source::Cpuid15);
        }
    }
    if max >= 0x16 {
        let hz = u64::from(cpuid(0x16, 0)[0] & 0xffff) * 1_000_000;
        if plausible(hz) {
            return (hz, Source::Cpuid16);
        }
    }
    let hv = cpuid(1, 0)[2] & (1 << 31) != 0;
    if hv && cpuid(0x4000_0000, 0)[0] >= 0x4000_0010 {
        let hz = u64::from(cpuid(0x4000_0010, 0)[0]) * 1000;
        if plausible(hz) {
            return (hz, Source::Hypervisor);
        }
    }
    (ASSUMED_HZ, Source::Assumed)
}
