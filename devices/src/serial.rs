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

/// The 16550's registers as plain data, for migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialSnapshot {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for vm_superio::serial::SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
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

    /// A serial port continuing from `state` (the destination of a migration).
    pub fn from_snapshot(
        irq: EventFd,
        out: Box<dyn Write + Send>,
        state: &SerialSnapshot,
    ) -> std::result::Result<Self, String> {
        let counters = Arc::new(SerialCounters::default());
        let inner = vm_superio::Serial::from_state(
            &state.into(),
            EventFdTrigger(irq),
            Events(counters.clone()),
            out,
        )
        .map_err(|e| format!("serial state refused: {e:?}"))?;
        Ok(Serial { inner, counters })
    }

    pub fn snapshot(&self) -> SerialSnapshot {
        self.inner.state().into()
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
        // Registers survive a snapshot round trip.
        s.write(7, &[0x5a]);
        let snap = s.snapshot();
        let mut t =
            Serial::from_snapshot(EventFd::new(0).unwrap(), Box::new(sink.clone()), &snap).unwrap();
        let mut scratch = [0u8];
        t.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
    }
}
