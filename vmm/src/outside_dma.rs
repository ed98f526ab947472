//! What vfio-user devices (`user_devices.rs`) and VFIO devices (`vfio_devices.rs`) share:
//! devices whose DMA Ferry does not see, whose dirty pages come from a tracker
//! (`vfio_dirty::DmaTracker`), and whose state lives outside Ferry. The PCI devices treat
//! both kinds alike through [`OutsideDmaDevice`]; the IOVA translations their trackers
//! need are here too.

use devices::viommu::Tables;
use vfio_dirty::{Harvest, IovaTranslator, Range};

/// A device writing guest RAM by DMA Ferry does not see.
pub trait OutsideDmaDevice {
    /// Its state as migrated.
    type State;

    fn id(&self) -> &str;
    fn slot(&self) -> u8;
    /// A migration starts or stops tracking.
    fn set_tracking(&self, on: bool) -> Result<(), String>;
    /// What it wrote since the last harvest, guest-physical.
    fn harvest(&self) -> Result<Harvest, String>;
    /// Stops its DMA (the vCPUs are parked).
    fn pause(&self) -> Result<(), String>;
    /// Runs it again, from wherever a migration left it.
    fn resume(&self) -> Result<(), String>;
    /// Its state (after `pause`).
    fn save(&self) -> Result<Self::State, String>;
    /// Takes its source's state (left stopped; `resume` runs it).
    fn restore(&self, s: &Self::State) -> Result<(), String>;
    /// (id, slot) a state names.
    fn state_names(s: &Self::State) -> (&str, u8);
}

/// What `devices` wrote since the last harvest: guest-physical ranges, and whether all of
/// RAM must be taken as dirty. A device that cannot be read is an error: the migration
/// cannot know what it wrote.
pub fn harvest_all<D: OutsideDmaDevice>(devices: &[D]) -> Result<(Vec<(u64, u64)>, bool), String> {
    let mut ranges = Vec::new();
    let mut all_ram = false;
    for d in devices {
        let h = d.harvest().map_err(|e| format!("{}: {e}", d.id()))?;
        all_ram |= h.all_ram;
        ranges.extend(h.ranges.iter().map(|r| (r.start, r.length)));
    }
    Ok((ranges, all_ram))
}

/// Every device's state, in order (after pausing them).
pub fn save_all<D: OutsideDmaDevice>(devices: &[D]) -> Result<Vec<D::State>, String> {
    devices
        .iter()
        .map(|d| {
            d.save()
                .map_err(|e| format!("{}: saving its state: {e}", d.id()))
        })
        .collect()
}

/// Gives each device its source's state, in order, and runs it. Errors name the device
/// (id, slot) and why; `kind` names the devices in a mismatch ("vfio-user devices").
pub fn restore_all<D: OutsideDmaDevice>(
    devices: &[D],
    states: &[D::State],
    kind: &str,
) -> Result<(), (String, u8, String)> {
    let ours: Vec<(&str, u8)> = devices.iter().map(|d| (d.id(), d.slot())).collect();
    let theirs: Vec<(&str, u8)> = states.iter().map(D::state_names).collect();
    if ours != theirs {
        return Err((
            kind.to_string(),
            0,
            format!("the source has {kind} {theirs:?}, this configuration makes {ours:?}"),
        ));
    }
    for (d, s) in devices.iter().zip(states) {
        d.restore(s)
            .and_then(|()| d.resume())
            .map_err(|reason| (d.id().to_string(), d.slot(), reason))?;
    }
    Ok(())
}

/// Each device, `what` it (pause/resume/tracking); a failure is logged with `why`.
pub fn each_logged<D: OutsideDmaDevice>(
    devices: &[D],
    what: &str,
    f: impl Fn(&D) -> Result<(), String>,
) {
    for d in devices {
        if let Err(e) = f(d) {
            log::error!("{}: {what}: {e}", d.id());
        }
    }
}

/// One mapping as the vIOMMU gave it: its own translation, for the read before it goes.
pub struct OneMapping {
    pub iova: u64,
    pub gpa: u64,
    pub len: u64,
}

impl IovaTranslator for OneMapping {
    fn translate(&self, iova: u64, length: u64) -> Option<Vec<Range>> {
        let end = iova.checked_add(length)?;
        (iova >= self.iova && end <= self.iova + self.len).then(|| {
            vec![Range {
                start: self.gpa + (iova - self.iova),
                length,
            }]
        })
    }
}

/// An endpoint's mappings in the vIOMMU's table (held read-locked by the caller).
pub struct EndpointMappings<'a> {
    pub tables: &'a Tables,
    pub endpoint: u32,
}

impl IovaTranslator for EndpointMappings<'_> {
    fn translate(&self, iova: u64, length: u64) -> Option<Vec<Range>> {
        let d = self.tables.endpoints.get(&self.endpoint)?.domain?;
        let runs = self
            .tables
            .domains
            .get(&d)?
            .mappings
            .translate(iova, length, false)
            .ok()?;
        Some(
            runs.into_iter()
                .map(|(start, length)| Range { start, length })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_mapping_translates_only_inside_itself() {
        let m = OneMapping {
            iova: 0x10_0000,
            gpa: 0x4000,
            len: 0x2000,
        };
        assert_eq!(
            m.translate(0x10_1000, 0x1000),
            Some(vec![Range {
                start: 0x5000,
                length: 0x1000
            }])
        );
        assert_eq!(m.translate(0x10_1000, 0x2000), None);
        assert_eq!(m.translate(0xf_f000, 0x1000), None);
        assert_eq!(m.translate(u64::MAX, 2), None);
    }
}
