//! The ACPI PM1a event block and control register: the fixed-feature power button
//! (`vm.power-button` sets PWRBTN_STS; with PWRBTN_EN set the SCI line is raised until the
//! guest clears the status) and power-off (S5): the FADT points guests here, and writing
//! SLP_EN with SLP_TYP = 5 ends the VM.

use crate::{PioDevice, PlatformEvent};

/// PM1a event block (status, then enable: 2 bytes each), followed by the control register.
pub const ACPI_PM1A_EVT_PORT: u16 = 0x600;
pub const ACPI_PM1A_CNT_PORT: u16 = 0x604;
/// Ports the device decodes from [`ACPI_PM1A_EVT_PORT`].
pub const ACPI_PM_PORTS: u16 = 6;
/// Where each 2-byte register starts in the block.
const STS_OFFSET: u16 = 0;
const EN_OFFSET: u16 = 2;
const CNT_OFFSET: u16 = ACPI_PM1A_CNT_PORT - ACPI_PM1A_EVT_PORT;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
/// The S5 sleep type the DSDT's `_S5_` object advertises.
pub const S5_SLP_TYP: u16 = 5;
/// PM1 status and enable: the power button's bit (ACPI 6, 4.8.3.1).
pub const PWRBTN: u16 = 1 << 8;
/// The only event bits this device has; the others read as zero and ignore writes.
const EVENTS: u16 = PWRBTN;

/// Raises (true) or lowers the SCI interrupt line.
pub type SciLine = Box<dyn Fn(bool) + Send>;

/// The PM1a registers as migrated: control, event status, event enable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcpiPmState {
    pub control: u16,
    pub status: u16,
    pub enable: u16,
}

pub struct AcpiPm {
    state: AcpiPmState,
    sci: SciLine,
}

impl AcpiPm {
    /// A device in `state` (a received VM's, or the default), its SCI on `sci`.
    pub fn new(state: AcpiPmState, sci: SciLine) -> Self {
        let state = AcpiPmState {
            control: state.control & !SLP_EN,
            status: state.status & EVENTS,
            enable: state.enable & EVENTS,
        };
        let pm = AcpiPm { state, sci };
        pm.update_sci();
        pm
    }

    /// The registers (migration state).
    pub fn state(&self) -> AcpiPmState {
        self.state
    }

    /// Presses the fixed-feature power button: PWRBTN_STS is set (a guest that enabled
    /// the event gets an SCI; one that did not may poll the status).
    pub fn press_power_button(&mut self) {
        self.state.status |= PWRBTN;
        self.update_sci();
    }

    /// The SCI is a level: high while an enabled event's status is set.
    fn update_sci(&self) {
        (self.sci)(self.state.status & self.state.enable != 0);
    }
}

impl AcpiPm {
    /// The register byte at `at` (0-5: status, enable, control, low byte first).
    fn byte(&self, at: u16) -> u8 {
        let reg = match at & !1 {
            STS_OFFSET => self.state.status,
            EN_OFFSET => self.state.enable,
            CNT_OFFSET => self.state.control,
            _ => return 0,
        };
        reg.to_le_bytes()[usize::from(at % 2)]
    }
}

impl PioDevice for AcpiPm {
    // Byte by byte, so that any access width and alignment reaches the registers it
    // covers (a 4-byte access at 0 is status and enable together).
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = offset.checked_add(i as u16).map_or(0, |at| self.byte(at));
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<PlatformEvent> {
        let (mut clear, mut enable, mut control) = (
            [0u8; 2],
            self.state.enable.to_le_bytes(),
            self.state.control.to_le_bytes(),
        );
        let mut wrote_control = false;
        for (i, &d) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u16) else {
                break;
            };
            let b = usize::from(at % 2);
            match at & !1 {
                STS_OFFSET => clear[b] = d,
                EN_OFFSET => enable[b] = d,
                CNT_OFFSET => {
                    control[b] = d;
                    wrote_control = true;
                }
                _ => {}
            }
        }
        // Status: write 1 to clear.
        self.state.status &= !u16::from_le_bytes(clear);
        self.state.enable = u16::from_le_bytes(enable) & EVENTS;
        self.update_sci();
        if !wrote_control {
            return None;
        }
        let v = u16::from_le_bytes(control);
        self.state.control = v & !SLP_EN;
        (v & SLP_EN != 0 && (v >> SLP_TYP_SHIFT) & 7 == S5_SLP_TYP)
            .then_some(PlatformEvent::PowerOff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A device whose SCI level changes are recorded.
    fn pm() -> (AcpiPm, Arc<Mutex<Vec<bool>>>) {
        let levels = Arc::new(Mutex::new(Vec::new()));
        let l = levels.clone();
        let pm = AcpiPm::new(
            AcpiPmState::default(),
            Box::new(move |v| l.lock().unwrap().push(v)),
        );
        (pm, levels)
    }

    fn read16(pm: &mut AcpiPm, offset: u16) -> u16 {
        let mut r = [0u8; 2];
        pm.read(offset, &mut r);
        u16::from_le_bytes(r)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut pm, _) = pm();
        let v = (S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN;
        assert_eq!(
            pm.write(CNT_OFFSET, &v.to_le_bytes()),
            Some(PlatformEvent::PowerOff)
        );
        assert_eq!(pm.write(STS_OFFSET, &v.to_le_bytes()), None);
        let v = S5_SLP_TYP << SLP_TYP_SHIFT;
        assert_eq!(pm.write(CNT_OFFSET, &v.to_le_bytes()), None);
        assert_eq!(read16(&mut pm, CNT_OFFSET), v);
        assert_eq!(read16(&mut pm, STS_OFFSET), 0, "no ACPI events pending");
    }

    #[test]
    fn the_power_button_raises_the_sci_while_enabled_until_cleared() {
        let (mut pm, levels) = pm();
        pm.press_power_button();
        assert_eq!(
            read16(&mut pm, STS_OFFSET),
            PWRBTN,
            "status set even if disabled"
        );
        assert!(
            !*levels.lock().unwrap().last().unwrap(),
            "not enabled: no SCI"
        );
        pm.write(EN_OFFSET, &PWRBTN.to_le_bytes());
        assert_eq!(read16(&mut pm, EN_OFFSET), PWRBTN);
        assert!(
            *levels.lock().unwrap().last().unwrap(),
            "enabled and pending: SCI high"
        );
        // Writing 0 clears nothing; writing the bit clears it and lowers the SCI.
        pm.write(STS_OFFSET, &0u16.to_le_bytes());
        assert_eq!(read16(&mut pm, STS_OFFSET), PWRBTN);
        pm.write(STS_OFFSET, &PWRBTN.to_le_bytes());
        assert_eq!(read16(&mut pm, STS_OFFSET), 0);
        assert!(!*levels.lock().unwrap().last().unwrap());
        // Unknown bits neither stick in the enable register nor pend.
        pm.write(EN_OFFSET, &0xffffu16.to_le_bytes());
        assert_eq!(read16(&mut pm, EN_OFFSET), PWRBTN);
        // Byte-wide access to the high byte of the status register.
        pm.press_power_button();
        let mut hi = [0u8];
        pm.read(STS_OFFSET + 1, &mut hi);
        assert_eq!(hi[0], (PWRBTN >> 8) as u8);
        pm.write(STS_OFFSET + 1, &hi);
        assert_eq!(read16(&mut pm, STS_OFFSET), 0);
    }

    #[test]
    fn a_dword_at_the_event_block_reaches_status_and_enable() {
        let (mut pm, levels) = pm();
        pm.press_power_button();
        // Enable PWRBTN and clear nothing, in one 4-byte write.
        let v = u32::from(PWRBTN) << 16;
        pm.write(STS_OFFSET, &v.to_le_bytes());
        assert!(*levels.lock().unwrap().last().unwrap());
        let mut r = [0u8; 4];
        pm.read(STS_OFFSET, &mut r);
        assert_eq!(
            u32::from_le_bytes(r),
            u32::from(PWRBTN) << 16 | u32::from(PWRBTN)
        );
        // Clear the status, keep the enable.
        let v = u32::from(PWRBTN) << 16 | u32::from(PWRBTN);
        pm.write(STS_OFFSET, &v.to_le_bytes());
        pm.read(STS_OFFSET, &mut r);
        assert_eq!(u32::from_le_bytes(r), u32::from(PWRBTN) << 16);
        assert!(!*levels.lock().unwrap().last().unwrap());
        // Past the block: nothing.
        let mut b = [0xffu8; 2];
        pm.read(6, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn a_migrated_state_keeps_a_pending_press_and_its_line() {
        let levels = Arc::new(Mutex::new(Vec::new()));
        let l = levels.clone();
        let state = AcpiPmState {
            control: SLP_EN | 0x1,
            status: PWRBTN | 0x1,
            enable: PWRBTN | 0x4000,
        };
        let pm = AcpiPm::new(state, Box::new(move |v| l.lock().unwrap().push(v)));
        assert_eq!(
            pm.state(),
            AcpiPmState {
                control: 0x1,
                status: PWRBTN,
                enable: PWRBTN
            }
        );
        assert_eq!(*levels.lock().unwrap(), vec![true]);
    }
}
