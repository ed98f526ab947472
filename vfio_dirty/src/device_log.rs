// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! VFIO device features on a device fd (a group's device fd, or a cdev bound to an iommufd):
//! device DMA logging ([`DeviceLog`]) and migration v2 state changes ([`Migration`]).
//!
//! Device DMA logging is not a [`crate::DirtyBackend`]: its ranges are fixed at START (a
//! new mapping needs STOP and a new START, which loses the log), it has no domains, and a
//! REPORT error means the log is corrupt. It is driven directly: [`DeviceLog::start`] over
//! the guest RAM ranges, [`DeviceLog::report`] one range at a time into a zeroed
//! [`DirtyBitmap`], and on any error everything the device could reach is dirty.
//!
//! Migration state changes go through a small state machine: [`MigState::check_step`]
//! accepts only the single arcs of the kernel's FSM that Ferry takes, before any ioctl.
//! The source walks [`SOURCE_ARC`] (or [`SOURCE_ARC_NO_PRECOPY`]), the destination
//! [`DESTINATION_ARC`].
//!
//! Every argument is a `#[repr(C)]` pair of the feature header and its payload (the kernel
//! reads the payload right after the 8-byte header), built by a pure `*_arg` function that
//! is tested here field by field.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::bitmap::DirtyBitmap;
use crate::error::{ioctl, is_unsupported, refused, MigrationError};
use crate::policy::{BackendError, Range};
use crate::uapi::*;

const OP_FEATURE: &str = "VFIO_DEVICE_FEATURE";
const OP_START: &str = "VFIO_DEVICE_FEATURE_DMA_LOGGING_START";
const OP_REPORT: &str = "VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT";
const OP_STOP: &str = "VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP";
const OP_MIG_STATE: &str = "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE";

/// `LOG_MAX_RANGES` on 4 KiB pages (`PAGE_SIZE / sizeof(range)`): more gives E2BIG.
pub const LOG_MAX_RANGES_4K: usize = 256;
/// DMA_LOGGING_REPORT refuses a smaller page size.
pub const REPORT_MIN_PAGE_SIZE: u64 = 4096;

/// DMA_LOGGING_START's argument: header + control.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DmaLoggingStartArg {
    pub hdr: VfioDeviceFeature,
    pub control: VfioDeviceFeatureDmaLoggingControl,
}

/// DMA_LOGGING_REPORT's argument: header + report.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DmaLoggingReportArg {
    pub hdr: VfioDeviceFeature,
    pub report: VfioDeviceFeatureDmaLoggingReport,
}

/// MIG_DEVICE_STATE's argument: header + state.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MigStateArg {
    pub hdr: VfioDeviceFeature,
    pub state: VfioDeviceFeatureMigState,
}

/// MIGRATION's argument: header + flags.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MigrationArg {
    pub hdr: VfioDeviceFeature,
    pub mig: VfioDeviceFeatureMigration,
}

const fn size32<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

// ---- argument building ----

/// PROBE whether `feature` supports the operations in `ops` (GET and/or SET).
pub fn probe_arg(feature: u32, ops: u32) -> VfioDeviceFeature {
    VfioDeviceFeature {
        argsz: size32::<VfioDeviceFeature>(),
        flags: VFIO_DEVICE_FEATURE_PROBE | ops | feature,
    }
}

/// The ranges DMA_LOGGING_START would accept, sorted: at least one, `page_size` a power of
/// two, every range non-empty, aligned to it, not overflowing, none overlapping another.
/// Refused with EINVAL (EOVERFLOW for an overflow), as the kernel would.
pub fn check_logging_ranges(
    page_size: u64,
    ranges: &[Range],
) -> Result<Vec<VfioDeviceFeatureDmaLoggingRange>, BackendError> {
    let inval = refused(OP_START, libc::EINVAL);
    if ranges.is_empty() || !page_size.is_power_of_two() {
        return Err(inval);
    }
    let mut out: Vec<VfioDeviceFeatureDmaLoggingRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        if r.length == 0
            || !r.start.is_multiple_of(page_size)
            || !r.length.is_multiple_of(page_size)
        {
            return Err(inval);
        }
        if r.start.checked_add(r.length - 1).is_none() {
            return Err(refused(OP_START, libc::EOVERFLOW));
        }
        out.push(VfioDeviceFeatureDmaLoggingRange {
            iova: r.start,
            length: r.length,
        });
    }
    out.sort_by_key(|r| r.iova);
    if out.windows(2).any(|w| w[0].iova + w[0].length > w[1].iova) {
        return Err(inval);
    }
    Ok(out)
}

/// START with `page_size` (a hint; the device writes back the granule it chose) over
/// `ranges`, which must stay where they are until the ioctl returns.
pub fn dma_logging_start_arg(
    page_size: u64,
    ranges: &[VfioDeviceFeatureDmaLoggingRange],
) -> DmaLoggingStartArg {
    DmaLoggingStartArg {
        hdr: VfioDeviceFeature {
            argsz: size32::<DmaLoggingStartArg>(),
            flags: VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        },
        control: VfioDeviceFeatureDmaLoggingControl {
            page_size,
            num_ranges: ranges.len() as u32,
            reserved: 0,
            ranges: ranges.as_ptr() as u64,
        },
    }
}

pub fn dma_logging_stop_arg() -> VfioDeviceFeature {
    VfioDeviceFeature {
        argsz: size32::<VfioDeviceFeature>(),
        flags: VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
    }
}

/// REPORT of `bitmap`'s range at its page size into its buffer (left as the caller zeroed
/// it; the report reads and clears the device's log).
pub fn dma_logging_report_arg(bitmap: &mut DirtyBitmap) -> DmaLoggingReportArg {
    DmaLoggingReportArg {
        hdr: VfioDeviceFeature {
            argsz: size32::<DmaLoggingReportArg>(),
            flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
        },
        report: VfioDeviceFeatureDmaLoggingReport {
            iova: bitmap.iova(),
            length: bitmap.length(),
            page_size: bitmap.page_size(),
            bitmap: bitmap.words_mut().as_mut_ptr() as u64,
        },
    }
}

/// SET the device state to `state`; `data_fd` comes back (-1 when the arc opens none).
pub fn mig_state_set_arg(state: MigState) -> MigStateArg {
    MigStateArg {
        hdr: VfioDeviceFeature {
            argsz: size32::<MigStateArg>(),
            flags: VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        },
        state: VfioDeviceFeatureMigState {
            device_state: state as u32,
            data_fd: -1,
        },
    }
}

pub fn mig_state_get_arg() -> MigStateArg {
    MigStateArg {
        hdr: VfioDeviceFeature {
            argsz: size32::<MigStateArg>(),
            flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        },
        state: VfioDeviceFeatureMigState {
            device_state: 0,
            data_fd: -1,
        },
    }
}

pub fn migration_get_arg() -> MigrationArg {
    MigrationArg {
        hdr: VfioDeviceFeature {
            argsz: size32::<MigrationArg>(),
            flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
        },
        mig: VfioDeviceFeatureMigration { flags: 0 },
    }
}

/// `ioctl(VFIO_DEVICE_FEATURE)` with `arg`.
///
/// # Safety
/// `arg` must be a feature header followed by the payload its flags name, `argsz` bytes in
/// all, with every pointer in the payload valid for what the kernel reads or writes there.
unsafe fn feature<A>(
    fd: BorrowedFd<'_>,
    arg: &mut A,
    op: &'static str,
) -> Result<i32, BackendError> {
    // SAFETY: the caller's promise above; `arg` is borrowed across the call.
    unsafe { ioctl(fd, VFIO_DEVICE_FEATURE, arg as *mut A as _, op) }
}

// ---- DMA logging ----

/// Device DMA logging on one device fd (anything holding it: `File`, `OwnedFd`,
/// `BorrowedFd`).
pub struct DeviceLog<F: AsFd> {
    fd: F,
    /// The granule the device chose at START, while logging.
    granule: Option<u64>,
}

impl<F: AsFd> DeviceLog<F> {
    pub fn new(fd: F) -> Self {
        DeviceLog { fd, granule: None }
    }

    pub fn fd(&self) -> &F {
        &self.fd
    }

    /// Whether the device logs its DMA (PROBE of DMA_LOGGING_START with SET). "Does not"
    /// errors (ENOTTY: no log ops; EINVAL, EOPNOTSUPP) are `false`; others are errors.
    pub fn supported(&self) -> Result<bool, BackendError> {
        let mut arg = probe_arg(
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            VFIO_DEVICE_FEATURE_SET,
        );
        // SAFETY: a PROBE is the bare 8-byte header, read only.
        match unsafe { feature(self.fd.as_fd(), &mut arg, OP_FEATURE) } {
            Ok(_) => Ok(true),
            Err(e) if is_unsupported(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The granule the device logs at, while logging.
    pub fn granule(&self) -> Option<u64> {
        self.granule
    }

    pub fn is_logging(&self) -> bool {
        self.granule.is_some()
    }

    /// Start logging DMA writes to `ranges` (sorted and checked first, see
    /// [`check_logging_ranges`]) at `page_size`, a hint: returns the granule the device
    /// chose, which reports must use. A second start before [`DeviceLog::stop`] is refused
    /// (EBUSY) without asking the device; more than the kernel's range limit is its E2BIG
    /// (merge ranges and retry).
    pub fn start(&mut self, page_size: u64, ranges: &[Range]) -> Result<u64, BackendError> {
        if self.granule.is_some() {
            return Err(refused(OP_START, libc::EBUSY));
        }
        let ranges = check_logging_ranges(page_size, ranges)?;
        let mut arg = dma_logging_start_arg(page_size, &ranges);
        // SAFETY: DMA_LOGGING_START with SET takes the header and a
        // `struct vfio_device_feature_dma_logging_control`; its `ranges` points at
        // `num_ranges` `{iova, length}` structs in `ranges`, alive and unmoved across the
        // call. The kernel writes only `page_size` back in `arg`.
        unsafe { feature(self.fd.as_fd(), &mut arg, OP_START) }?;
        let granule = arg.control.page_size;
        self.granule = Some(granule);
        Ok(granule)
    }

    /// Read and clear the log for `bitmap`'s range into it. The caller zeroes the bitmap
    /// (prepared at [`DeviceLog::granule`]); any error means the log is corrupt: treat
    /// everything the device could reach as dirty, or stop and start again.
    pub fn report(&mut self, bitmap: &mut DirtyBitmap) -> Result<(), BackendError> {
        if self.granule.is_none() {
            return Err(refused(OP_REPORT, libc::EINVAL));
        }
        if bitmap.length() == 0 || bitmap.page_size() < REPORT_MIN_PAGE_SIZE {
            return Err(refused(OP_REPORT, libc::EINVAL));
        }
        let mut arg = dma_logging_report_arg(bitmap);
        // SAFETY: DMA_LOGGING_REPORT with GET takes the header and a
        // `struct vfio_device_feature_dma_logging_report`, read only; `bitmap` points at the
        // bitmap's words, which `prepare` sized to DIV_ROUND_UP(length / page_size, 64) u64s
        // for exactly this iova/length/page_size, the most the kernel sets bits in; the
        // bitmap is mutably borrowed until the call returns.
        unsafe { feature(self.fd.as_fd(), &mut arg, OP_REPORT) }?;
        Ok(())
    }

    /// Stop logging (the log is gone afterwards).
    pub fn stop(&mut self) -> Result<(), BackendError> {
        let mut arg = dma_logging_stop_arg();
        // SAFETY: DMA_LOGGING_STOP with SET is the bare 8-byte header, read only.
        unsafe { feature(self.fd.as_fd(), &mut arg, OP_STOP) }?;
        self.granule = None;
        Ok(())
    }
}

// ---- migration v2 ----

/// `enum vfio_device_mig_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MigState {
    Error = VFIO_DEVICE_STATE_ERROR,
    Stop = VFIO_DEVICE_STATE_STOP,
    Running = VFIO_DEVICE_STATE_RUNNING,
    StopCopy = VFIO_DEVICE_STATE_STOP_COPY,
    Resuming = VFIO_DEVICE_STATE_RESUMING,
    RunningP2p = VFIO_DEVICE_STATE_RUNNING_P2P,
    PreCopy = VFIO_DEVICE_STATE_PRE_COPY,
    PreCopyP2p = VFIO_DEVICE_STATE_PRE_COPY_P2P,
}

/// The source with PRE_COPY: dirty data flows while running, then the final copy stopped.
pub const SOURCE_ARC: [MigState; 4] = [
    MigState::Running,
    MigState::PreCopy,
    MigState::StopCopy,
    MigState::Stop,
];
/// The source without PRE_COPY.
pub const SOURCE_ARC_NO_PRECOPY: [MigState; 4] = [
    MigState::Running,
    MigState::Stop,
    MigState::StopCopy,
    MigState::Stop,
];
/// The destination: a freshly opened device runs; it is stopped, loaded, stopped (which
/// validates the data) and run.
pub const DESTINATION_ARC: [MigState; 5] = [
    MigState::Running,
    MigState::Stop,
    MigState::Resuming,
    MigState::Stop,
    MigState::Running,
];

impl MigState {
    pub fn from_raw(v: u32) -> Option<MigState> {
        use MigState::*;
        [
            Error, Stop, Running, StopCopy, Resuming, RunningP2p, PreCopy, PreCopyP2p,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }

    /// The capability (`VFIO_MIGRATION_*`) a device needs to be in this state at all.
    pub fn needs(self) -> u64 {
        match self {
            MigState::Error => 0,
            MigState::Stop | MigState::Running | MigState::StopCopy | MigState::Resuming => {
                VFIO_MIGRATION_STOP_COPY
            }
            MigState::RunningP2p => VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
            MigState::PreCopy => VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY,
            MigState::PreCopyP2p => {
                VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY
            }
        }
    }

    /// The single steps Ferry takes: the kernel FSM's direct arcs, plus PRE_COPY →
    /// STOP_COPY (inside the saving group; the kernel passes PRE_COPY_P2P only if the
    /// device has P2P). Never to or from ERROR (that needs a device reset), never
    /// STOP_COPY → PRE_COPY (forbidden), never a combination through a saving state.
    pub fn is_step(self, to: MigState) -> bool {
        use MigState::*;
        matches!(
            (self, to),
            (Running, Stop | RunningP2p | PreCopy)
                | (RunningP2p, Running | Stop | PreCopyP2p)
                | (Stop, Running | RunningP2p | StopCopy | Resuming)
                | (StopCopy, Stop)
                | (Resuming, Stop)
                | (PreCopy, Running | PreCopyP2p | StopCopy)
                | (PreCopyP2p, PreCopy | RunningP2p | StopCopy)
        )
    }

    /// Whether `self → to` is a step a device with migration `flags` can take.
    pub fn check_step(self, to: MigState, flags: u64) -> Result<(), MigrationError> {
        if !self.is_step(to) {
            return Err(MigrationError::Illegal { from: self, to });
        }
        if to.needs() & !flags != 0 {
            return Err(MigrationError::Unsupported(to));
        }
        Ok(())
    }

    /// Whether the step opens a new data stream (the kernel returns its fd): into the
    /// saving group from a running state, STOP → STOP_COPY, STOP → RESUMING.
    pub fn opens_data_fd(self, to: MigState) -> bool {
        use MigState::*;
        matches!(
            (self, to),
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) | (Stop, StopCopy) | (Stop, Resuming)
        )
    }
}

/// A device's migration v2 state, changed only by checked steps.
pub struct Migration<F: AsFd> {
    fd: F,
    flags: u64,
    state: MigState,
}

impl<F: AsFd> Migration<F> {
    /// Ask the device: its migration flags (GET MIGRATION; a device without migration
    /// fails here) and its current state.
    pub fn new(fd: F) -> Result<Self, MigrationError> {
        let mut arg = migration_get_arg();
        // SAFETY: MIGRATION with GET takes the header and a `u64 flags` the kernel writes,
        // in `arg`, which lives across the call.
        unsafe { feature(fd.as_fd(), &mut arg, "VFIO_DEVICE_FEATURE_MIGRATION") }?;
        let mut m = Migration {
            fd,
            flags: arg.mig.flags,
            state: MigState::Error,
        };
        m.refresh()?;
        Ok(m)
    }

    /// Over a device whose flags and state the caller already knows.
    pub fn with_known(fd: F, flags: u64, state: MigState) -> Self {
        Migration { fd, flags, state }
    }

    pub fn state(&self) -> MigState {
        self.state
    }

    pub fn flags(&self) -> u64 {
        self.flags
    }

    pub fn fd(&self) -> &F {
        &self.fd
    }

    /// Read the device's state (GET MIG_DEVICE_STATE).
    pub fn refresh(&mut self) -> Result<MigState, MigrationError> {
        let mut arg = mig_state_get_arg();
        // SAFETY: MIG_DEVICE_STATE with GET takes the header and a
        // `struct vfio_device_feature_mig_state` the kernel writes, in `arg`, which lives
        // across the call; GET opens no fd.
        unsafe { feature(self.fd.as_fd(), &mut arg, OP_MIG_STATE) }?;
        let s = MigState::from_raw(arg.state.device_state)
            .ok_or(MigrationError::UnknownState(arg.state.device_state))?;
        self.state = s;
        Ok(s)
    }

    /// Take one step to `to`, checked against [`MigState::check_step`] before any ioctl.
    /// Returns the data fd the step opened (STOP_COPY, RESUMING, PRE_COPY), if any; `to`
    /// equal to the current state does nothing. When the device refuses, its state is read
    /// again (ERROR if that fails too).
    pub fn step(&mut self, to: MigState) -> Result<Option<OwnedFd>, MigrationError> {
        if to == self.state {
            return Ok(None);
        }
        self.state.check_step(to, self.flags)?;
        let mut arg = mig_state_set_arg(to);
        // SAFETY: MIG_DEVICE_STATE with SET takes the header and a
        // `struct vfio_device_feature_mig_state`, in `arg`, which lives across the call; the
        // kernel writes only `data_fd` back.
        let r = unsafe { feature(self.fd.as_fd(), &mut arg, OP_MIG_STATE) };
        if let Err(e) = r {
            if self.refresh().is_err() {
                self.state = MigState::Error;
            }
            return Err(e.into());
        }
        self.state = to;
        let fd = arg.state.data_fd;
        // SAFETY: a non-negative `data_fd` after a successful SET is a new fd the kernel
        // installed for this process, owned by nobody else: the OwnedFd takes it over.
        Ok((fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Walk `path` (its first state must be the current one), one checked step at a time;
    /// returns the data fds the steps opened, in order.
    pub fn walk(&mut self, path: &[MigState]) -> Result<Vec<OwnedFd>, MigrationError> {
        let mut fds = Vec::new();
        for &s in path {
            if let Some(fd) = self.step(s)? {
                fds.push(fd);
            }
        }
        Ok(fds)
    }
}

/// `VFIO_MIG_GET_PRECOPY_INFO` on a PRE_COPY data fd: `(initial_bytes, dirty_bytes)`.
pub fn precopy_info(data_fd: BorrowedFd<'_>) -> Result<(u64, u64), BackendError> {
    let mut arg = VfioPrecopyInfo {
        argsz: size32::<VfioPrecopyInfo>(),
        ..Default::default()
    };
    // SAFETY: VFIO_MIG_GET_PRECOPY_INFO takes a `struct vfio_precopy_info` of `argsz` bytes
    // and writes its counters in `arg`, which lives across the call.
    unsafe {
        ioctl(
            data_fd,
            VFIO_MIG_GET_PRECOPY_INFO,
            &mut arg as *mut _ as _,
            "VFIO_MIG_GET_PRECOPY_INFO",
        )
    }?;
    Ok((arg.initial_bytes, arg.dirty_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::mem::{offset_of, size_of};
    use MigState::*;

    const ALL: [MigState; 8] = [
        Error, Stop, Running, StopCopy, Resuming, RunningP2p, PreCopy, PreCopyP2p,
    ];
    const FULL: u64 = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY;

    fn r(start: u64, length: u64) -> Range {
        Range { start, length }
    }

    #[test]
    fn layouts() {
        assert_eq!(size_of::<DmaLoggingStartArg>(), 32);
        assert_eq!(offset_of!(DmaLoggingStartArg, control), 8);
        assert_eq!(size_of::<DmaLoggingReportArg>(), 40);
        assert_eq!(offset_of!(DmaLoggingReportArg, report), 8);
        assert_eq!(size_of::<MigStateArg>(), 16);
        assert_eq!(offset_of!(MigStateArg, state), 8);
        assert_eq!(size_of::<MigrationArg>(), 16);
        assert_eq!(offset_of!(MigrationArg, mig), 8);
    }

    #[test]
    fn probe_and_stop_args() {
        let p = probe_arg(
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            VFIO_DEVICE_FEATURE_SET,
        );
        assert_eq!(p.argsz, 8);
        assert_eq!(p.flags, (1 << 18) | (1 << 17) | 6);
        let s = dma_logging_stop_arg();
        assert_eq!((s.argsz, s.flags), (8, (1 << 17) | 7));
    }

    #[test]
    fn start_arg() {
        let ranges = check_logging_ranges(0x1000, &[r(0x10_0000, 0x1000), r(0, 0x2000)]).unwrap();
        assert_eq!(
            ranges,
            vec![
                VfioDeviceFeatureDmaLoggingRange {
                    iova: 0,
                    length: 0x2000
                },
                VfioDeviceFeatureDmaLoggingRange {
                    iova: 0x10_0000,
                    length: 0x1000
                }
            ],
            "sorted"
        );
        let a = dma_logging_start_arg(0x1000, &ranges);
        assert_eq!(a.hdr.argsz, 32);
        assert_eq!(a.hdr.flags, (1 << 17) | 6);
        assert_eq!(a.control.page_size, 0x1000);
        assert_eq!(a.control.num_ranges, 2);
        assert_eq!(a.control.reserved, 0);
        assert_eq!(a.control.ranges, ranges.as_ptr() as u64);
    }

    #[test]
    fn logging_ranges_the_kernel_would_refuse() {
        let e = |errno| Err(refused(OP_START, errno));
        assert_eq!(check_logging_ranges(0x1000, &[]), e(libc::EINVAL));
        assert_eq!(
            check_logging_ranges(0x3000, &[r(0, 0x3000)]),
            e(libc::EINVAL)
        );
        assert_eq!(check_logging_ranges(0, &[r(0, 0x1000)]), e(libc::EINVAL));
        assert_eq!(
            check_logging_ranges(0x1000, &[r(0x800, 0x1000)]),
            e(libc::EINVAL)
        );
        assert_eq!(
            check_logging_ranges(0x1000, &[r(0, 0x1800)]),
            e(libc::EINVAL)
        );
        assert_eq!(check_logging_ranges(0x1000, &[r(0, 0)]), e(libc::EINVAL));
        assert_eq!(
            check_logging_ranges(0x1000, &[r(0, 0x2000), r(0x1000, 0x1000)]),
            e(libc::EINVAL),
            "overlap"
        );
        assert_eq!(
            check_logging_ranges(0x1000, &[r(u64::MAX - 0xfff, 0x2000)]),
            e(libc::EOVERFLOW)
        );
        // Adjacent is fine, and a range ending exactly at 2^64 does not overflow.
        assert!(check_logging_ranges(0x1000, &[r(0, 0x1000), r(0x1000, 0x1000)]).is_ok());
        assert!(check_logging_ranges(0x1000, &[r(u64::MAX - 0xfff, 0x1000)]).is_ok());
    }

    #[test]
    fn report_arg() {
        let mut b = DirtyBitmap::default();
        b.prepare(0x8000_0000, 0x40_0000, 0x1000).unwrap();
        let a = dma_logging_report_arg(&mut b);
        assert_eq!(a.hdr.argsz, 40);
        assert_eq!(a.hdr.flags, (1 << 16) | 8);
        assert_eq!(a.report.iova, 0x8000_0000);
        assert_eq!(a.report.length, 0x40_0000);
        assert_eq!(a.report.page_size, 0x1000);
        assert_eq!(a.report.bitmap, b.words_mut().as_mut_ptr() as u64);
    }

    #[test]
    fn mig_state_args() {
        let s = mig_state_set_arg(StopCopy);
        assert_eq!(s.hdr.argsz, 16);
        assert_eq!(s.hdr.flags, (1 << 17) | 2);
        assert_eq!((s.state.device_state, s.state.data_fd), (3, -1));
        let g = mig_state_get_arg();
        assert_eq!(g.hdr.flags, (1 << 16) | 2);
        assert_eq!((g.state.device_state, g.state.data_fd), (0, -1));
        let m = migration_get_arg();
        assert_eq!(
            (m.hdr.argsz, m.hdr.flags, m.mig.flags),
            (16, (1 << 16) | 1, 0)
        );
    }

    #[test]
    fn states_round_trip_their_numbers() {
        for (i, s) in ALL.into_iter().enumerate() {
            assert_eq!(s as u32, i as u32);
            assert_eq!(MigState::from_raw(i as u32), Some(s));
        }
        assert_eq!(MigState::from_raw(8), None);
    }

    #[test]
    fn the_arcs_are_steps() {
        for path in [&SOURCE_ARC[..], &SOURCE_ARC_NO_PRECOPY, &DESTINATION_ARC] {
            for w in path.windows(2) {
                assert_eq!(
                    w[0].check_step(w[1], FULL),
                    Ok(()),
                    "{:?} -> {:?}",
                    w[0],
                    w[1]
                );
            }
        }
        // STOP_COPY alone is enough for the no-precopy source and the destination.
        for path in [&SOURCE_ARC_NO_PRECOPY[..], &DESTINATION_ARC] {
            for w in path.windows(2) {
                assert_eq!(w[0].check_step(w[1], VFIO_MIGRATION_STOP_COPY), Ok(()));
            }
        }
    }

    #[test]
    fn forbidden_steps() {
        let illegal = |from: MigState, to: MigState| {
            assert_eq!(
                from.check_step(to, FULL),
                Err(MigrationError::Illegal { from, to }),
                "{from:?} -> {to:?}"
            );
        };
        illegal(StopCopy, PreCopy);
        illegal(StopCopy, PreCopyP2p);
        illegal(StopCopy, Running);
        illegal(Resuming, Running);
        illegal(Running, StopCopy);
        illegal(Running, Resuming);
        illegal(PreCopy, Stop);
        for s in ALL {
            illegal(Error, s);
            illegal(s, Error);
        }
    }

    #[test]
    fn steps_need_the_device_capability() {
        assert_eq!(
            Running.check_step(PreCopy, VFIO_MIGRATION_STOP_COPY),
            Err(MigrationError::Unsupported(PreCopy))
        );
        assert_eq!(
            Running.check_step(RunningP2p, VFIO_MIGRATION_STOP_COPY),
            Err(MigrationError::Unsupported(RunningP2p))
        );
        assert_eq!(
            PreCopy.check_step(
                PreCopyP2p,
                VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY
            ),
            Err(MigrationError::Unsupported(PreCopyP2p))
        );
        assert_eq!(
            Stop.check_step(StopCopy, 0),
            Err(MigrationError::Unsupported(StopCopy))
        );
    }

    #[test]
    fn step_table_is_exactly_these_arcs() {
        let mut n = 0;
        for a in ALL {
            for b in ALL {
                if a.is_step(b) {
                    n += 1;
                    assert_ne!(a, b);
                }
            }
        }
        assert_eq!(n, 18);
    }

    #[test]
    fn data_fds_come_from_these_steps() {
        for a in ALL {
            for b in ALL {
                let opens = a.opens_data_fd(b);
                assert!(!opens || a.is_step(b), "{a:?} -> {b:?}");
                assert_eq!(
                    opens,
                    matches!(
                        (a, b),
                        (Running, PreCopy)
                            | (RunningP2p, PreCopyP2p)
                            | (Stop, StopCopy)
                            | (Stop, Resuming)
                    )
                );
            }
        }
        // The saving group shares one stream: PRE_COPY → STOP_COPY opens none.
        assert!(!PreCopy.opens_data_fd(StopCopy));
    }

    /// An illegal step never reaches the fd: /dev/null would answer ENOTTY.
    #[test]
    fn illegal_step_is_refused_before_the_ioctl() {
        let f = File::open("/dev/null").unwrap();
        let mut m = Migration::with_known(f, VFIO_MIGRATION_STOP_COPY, StopCopy);
        assert_eq!(
            m.step(PreCopy).unwrap_err(),
            MigrationError::Illegal {
                from: StopCopy,
                to: PreCopy
            }
        );
        assert_eq!(m.state(), StopCopy);
        assert!(m.step(StopCopy).unwrap().is_none(), "no-op");
        // A legal step does reach it, and its refusal is the kernel's errno; the state is
        // then unknown (the refresh fails too).
        let e = m.step(Stop).unwrap_err();
        assert_eq!(
            e,
            MigrationError::Backend(BackendError {
                op: OP_MIG_STATE,
                errno: libc::ENOTTY
            })
        );
        assert_eq!(m.state(), Error);
    }

    #[test]
    fn a_fd_that_is_not_a_device_has_no_logging() {
        let f = File::open("/dev/null").unwrap();
        let mut log = DeviceLog::new(f);
        assert_eq!(log.supported(), Ok(false));
        // Refused before the ioctl: bad ranges, a report before start.
        assert_eq!(log.start(0x1000, &[]), Err(refused(OP_START, libc::EINVAL)));
        let mut b = DirtyBitmap::default();
        b.prepare(0, 0x1000, 0x1000).unwrap();
        assert_eq!(log.report(&mut b), Err(refused(OP_REPORT, libc::EINVAL)));
        // Reaches the fd: the errno comes back as is.
        assert_eq!(
            log.start(0x1000, &[r(0, 0x1000)]),
            Err(refused(OP_START, libc::ENOTTY))
        );
        assert!(!log.is_logging());
        assert!(Migration::new(File::open("/dev/null").unwrap()).is_err());
    }
}
