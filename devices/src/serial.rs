//! COM1: a 16550 (vm-superio) whose output goes to the sink the user chose, with a
//! counter of bytes the guest sent.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::Trigger;

use crate::{PioDevice, PlatformEvent};

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// How the port raises its interrupt: the VMM's pulse of the irqchip pin. The VMM pulses
/// it synchronously (KVM_IRQ_LINE), so that the interrupt is in the local APIC when the
/// guest's port access that raised it returns: through an irqfd, KVM would inject it
/// later from a kernel worker, possibly after a migration saved that vCPU's state, and
/// the edge would be in no saved state.
pub struct IrqLine(pub Box<dyn Fn() -> std::io::Result<()> + Send + Sync>);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        (self.0)()
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
    inner: vm_superio::Serial<IrqLine, Events, Box<dyn Write + Send>>,
    counters: Arc<SerialCounters>,
}

impl Serial {
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> Self {
        let counters = Arc::new(SerialCounters::default());
        let inner = vm_superio::Serial::with_events(irq, Events(counters.clone()), out);
        Serial { inner, counters }
    }

    /// A serial port continuing from `state` (the destination of a migration).
    pub fn from_snapshot(
        irq: IrqLine,
        out: Box<dyn Write + Send>,
        state: &SerialSnapshot,
    ) -> std::result::Result<Self, String> {
        let counters = Arc::new(SerialCounters::default());
        let inner =
            vm_superio::Serial::from_state(&state.into(), irq, Events(counters.clone()), out)
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
        let pulses = Arc::new(AtomicU64::new(0));
        let line = |p: &Arc<AtomicU64>| {
            let p = p.clone();
            IrqLine(Box::new(move || {
                p.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }))
        };
        let mut s = Serial::new(line(&pulses), Box::new(sink.clone()));
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
        let mut t = Serial::from_snapshot(line(&pulses), Box::new(sink.clone()), &snap).unwrap();
        let mut scratch = [0u8];
        t.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        // With the transmitter-empty interrupt enabled (IER bit 1), each byte pulses the line.
        let before = pulses.load(Ordering::Relaxed);
        t.write(1, &[0x02]);
        t.write(0, b"x");
        assert!(pulses.load(Ordering::Relaxed) > before);
    }
}
