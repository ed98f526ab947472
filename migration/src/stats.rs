//! Migration statistics, shaped like QEMU's `query-migrate` answer so that existing tooling
//! reads Ferry's `vm.migration-info`, plus Ferry's own dirty-tracking and per-iteration
//! figures; and [`MigrationProgress`], the live copy the engine updates while the API reads.
//!
//! Units follow QEMU: times in milliseconds, `mbps` in megabits per second, rates per second.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// `status`, with QEMU's spelling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationStatus {
    /// Connecting, handshake, configuration check.
    #[default]
    Setup,
    /// Precopy iterations while the guest runs.
    Active,
    /// Stop-and-copy: the guest is paused, last pages and device state move.
    Device,
    /// Postcopy: the guest runs on the destination while the pages it misses come.
    #[serde(rename = "postcopy-active")]
    PostcopyActive,
    /// Postcopy lost its link: the guest is paused on the destination (vCPUs waiting
    /// for a missing page count as paused) and the source keeps the pages it still
    /// misses; neither side may run it on its own.
    #[serde(rename = "postcopy-paused")]
    PostcopyPaused,
    Completed,
    Failed,
    Cancelled,
}

impl MigrationStatus {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

/// `ram`: QEMU's `MigrationStats`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes sent on the wire (pages, markers, headers).
    pub transferred: u64,
    /// Bytes of RAM still to send (dirty pages known and not yet sent).
    pub remaining: u64,
    /// Guest RAM size in bytes.
    pub total: u64,
    /// Zero pages, sent as markers.
    pub duplicate: u64,
    /// Pages sent with their data.
    pub normal: u64,
    pub normal_bytes: u64,
    /// Pages dirtied per second, measured over the last iteration.
    pub dirty_pages_rate: u64,
    /// Postcopy: pages the destination asked for because someone waited for them.
    #[serde(default)]
    pub postcopy_requests: u64,
    /// Throughput of the last iteration, megabits per second.
    pub mbps: f64,
    /// Dirty-log collections so far.
    pub dirty_sync_count: u64,
    /// Bytes sent while the guest ran.
    pub precopy_bytes: u64,
    /// Bytes sent while the guest was paused.
    pub downtime_bytes: u64,
    pub page_size: u64,
    /// Pages sent per second over the last iteration.
    pub pages_per_second: u64,
}

/// How dirty pages are tracked on the source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirtyTrackingMode {
    #[default]
    Ring,
    Bitmap,
}

/// `dirty-tracking`: Ferry's own figures, filled in by the vmm through the source VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DirtyTrackingStats {
    pub mode: DirtyTrackingMode,
    /// Entries per vCPU ring (0 in bitmap mode).
    pub ring_entries: u32,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits so far.
    pub ring_full_exits: u64,
    /// Whether KVM's backup bitmap (`DIRTY_LOG_RING_WITH_BITMAP`) is collected last.
    pub backup_bitmap: bool,
    /// Pages each source reported dirty over the migration's collections.
    #[serde(default)]
    pub sources: DirtySourceStats,
}

/// `dirty-tracking.sources`: pages each source of dirty pages reported, summed over the
/// collections (a page two sources report counts in both).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DirtySourceStats {
    /// KVM's log: the vCPUs' dirty rings or the dirty bitmap (with the backup bitmap).
    pub kvm: u64,
    /// The VMM's own writes: devices not behind the vIOMMU, and the VMM itself.
    pub devices: u64,
    /// DMA of devices behind the virtio-iommu, translated IOVA to guest-physical.
    pub viommu_dma: u64,
    /// Of those, pages the vIOMMU's footprint rules made dirty (an endpoint leaving its
    /// domain during tracking, a device that cannot report its writes).
    pub viommu_footprint: u64,
    /// DMA of vfio-user devices, from their own logs, translated to guest-physical.
    #[serde(default)]
    pub user_devices: u64,
    /// DMA of VFIO devices, from their DMA logs or their IOMMU domains' dirty bits.
    #[serde(default)]
    pub vfio_devices: u64,
}

/// One precopy pass (iteration 0 is the full copy; the last one runs paused).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct IterationStats {
    pub iteration: u32,
    /// Pages sent in this pass (zero and data).
    pub pages: u64,
    /// Bytes sent on the wire in this pass.
    pub bytes: u64,
    pub duration_ms: u64,
    /// Pages found dirty when the pass ended (the next pass's work).
    pub dirty_pages: u64,
}

/// The whole `vm.migration-info` answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    pub status: MigrationStatus,
    /// Milliseconds since the migration started (until it ended, once finished).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_time: Option<u64>,
    /// Milliseconds of setup: connection, handshake, configuration check, dirty-log start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_time: Option<u64>,
    /// Milliseconds from the source's pause to the destination's resume (once completed),
    /// rounded up: never less than the guest was paused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    /// The same in microseconds: a pause of about a millisecond is 1 or 2 in `downtime`,
    /// depending on whether it went past a whole millisecond.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_us: Option<u64>,
    /// Milliseconds the stop-and-copy would take now, at the measured bandwidth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_downtime: Option<u64>,
    /// How much of their time the source's vCPUs are held back (auto-converge), in
    /// percent; absent while they run freely.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_percentage: Option<u8>,
    pub ram: RamStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_tracking: Option<DirtyTrackingStats>,
    pub iterations: Vec<IterationStats>,
    /// Why the migration failed or was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
}

impl MigrationInfo {
    /// Records a downtime of `us` microseconds (`downtime` and `downtime-us`).
    pub fn set_downtime_us(&mut self, us: u64) {
        self.downtime = Some(us.div_ceil(1000));
        self.downtime_us = Some(us);
    }

    /// Takes the source's own clock (its `Measured` message): the pause until `Resumed`
    /// reached it and the whole migration, so that both sides report the same figures.
    pub fn take_measured(&mut self, downtime_us: u64, total_us: u64) {
        self.set_downtime_us(downtime_us);
        self.total_time = Some(total_us / 1000);
    }
}

struct ProgressInner {
    info: Mutex<MigrationInfo>,
    cancelled: AtomicBool,
    postcopy_requested: AtomicBool,
    started: Instant,
}

/// A migration's live statistics and its cancel switch, shared between the engine (which
/// updates it) and the API (which reads and cancels). Cloning shares the same migration.
#[derive(Clone)]
pub struct MigrationProgress {
    inner: Arc<ProgressInner>,
}

impl Default for MigrationProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl MigrationProgress {
    /// A migration starting now, in `setup`.
    pub fn new() -> Self {
        let info = MigrationInfo {
            ram: RamStats {
                page_size: crate::protocol::PAGE_SIZE as u64,
                ..RamStats::default()
            },
            ..MigrationInfo::default()
        };
        MigrationProgress {
            inner: Arc::new(ProgressInner {
                info: Mutex::new(info),
                cancelled: AtomicBool::new(false),
                postcopy_requested: AtomicBool::new(false),
                started: Instant::now(),
            }),
        }
    }

    /// A copy of the figures now; `total-time` runs until the migration finishes.
    pub fn snapshot(&self) -> MigrationInfo {
        let mut info = self.lock().clone();
        if !info.status.is_finished() {
            info.total_time = Some(self.elapsed_ms());
        }
        info
    }

    /// `vm.migration-info` as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.snapshot()).unwrap_or(serde_json::Value::Null)
    }

    /// Asks the migration to stop; the engine notices between chunks and messages.
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::Acquire)
    }

    /// Asks the source to switch to postcopy after its current pass (QMP's
    /// `migrate-start-postcopy`); it does when the destination can.
    pub fn request_postcopy(&self) {
        self.inner.postcopy_requested.store(true, Ordering::Release);
    }

    pub fn postcopy_requested(&self) -> bool {
        self.inner.postcopy_requested.load(Ordering::Acquire)
    }

    pub fn status(&self) -> MigrationStatus {
        self.lock().status
    }

    /// Milliseconds since [`MigrationProgress::new`].
    pub fn elapsed_ms(&self) -> u64 {
        self.inner.started.elapsed().as_millis() as u64
    }

    /// Changes the figures under the lock (keep `f` short: the API waits on it).
    pub fn update<T>(&self, f: impl FnOnce(&mut MigrationInfo) -> T) -> T {
        f(&mut self.lock())
    }

    /// Replaces all figures, e.g. with the source's on the destination after completion.
    pub fn replace(&self, info: MigrationInfo) {
        *self.lock() = info;
    }

    /// Moves to a new status; a finished status also freezes `total-time`.
    pub fn set_status(&self, status: MigrationStatus) {
        let total = self.elapsed_ms();
        self.update(|info| {
            info.status = status;
            if status.is_finished() {
                info.total_time = Some(total);
                if status == MigrationStatus::Completed {
                    info.ram.remaining = 0;
                    info.expected_downtime = None;
                }
            }
        });
    }

    /// Marks the migration failed (or cancelled) with its reason.
    pub fn fail(&self, status: MigrationStatus, reason: &str) {
        self.update(|info| info.error_desc = Some(reason.to_string()));
        self.set_status(status);
    }

    fn lock(&self) -> MutexGuard<'_, MigrationInfo> {
        // A panic elsewhere while holding the lock leaves plain numbers: still readable.
        self.inner.info.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_with_query_migrate_names() {
        let p = MigrationProgress::new();
        p.update(|i| {
            i.ram.total = 1 << 30;
            i.ram.normal_bytes = 4096;
            i.dirty_tracking = Some(DirtyTrackingStats {
                mode: DirtyTrackingMode::Ring,
                ring_entries: 65536,
                ring_full_exits: 2,
                backup_bitmap: false,
                sources: DirtySourceStats {
                    kvm: 5,
                    viommu_dma: 3,
                    ..Default::default()
                },
            });
            i.iterations.push(IterationStats {
                iteration: 0,
                pages: 1,
                bytes: 2,
                duration_ms: 3,
                dirty_pages: 4,
            });
            i.expected_downtime = Some(5);
        });
        let v = p.to_json();
        assert_eq!(v["status"], "setup");
        assert!(v["total-time"].is_u64());
        assert_eq!(v["expected-downtime"], 5);
        let src = &v["dirty-tracking"]["sources"];
        assert_eq!(
            (src["kvm"].as_u64(), src["viommu-dma"].as_u64()),
            (Some(5), Some(3))
        );
        for key in [
            "transferred",
            "remaining",
            "total",
            "duplicate",
            "normal",
            "normal-bytes",
            "dirty-pages-rate",
            "mbps",
            "dirty-sync-count",
            "precopy-bytes",
            "downtime-bytes",
            "page-size",
            "pages-per-second",
        ] {
            assert!(v["ram"].get(key).is_some(), "ram.{key} missing in {v}");
        }
        assert_eq!(v["ram"]["page-size"], 4096);
        assert_eq!(v["dirty-tracking"]["mode"], "ring");
        assert_eq!(v["dirty-tracking"]["ring-entries"], 65536);
        assert_eq!(v["dirty-tracking"]["ring-full-exits"], 2);
        assert_eq!(v["dirty-tracking"]["backup-bitmap"], false);
        assert_eq!(v["iterations"][0]["duration-ms"], 3);
        assert_eq!(v["iterations"][0]["dirty-pages"], 4);
        let back: MigrationInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back.ram.total, 1 << 30);
    }

    #[test]
    fn statuses_and_cancel() {
        let p = MigrationProgress::new();
        let api = p.clone();
        assert!(!api.is_cancelled());
        api.cancel();
        assert!(p.is_cancelled());
        for (s, name) in [
            (MigrationStatus::Active, "active"),
            (MigrationStatus::Device, "device"),
            (MigrationStatus::Completed, "completed"),
            (MigrationStatus::Failed, "failed"),
            (MigrationStatus::Cancelled, "cancelled"),
        ] {
            p.set_status(s);
            assert_eq!(api.to_json()["status"], name);
        }
        p.fail(MigrationStatus::Failed, "link down");
        let v = api.to_json();
        assert_eq!(v["error-desc"], "link down");
        let frozen = v["total-time"].as_u64().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(api.to_json()["total-time"].as_u64().unwrap(), frozen);
    }

    #[test]
    fn the_sources_measures_replace_both_figures() {
        let mut info = MigrationInfo {
            total_time: Some(7),
            ..Default::default()
        };
        info.set_downtime_us(900);
        // 41_001 us is 42 ms rounded up; the total is whole ms rounded down, as QEMU's.
        info.take_measured(41_001, 2_345_999);
        assert_eq!(
            (info.downtime, info.downtime_us, info.total_time),
            (Some(42), Some(41_001), Some(2345))
        );
    }
}
