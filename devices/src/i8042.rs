//! The i8042 keyboard controller, only for its CPU-reset command (0xFE on port 0x64),
//! which guests (Linux `reboot=k`) use to reset the machine.

use crate::{PioDevice, PlatformEvent};

/// The data port; the device spans 0x60..=0x64.
pub const I8042_PORT: u16 = 0x60;
const COMMAND_OFFSET: u16 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

#[derive(Default)]
pub struct I8042;

impl PioDevice for I8042 {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; guests see an idle controller.
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<PlatformEvent> {
        (offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU))
            .then_some(PlatformEvent::Reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_only_on_command_port() {
        assert_eq!(I8042.write(4, &[0xfe]), Some(PlatformEvent::Reset));
        assert_eq!(I8042.write(0, &[0xfe]), None);
        assert_eq!(I8042.write(4, &[0xd1]), None);
    }
}
