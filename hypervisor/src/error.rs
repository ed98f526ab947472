//! Errors of the KVM layer. Every message names the value KVM or the caller got wrong.

use vmm_sys_util::errno;

/// A KVM capability, named in errors.
pub type CapName = &'static str;

/// Errors of the `hypervisor` crate.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] errno::Error),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(#[source] errno::Error),
    #[error("KVM refused to enable {cap} with value {value}: {source}")]
    EnableCap {
        cap: CapName,
        value: u64,
        #[source]
        source: errno::Error,
    },
    #[error(
        "dirty ring size {entries} entries is not a power of two \
         (accepted: powers of two from {min} to {max} entries)"
    )]
    RingSizeNotPowerOfTwo { entries: u32, min: u32, max: u32 },
    #[error("dirty ring size {entries} entries is out of range (accepted: powers of two from {min} to {max} entries)")]
    RingSizeOutOfRange { entries: u32, min: u32, max: u32 },
    #[error("KVM does not support dirty rings (neither KVM_CAP_DIRTY_LOG_RING_ACQ_REL nor KVM_CAP_DIRTY_LOG_RING is advertised)")]
    RingUnsupported,
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} (gpa {gpa:#x}, size {size:#x}) failed: {source}")]
    SetMemslot {
        slot: u32,
        gpa: u64,
        size: u64,
        #[source]
        source: errno::Error,
    },
    #[error(
        "memory slot at gpa {gpa:#x} has size {size:#x}, which is not a non-zero multiple of 4 KiB"
    )]
    BadMemslot { gpa: u64, size: u64 },
    #[error("interrupt routing: {0}")]
    IrqRoute(String),
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: errno::Error,
    },
    #[error("cannot create vCPU {index}: {source}")]
    CreateVcpu {
        index: u32,
        #[source]
        source: errno::Error,
    },
    #[error("cannot map the dirty ring of vCPU {index} ({bytes} bytes): {source}")]
    MapRing {
        index: u32,
        bytes: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("dirty ring entry names slot {slot:#x} offset {offset:#x}, which is outside every memory slot")]
    RingEntryOutOfRange { slot: u32, offset: u64 },
    #[error("KVM did not accept MSR {index:#x} when restoring vCPU {vcpu}")]
    RestoreMsr { index: u32, vcpu: u32 },
    #[error("dirty ring of vCPU {index} is out of step with KVM: {what} ({indexes})")]
    RingOutOfStep {
        index: u32,
        what: String,
        indexes: crate::RingIndexes,
    },
    #[error("dirty logging is not enabled on this VM ({0})")]
    TrackingOff(&'static str),
}

/// Result alias of the `hypervisor` crate.
pub type Result<T> = std::result::Result<T, HypervisorError>;

impl HypervisorError {
    pub(crate) fn ioctl(what: &'static str) -> impl FnOnce(errno::Error) -> Self {
        move |source| HypervisorError::Ioctl { what, source }
    }
}
