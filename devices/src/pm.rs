//! The ACPI PM1a event block (status/enable, read as zero: no events are ever raised)
//! and control register, enough for a guest to power off (S5): the FADT points guests
//! here, and writing SLP_EN with SLP_TYP = 5 ends the VM.

use crate::{PioDevice, PlatformEvent};

/// PM1a event block (4 bytes), followed by the control register (2 bytes).
pub const ACPI_PM1A_EVT_PORT: u16 = 0x600;
pub const ACPI_PM1A_CNT_PORT: u16 = 0x604;
/// Ports the device decodes from [`ACPI_PM1A_EVT_PORT`].
pub const ACPI_PM_PORTS: u16 = 6;
const CNT_OFFSET: u16 = ACPI_PM1A_CNT_PORT - ACPI_PM1A_EVT_PORT;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
/// The S5 sleep type the DSDT's `_S5_` object advertises.
pub const S5_SLP_TYP: u16 = 5;

#[derive(Default)]
pub struct AcpiPmControl {
    value: u16,
}

impl AcpiPmControl {
    /// The control register (migration state).
    pub fn value(&self) -> u16 {
        self.value
    }

    pub fn with_value(value: u16) -> Self {
        AcpiPmControl { value }
    }
}

impl PioDevice for AcpiPmControl {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if offset < CNT_OFFSET {
            data.fill(0);
            return;
        }
        let v = self.value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<PlatformEvent> {
        if offset != CNT_OFFSET || data.len() < 2 {
            return None;
        }
        self.value = u16::from_le_bytes([data[0], data[1]]) & !SLP_EN;
        let v = u16::from_le_bytes([data[0], data[1]]);
        (v & SLP_EN != 0 && (v >> SLP_TYP_SHIFT) & 7 == S5_SLP_TYP)
            .then_some(PlatformEvent::PowerOff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off() {
        let mut pm = AcpiPmControl::default();
        let v = (S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN;
        assert_eq!(
            pm.write(CNT_OFFSET, &v.to_le_bytes()),
            Some(PlatformEvent::PowerOff)
        );
        assert_eq!(
            pm.write(0, &v.to_le_bytes()),
            None,
            "event block writes are ignored"
        );
        let v = S5_SLP_TYP << SLP_TYP_SHIFT;
        assert_eq!(pm.write(CNT_OFFSET, &v.to_le_bytes()), None);
        let mut r = [0u8; 2];
        pm.read(CNT_OFFSET, &mut r);
        assert_eq!(u16::from_le_bytes(r), v);
        pm.read(0, &mut r);
        assert_eq!(r, [0, 0], "no ACPI events pending");
    }
}
