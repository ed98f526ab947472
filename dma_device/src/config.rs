// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! The device's PCI configuration space (region 7): a type-0 header with the contract's
//! IDs, a writable command register (memory space and bus master) and BAR 0, a 32-bit
//! non-prefetchable memory BAR of [`BAR0_SIZE`] bytes. No capabilities, no interrupts.

use guest_pattern::user_device::{BAR0_SIZE, CLASS_CODE, DEVICE_ID, VENDOR_ID};
use vfio_dirty::vfio_user::server::Errno;

/// Bytes of configuration space.
pub const CONFIG_BYTES: u64 = 256;
pub const COMMAND: usize = 0x04;
pub const CLASS_REVISION: usize = 0x08;
pub const BAR0: usize = 0x10;
/// Command register bits: memory space, bus master.
pub const CMD_MEMORY: u16 = 1 << 1;
pub const CMD_BUS_MASTER: u16 = 1 << 2;
/// The command bits that stick; the others read as zero.
pub const CMD_WRITABLE: u16 = CMD_MEMORY | CMD_BUS_MASTER;
/// The address bits of BAR 0 (the rest read as its type: 32-bit memory, not
/// prefetchable, i.e. zero). Writing all-ones reads back this mask: the size.
pub const BAR0_MASK: u32 = !(BAR0_SIZE as u32 - 1);

/// What software can change in configuration space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigSpace {
    pub command: u16,
    pub bar0: u32,
}

impl ConfigSpace {
    /// The whole space as bytes.
    pub fn image(&self) -> [u8; CONFIG_BYTES as usize] {
        let mut c = [0u8; CONFIG_BYTES as usize];
        c[0..2].copy_from_slice(&VENDOR_ID.to_le_bytes());
        c[2..4].copy_from_slice(&DEVICE_ID.to_le_bytes());
        c[COMMAND..COMMAND + 2].copy_from_slice(&self.command.to_le_bytes());
        // Status (0x06) zero: no capability list. Revision 0, then the class code.
        c[CLASS_REVISION..CLASS_REVISION + 4].copy_from_slice(&(CLASS_CODE << 8).to_le_bytes());
        // Header type (0x0e) 0: a single-function type-0 header.
        c[BAR0..BAR0 + 4].copy_from_slice(&self.bar0.to_le_bytes());
        c
    }

    fn range(offset: u64, len: usize) -> Result<std::ops::Range<usize>, Errno> {
        let end = offset.checked_add(len as u64).ok_or(libc::EINVAL)?;
        if len == 0 || end > CONFIG_BYTES {
            return Err(libc::EINVAL);
        }
        Ok(offset as usize..end as usize)
    }

    /// Any access inside the space, of any size.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        let r = Self::range(offset, data.len())?;
        data.copy_from_slice(&self.image()[r]);
        Ok(())
    }

    /// Any access inside the space: the command register and BAR 0 take what they can,
    /// everything else ignores writes.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let r = Self::range(offset, data.len())?;
        let mut c = self.image();
        c[r].copy_from_slice(data);
        self.command = u16::from_le_bytes([c[COMMAND], c[COMMAND + 1]]) & CMD_WRITABLE;
        let bar = u32::from_le_bytes(c[BAR0..BAR0 + 4].try_into().expect("4 bytes"));
        self.bar0 = bar & BAR0_MASK;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(c: &ConfigSpace, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    #[test]
    fn header_has_the_contract_ids() {
        let c = ConfigSpace::default();
        assert_eq!(
            read32(&c, 0),
            u32::from(VENDOR_ID) | u32::from(DEVICE_ID) << 16
        );
        assert_eq!(read32(&c, 8) >> 8, CLASS_CODE);
        assert_eq!(read32(&c, 0x0c), 0);
        for bar in 0..6 {
            assert_eq!(read32(&c, 0x10 + 4 * bar), 0);
        }
        assert_eq!(read32(&c, 0x34), 0, "no capabilities");
        let mut all = [0u8; 256];
        c.read(0, &mut all).unwrap();
        assert_eq!(all, c.image());
        assert_eq!(c.read(255, &mut [0u8; 2]), Err(libc::EINVAL));
        assert_eq!(c.read(256, &mut [0u8; 1]), Err(libc::EINVAL));
        assert_eq!(c.read(u64::MAX, &mut [0u8; 4]), Err(libc::EINVAL));
    }

    #[test]
    fn bar0_sizing_and_command_bits() {
        let mut c = ConfigSpace::default();
        c.write(0x10, &u32::MAX.to_le_bytes()).unwrap();
        assert_eq!(read32(&c, 0x10), BAR0_MASK);
        assert_eq!(!BAR0_MASK + 1, BAR0_SIZE as u32);
        c.write(0x10, &0xfebf_1234u32.to_le_bytes()).unwrap();
        assert_eq!(read32(&c, 0x10), 0xfebf_1000);
        // Other BARs stay zero even when sized.
        c.write(0x14, &u32::MAX.to_le_bytes()).unwrap();
        assert_eq!(read32(&c, 0x14), 0);
        c.write(0x04, &0xffffu16.to_le_bytes()).unwrap();
        assert_eq!(read32(&c, 0x04) & 0xffff, u32::from(CMD_WRITABLE));
        c.write(0x04, &[CMD_MEMORY as u8]).unwrap();
        assert_eq!(c.command, CMD_MEMORY);
        // IDs are read-only.
        c.write(0, &[0; 4]).unwrap();
        assert_eq!(read32(&c, 0) & 0xffff, u32::from(VENDOR_ID));
        assert_eq!(c.bar0, 0xfebf_1000);
    }
}
