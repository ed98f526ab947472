//! Which dirty-tracking capabilities KVM advertises, read through a narrow seam so the
//! code paths for capabilities this kernel lacks (WITH_BITMAP on x86) are testable.

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
};

/// Size of one `struct kvm_dirty_gfn` ring entry.
pub const RING_ENTRY_BYTES: u32 = 16;
/// KVM refuses rings smaller than one page.
pub const MIN_RING_ENTRIES: u32 = 4096 / RING_ENTRY_BYTES;

/// The one question the VM builder asks KVM about capabilities (`KVM_CHECK_EXTENSION`
/// on the VM fd). Implemented by [`kvm_ioctls::VmFd`]; tests substitute their own.
pub trait CapabilityProbe {
    /// The raw `KVM_CHECK_EXTENSION` answer: 0 = absent, otherwise capability specific.
    fn check_extension_raw(&self, cap: u32) -> i32;
}

impl CapabilityProbe for kvm_ioctls::VmFd {
    fn check_extension_raw(&self, cap: u32) -> i32 {
        kvm_ioctls::VmFd::check_extension_raw(self, cap as libc::c_ulong)
    }
}

/// The ring flavour KVM offers. ACQ_REL is preferred: it is the one defined for weakly
/// ordered hosts and the one the harvest protocol (acquire/release on `flags`) is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingFlavor {
    AcqRel,
    Tso,
}

impl RingFlavor {
    pub fn cap(self) -> u32 {
        match self {
            RingFlavor::AcqRel => KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
            RingFlavor::Tso => KVM_CAP_DIRTY_LOG_RING,
        }
    }

    pub fn cap_name(self) -> &'static str {
        match self {
            RingFlavor::AcqRel => "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
            RingFlavor::Tso => "KVM_CAP_DIRTY_LOG_RING",
        }
    }
}

/// Dirty-tracking capabilities of one VM, as KVM reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyCaps {
    /// The ring flavour to use and the largest ring KVM accepts, in entries.
    pub ring: Option<(RingFlavor, u32)>,
    /// `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP` is advertised.
    pub with_bitmap: bool,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` flags (0 when absent).
    pub manual_protect: u32,
}

impl DirtyCaps {
    pub fn probe(p: &impl CapabilityProbe) -> Self {
        let ring_bytes = |cap| u32::try_from(p.check_extension_raw(cap)).unwrap_or(0);
        let acq_rel = ring_bytes(KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
        let tso = ring_bytes(KVM_CAP_DIRTY_LOG_RING);
        let ring = if acq_rel >= RING_ENTRY_BYTES {
            Some((RingFlavor::AcqRel, acq_rel / RING_ENTRY_BYTES))
        } else if tso >= RING_ENTRY_BYTES {
            Some((RingFlavor::Tso, tso / RING_ENTRY_BYTES))
        } else {
            None
        };
        DirtyCaps {
            ring,
            with_bitmap: p.check_extension_raw(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) > 0,
            manual_protect: u32::try_from(p.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))
                .unwrap_or(0),
        }
    }

    /// Checks a requested ring size (in entries) against what KVM accepts.
    pub fn validate_ring_entries(&self, entries: u32) -> crate::Result<RingFlavor> {
        let (flavor, max) = self.ring.ok_or(crate::HypervisorError::RingUnsupported)?;
        let min = MIN_RING_ENTRIES;
        if !entries.is_power_of_two() {
            return Err(crate::HypervisorError::RingSizeNotPowerOfTwo { entries, min, max });
        }
        if entries < min || entries > max {
            return Err(crate::HypervisorError::RingSizeOutOfRange { entries, min, max });
        }
        Ok(flavor)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A capability table standing in for KVM.
    pub struct FakeCaps(pub HashMap<u32, i32>);

    impl CapabilityProbe for FakeCaps {
        fn check_extension_raw(&self, cap: u32) -> i32 {
            self.0.get(&cap).copied().unwrap_or(0)
        }
    }

    pub fn fake(pairs: &[(u32, i32)]) -> FakeCaps {
        FakeCaps(pairs.iter().copied().collect())
    }

    #[test]
    fn prefers_acq_rel_and_converts_bytes_to_entries() {
        let c = DirtyCaps::probe(&fake(&[
            (KVM_CAP_DIRTY_LOG_RING, 1 << 20),
            (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 1 << 20),
        ]));
        assert_eq!(c.ring, Some((RingFlavor::AcqRel, 65536)));
        let c = DirtyCaps::probe(&fake(&[(KVM_CAP_DIRTY_LOG_RING, 1 << 16)]));
        assert_eq!(c.ring, Some((RingFlavor::Tso, 4096)));
        assert!(!c.with_bitmap);
        assert_eq!(DirtyCaps::probe(&fake(&[])).ring, None);
    }

    #[test]
    fn ring_size_validation_names_the_range() {
        let c = DirtyCaps::probe(&fake(&[(KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 1 << 20)]));
        assert_eq!(c.validate_ring_entries(4096).unwrap(), RingFlavor::AcqRel);
        let e = c.validate_ring_entries(1000).unwrap_err().to_string();
        assert!(
            e.contains("1000") && e.contains("256") && e.contains("65536"),
            "{e}"
        );
        let e = c.validate_ring_entries(131072).unwrap_err().to_string();
        assert!(e.contains("131072") && e.contains("65536"), "{e}");
        assert!(c.validate_ring_entries(128).is_err());
        let none = DirtyCaps::probe(&fake(&[]));
        assert!(matches!(
            none.validate_ring_entries(4096),
            Err(crate::HypervisorError::RingUnsupported)
        ));
    }
}
