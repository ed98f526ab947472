//! virtio-rng, the entropy device (virtio 1.2 §5.4): one queue whose device-writable
//! buffers the device fills from a host source (`/dev/urandom`, opened by the VMM),
//! through [`GuestRam`] so the bytes are in the migration's dirty log.

use std::io::Read;

use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::Queue;

use super::chains::{serve_chains, GuestErrorLog, Walked};
use super::device::VirtioDevice;
use crate::guest_ram::GuestRam;

/// virtio device type of an entropy device.
pub const RNG_DEVICE_TYPE: u16 = 4;
/// PCI class: unassigned (0xff), as for other virtio devices without a class of their own.
pub const RNG_PCI_CLASS: u32 = 0xff_00_00;
pub const RNG_QUEUE_SIZE: u16 = 256;
/// Bytes served per request at most: bounds the work one chain costs the host. A driver
/// that wants more asks again (Linux asks for at most a few KiB).
pub const RNG_MAX_REQUEST: usize = 64 << 10;

/// A virtio entropy device.
///
/// Each chain gets its device-writable buffers filled in order, up to
/// [`RNG_MAX_REQUEST`] bytes; the used length is the bytes written. Device-readable
/// descriptors (which the driver must not send) are skipped. A chain that does not end
/// (loop, too long, out of its table or RAM) gets nothing and a used length of 0; a buffer
/// outside RAM, or the source failing, ends the filling there.
pub struct Rng {
    source: Box<dyn Read + Send>,
    errors: GuestErrorLog,
}

impl Rng {
    /// An entropy device reading from `source` (the VMM passes `/dev/urandom` opened as a
    /// `File`).
    pub fn new(source: impl Read + Send + 'static) -> Rng {
        Rng {
            source: Box::new(source),
            errors: GuestErrorLog::new("virtio-rng"),
        }
    }

    /// How many bad requests the guest made (or source errors it got) so far.
    pub fn errors(&self) -> u64 {
        self.errors.total()
    }
}

fn serve(w: &Walked, ram: &GuestRam, source: &mut dyn Read, log: &mut GuestErrorLog) -> u32 {
    if !w.usable(log, "the queue holds", "nothing written") {
        return 0;
    }
    let mut left = RNG_MAX_REQUEST;
    let mut written = 0usize;
    let mut skipped = 0usize;
    for d in &w.descs {
        if !d.is_write_only() {
            skipped += 1;
            continue;
        }
        let want = left.min(d.len() as usize);
        if want == 0 {
            if left == 0 {
                break;
            }
            continue;
        }
        let mut src = &mut *source;
        match ram.read_from(d.addr().0, want, &mut src) {
            Ok(n) => {
                written += n;
                left -= n;
                if n < want {
                    // The source ran short: what was written is the answer.
                    break;
                }
            }
            Err(e) => {
                log.report(format_args!("head {}: {e}", w.head));
                break;
            }
        }
    }
    if skipped > 0 {
        log.report(format_args!(
            "head {}: {skipped} device-readable descriptors skipped",
            w.head
        ));
    }
    // At most RNG_MAX_REQUEST.
    written as u32
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        RNG_DEVICE_TYPE
    }

    fn pci_class(&self) -> u32 {
        RNG_PCI_CLASS
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![RNG_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC
    }

    /// No configuration space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(&mut self, index: u16, queue: &mut Queue, ram: &GuestRam) -> usize {
        if index != 0 {
            return 0;
        }
        let source = &mut *self.source;
        serve_chains(
            queue,
            ram,
            usize::from(RNG_QUEUE_SIZE),
            &mut self.errors,
            |w, ram, log| serve(w, ram, source, log),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::fuzzing::testing::{Driver, DESC, HOLE, INDIRECT, NEXT, USED, WRITE};
    use crate::virtio::fuzzing::{self, Counting, Prng};

    const BUF: u64 = 0x4_0000;

    fn serve(d: &mut Driver, r: &mut Rng) -> Vec<(u32, u32)> {
        let n = r.process_queue(0, &mut d.q, &d.ram.clone());
        let used = d.used();
        assert_eq!(used.len(), n);
        used
    }

    fn still_serves(d: &mut Driver, r: &mut Rng) {
        let head = d.chain(&[(BUF + 0x9000, 16, WRITE)]);
        assert_eq!(serve(d, r), vec![(u32::from(head), 16)]);
    }

    /// The bytes `Counting(0)` gives from the `n`th on.
    fn counting(from: usize, len: usize) -> Vec<u8> {
        (from..from + len).map(|i| i as u8).collect()
    }

    #[test]
    fn describes_itself() {
        let r = Rng::new(Counting(0));
        assert_eq!(r.device_type(), 4);
        assert_eq!(r.pci_class(), 0xff_00_00);
        assert_eq!(r.queue_max_sizes(), vec![256]);
        assert_eq!(r.features(), 1 << 32 | 1 << 28 | 1 << 29);
        let mut c = [0xee; 4];
        r.read_config(0, &mut c);
        assert_eq!(c, [0; 4]);
    }

    #[test]
    fn bytes_land_counted_and_logged() {
        let mut d = Driver::new();
        let mut r = Rng::new(Counting(0));
        d.ram.write(BUF, &[0xee; 0x3000]).unwrap();
        // 100 bytes, then 4096 from mid-page (two pages), readable ones in between skipped.
        let head = d.chain(&[
            (BUF, 100, WRITE),
            (BUF + 0x100, 64, 0),
            (BUF + 0x1800, 4096, WRITE),
        ]);
        d.clean();
        assert_eq!(serve(&mut d, &mut r), vec![(u32::from(head), 4196)]);
        assert_eq!(d.bytes(BUF, 100), counting(0, 100));
        assert_eq!(d.bytes(BUF + 100, 0x1700), vec![0xee; 0x1700]);
        assert_eq!(d.bytes(BUF + 0x1800, 4096), counting(100, 4096));
        assert_eq!(d.dirty_pages(), vec![USED, BUF, BUF + 0x1000, BUF + 0x2000]);
        assert_eq!(r.errors(), 1, "the readable descriptor was noted");
    }

    #[test]
    fn a_request_is_capped() {
        let mut d = Driver::new();
        let mut r = Rng::new(Counting(0));
        let head = d.chain(&[
            (BUF, 0x1_0000 - 16, WRITE),
            (BUF + 0x1_0000, 0x10_000, WRITE),
        ]);
        d.ram.write(BUF + 0x1_0000 + 16, &[0xee; 16]).unwrap();
        assert_eq!(
            serve(&mut d, &mut r),
            vec![(u32::from(head), RNG_MAX_REQUEST as u32)]
        );
        assert_eq!(d.bytes(BUF + 0x1_0000 + 16, 16), vec![0xee; 16]);
        still_serves(&mut d, &mut r);
    }

    #[test]
    fn bad_chains_get_nothing_and_the_queue_goes_on() {
        let mut d = Driver::new();
        let mut r = Rng::new(Counting(0));
        d.ram.write(BUF, &[0xee; 64]).unwrap();
        // A loop.
        let i = d.take(2);
        d.desc_at(DESC, i[0], BUF, 16, WRITE | NEXT, i[1]);
        d.desc_at(DESC, i[1], BUF + 16, 16, WRITE | NEXT, i[0]);
        d.publish(i[0]);
        assert_eq!(serve(&mut d, &mut r), vec![(u32::from(i[0]), 0)]);
        assert_eq!(d.bytes(BUF, 32), vec![0xee; 32]);
        still_serves(&mut d, &mut r);
        // Only device-readable descriptors.
        let head = d.chain(&[(BUF, 16, 0)]);
        assert_eq!(serve(&mut d, &mut r), vec![(u32::from(head), 0)]);
        assert_eq!(d.bytes(BUF, 16), vec![0xee; 16]);
        // A buffer in the hole ends the filling there.
        let head = d.chain(&[(BUF, 16, WRITE), (HOLE, 16, WRITE), (BUF + 32, 16, WRITE)]);
        assert_eq!(serve(&mut d, &mut r), vec![(u32::from(head), 16)]);
        assert_eq!(d.bytes(BUF + 32, 16), vec![0xee; 16]);
        still_serves(&mut d, &mut r);
        // Through an indirect table.
        let table = BUF + 0x2000;
        d.desc_at(table, 0, BUF + 0x100, 8, WRITE | NEXT, 1);
        d.desc_at(table, 1, BUF + 0x200, 8, WRITE, 0);
        let head = d.chain(&[(table, 32, INDIRECT)]);
        assert_eq!(serve(&mut d, &mut r), vec![(u32::from(head), 16)]);
    }

    #[test]
    fn a_failing_source_ends_the_request() {
        struct FailsOnce(bool);
        impl Read for FailsOnce {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if std::mem::replace(&mut self.0, false) {
                    return Err(std::io::Error::other("no entropy"));
                }
                buf.fill(1);
                Ok(buf.len())
            }
        }
        let mut d = Driver::new();
        let mut r = Rng::new(FailsOnce(true));
        let head = d.chain(&[(BUF, 16, WRITE), (BUF + 16, 16, WRITE)]);
        assert_eq!(serve(&mut d, &mut r), vec![(u32::from(head), 0)]);
        assert_eq!(r.errors(), 1);
        still_serves(&mut d, &mut r);
    }

    #[test]
    fn thousands_of_generated_chains_never_panic() {
        let mut p = Prng::new(0x5eed);
        let (mut completed, mut filled) = (0usize, 0usize);
        for i in 0..4000 {
            let input = if i % 5 == 4 {
                let n = p.below(700) as usize;
                (0..n).map(|_| p.next_u64() as u8).collect()
            } else {
                fuzzing::plausible_input(&mut p)
            };
            let run = fuzzing::descriptor_chain(&input);
            completed += run.completed;
            filled += run.used_lens.iter().filter(|&&l| l > 0).count();
        }
        assert!(completed > 4000, "{completed}");
        assert!(filled > 2000, "{filled}");
    }
}
