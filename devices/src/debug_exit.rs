//! The debug-exit port, where QEMU's isa-debug-exit sits: a byte V written there ends the
//! VMM with status V (QEMU makes it (V << 1) | 1; Ferry keeps V as is).

use crate::{PioDevice, PlatformEvent};

pub const DEBUG_EXIT_PORT: u16 = 0xf4;

#[derive(Default)]
pub struct DebugExit;

impl PioDevice for DebugExit {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) -> Option<PlatformEvent> {
        data.first().map(|v| PlatformEvent::DebugExit(*v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_byte_is_the_status() {
        assert_eq!(
            DebugExit.write(0, &[3, 0, 0, 0]),
            Some(PlatformEvent::DebugExit(3))
        );
        assert_eq!(DebugExit.write(0, &[]), None);
    }
}
