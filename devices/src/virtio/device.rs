//! What a virtio device model (blk, rng, ...) implements. The transport owns the
//! registers, the interrupts and the thread; the model only describes itself and serves
//! requests, reaching guest RAM through [`GuestRam`] alone.

use virtio_queue::Queue;

use crate::guest_ram::GuestRam;

pub trait VirtioDevice: Send {
    /// The virtio device type (2 block, 4 entropy, ...).
    fn device_type(&self) -> u16;
    /// PCI class code (base, sub, interface) the function shows.
    fn pci_class(&self) -> u32;
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered; VERSION_1 must be among them.
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// DRIVER_OK with the features both sides agreed on. An error makes the device ask
    /// the driver for a reset (DEVICE_NEEDS_RESET).
    fn activate(&mut self, _features: u64) -> Result<(), String> {
        Ok(())
    }
    /// Serves the chains available in `queue` (number `index`), each ending in the used
    /// ring, a bad one with an error status where the device type has one. Returns how
    /// many chains were completed. Guest input never makes this panic.
    fn process_queue(&mut self, index: u16, queue: &mut Queue, ram: &GuestRam) -> usize;
    /// Once, when the transport is built: the eventfds that make its worker serve each
    /// queue. A device with work of its own (the vIOMMU's fault records) keeps the one it
    /// needs and writes it.
    fn queue_notifiers(&mut self, _notifiers: Vec<vmm_sys_util::eventfd::EventFd>) {}
    /// Whether queue `index`'s available buffers wait for events of the device's own (an
    /// event queue): then buffers the device did not take are no reason to serve the
    /// queue again; the device wakes it through its notifier when an event comes.
    fn buffers_wait_for_events(&self, _index: u16) -> bool {
        false
    }
    /// The driver reset the device.
    fn reset(&mut self) {}
}
