//! A virtio-pci function's interrupts, shared by the transport (the guest programs MSI-X
//! and reads the ISR through the BAR) and the queue worker (which signals used buffers
//! from its own thread). Lock order: the PCI device, then this; the worker takes only
//! this, so stopping a worker while holding the device cannot deadlock.

use std::sync::{Arc, Mutex, MutexGuard};

use super::common_config::NO_VECTOR;
use crate::pci::{Msix, MsixEffect, MsixTrigger};

/// Where interrupts go (KVM routes and irqfds in the VMM, a recorder in tests).
pub trait InterruptSink: Send + Sync {
    /// An MSI-X route changed, or a message is to be sent.
    fn msix(&self, effect: MsixEffect);
    /// INTx level (for drivers that do not enable MSI-X).
    fn intx(&self, level: bool);
}

pub(crate) const ISR_QUEUE: u8 = 1 << 0;
pub(crate) const ISR_CONFIG: u8 = 1 << 1;

pub(crate) struct InterruptState {
    pub msix: Msix,
    pub isr: u8,
    pub queue_vectors: Vec<u16>,
    pub config_vector: u16,
    /// The command register's Interrupt Disable bit: the function must not assert INTx
    /// (PCI 3.0 §6.2.2); the ISR still records why it would have.
    pub intx_disabled: bool,
}

/// The interrupt side of one virtio-pci function.
pub struct VirtioInterrupt {
    state: Mutex<InterruptState>,
    sink: Arc<dyn InterruptSink>,
}

impl VirtioInterrupt {
    pub(crate) fn new(msix: Msix, queues: usize, sink: Arc<dyn InterruptSink>) -> Self {
        VirtioInterrupt {
            state: Mutex::new(InterruptState {
                msix,
                isr: 0,
                queue_vectors: vec![NO_VECTOR; queues],
                config_vector: NO_VECTOR,
                intx_disabled: false,
            }),
            sink,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, InterruptState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn sink(&self) -> &dyn InterruptSink {
        &*self.sink
    }

    /// Carries out what a guest write to the MSI-X table or control asked for.
    pub(crate) fn apply(&self, effects: Vec<MsixEffect>) {
        for e in effects {
            self.sink.msix(e);
        }
    }

    /// The guest wrote the command register: with Interrupt Disable set the INTx line goes
    /// (and stays) low; cleared, it is high again if the ISR holds a reason.
    pub(crate) fn set_intx_disabled(&self, disabled: bool) {
        let mut s = self.lock();
        if s.intx_disabled == disabled {
            return;
        }
        s.intx_disabled = disabled;
        let level = !disabled && s.isr != 0 && !s.msix.enabled();
        self.sink.intx(level);
    }

    /// The device put buffers in queue `queue`'s used ring.
    pub fn signal_queue(&self, queue: u16) {
        let mut s = self.lock();
        let vector = s
            .queue_vectors
            .get(usize::from(queue))
            .copied()
            .unwrap_or(NO_VECTOR);
        self.signal(&mut s, vector, ISR_QUEUE);
    }

    /// The device changed its configuration.
    pub fn signal_config(&self) {
        let mut s = self.lock();
        let vector = s.config_vector;
        self.signal(&mut s, vector, ISR_CONFIG);
    }

    fn signal(&self, s: &mut InterruptState, vector: u16, isr: u8) {
        if s.msix.enabled() {
            if vector == NO_VECTOR {
                return;
            }
            if let MsixTrigger::Send(message) = s.msix.trigger(vector) {
                self.sink.msix(MsixEffect::Send { vector, message });
            }
        } else {
            s.isr |= isr;
            if !s.intx_disabled {
                self.sink.intx(true);
            }
        }
    }
}
