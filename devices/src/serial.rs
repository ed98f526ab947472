//! COM1: a 16550 (vm-superio) whose output goes to the sink the user chose, with a
//! counter of bytes the guest sent.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::{PioDevice, PlatformEvent};

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// An interrupt line as an eventfd (wired to the irqchip with an irqfd by the VMM).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Serial counters shared with the API (`vm.counters`).
#[derive(Debug, Default)]
pub struct SerialCounters {
    pub out_bytes: AtomicU64,
    pub lost_bytes: AtomicU64,
}

#[derive(Clone)]
struct Events(Arc<SerialCounters>);

impl SerialEvents for Events {
    fn buffer_read(&self) {}
    fn out_byte(&self) {
        self.0.out_bytes.fetch_add(1, Ordering::Relaxed);
    }
    fn tx_lost_byte(&self) {
        self.0.lost_bytes.fetch_add(1, Ordering::Relaxed);
    }
    fn in_buffer_empty(&self) {}
}

pub struct Serial {
    inner: vm_superio::Serial<EventFdTrigger, Events, Box<dyn Write + Send>>,
    counters: Arc<SerialCounters>,
}

impl Serial {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        let counters = Arc::new(SerialCounters::default());
        let inner =
            vm_superio::Serial::with_events(EventFdTrigger(irq), Events(counters.clone()), out);
        Serial { inner, counters }
    }

    pub fn counters(&self) -> Arc<SerialCounters> {
        self.counters.clone()
    }
}

impl PioDevice for Serial {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.inner.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<PlatformEvent> {
        if let Some(b) = data.first() {
            if let Err(e) = self.inner.write(offset as u8, *b) {
                log::warn!("serial write failed: {e:?}");
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_reach_the_sink_and_are_counted() {
        let sink = Sink::default();
        let mut s = Serial::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert_eq!(s.counters().out_bytes.load(Ordering::Relaxed), 3);
        // LSR says the transmitter is empty, so polling guests go on.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
