//! virtio-blk (virtio 1.2 §5.2) over a raw disk image: one request queue served
//! synchronously on the queue worker, reads `pread` straight into guest RAM and writes
//! `pwrite` straight out of it, through [`GuestRam`] (so every byte landing in the guest is
//! in the migration's dirty log).
//!
//! Requests are framed the way every driver frames them: a 16-byte device-readable header
//! descriptor first, data descriptors, and a 1-byte device-writable status descriptor
//! last. Anything else from the guest is refused with `IOERR` in the status byte when the
//! chain has a device-writable last byte to put it in (see [`Block`] for the table), the
//! chain always goes back to the used ring (when its head is a descriptor and the used ring
//! is in RAM), and the queue goes on with the next chain.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;

use super::chains::{serve_chains, GuestErrorLog, Walked};
use super::device::VirtioDevice;
use crate::guest_ram::{DmaError, GuestRam};

/// virtio device type of a block device.
pub const BLOCK_DEVICE_TYPE: u16 = 2;
/// PCI class: mass storage, other.
pub const BLOCK_PCI_CLASS: u32 = 0x01_80_00;
/// The size of the request queue the device offers (the driver may pick a smaller one).
pub const BLOCK_QUEUE_SIZE: u16 = 256;
/// Sector size of the request protocol, and the logical block size the device reports.
pub const SECTOR_SIZE: u64 = 512;
/// Data descriptors per request: a full ring less the header and the status.
pub const SEG_MAX: u32 = BLOCK_QUEUE_SIZE as u32 - 2;
/// Bytes of the device id string (`VIRTIO_BLK_T_GET_ID`).
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

const HEADER_LEN: u32 = 16;
/// `struct virtio_blk_config` up to and including `secure_erase_sector_alignment`; the
/// zoned characteristics after it are zero (not offered).
const CONFIG_LEN: usize = 96;
const CONFIG_CAPACITY: usize = 0;
const CONFIG_SEG_MAX: usize = 12;
const CONFIG_BLK_SIZE: usize = 20;

/// Why a block device could not be made (VMM configuration errors).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot find the size of the disk image: {0}")]
    Size(#[source] std::io::Error),
    #[error("disk id {0:?} is longer than {ID_BYTES} bytes")]
    IdTooLong(String),
}

/// A virtio block device backed by a raw image (a regular file or a host block device).
///
/// What the guest gets for each kind of request (status byte, used length; the used
/// length counts every byte written into the chain's device-writable buffers):
///
/// | request | status | used len |
/// |---|---|---|
/// | IN, all good | OK | data + 1 |
/// | OUT, FLUSH, all good | OK | 1 |
/// | GET_ID | OK | min(20, data) + 1 |
/// | unknown type (DISCARD, WRITE_ZEROES, ...) | UNSUPP | 1 |
/// | OUT on a read-only disk | IOERR, nothing written | 1 |
/// | header not one 16-byte device-readable descriptor, or not in RAM | IOERR | 1 |
/// | last descriptor device-writable but not 1 byte | IOERR (in its last byte) | 1 |
/// | more than [`SEG_MAX`] data descriptors | IOERR | 1 |
/// | IN/GET_ID data device-readable, OUT data device-writable, FLUSH with data | IOERR | 1 |
/// | IN/OUT length not a multiple of 512, or past the end of the disk (or overflowing) | IOERR | 1 |
/// | IN/OUT data outside RAM, host I/O error, short read/write | IOERR | bytes read into RAM before it + 1 |
/// | last descriptor device-readable or empty, or fewer than 2 descriptors | nothing written | 0 |
/// | chain that does not end (loop, too long, `next` past the table, descriptor outside RAM, bad indirect table) | nothing written | 0 |
/// | status byte outside RAM | nothing written | data bytes written |
/// | head index past the queue, or the used ring outside RAM | not given back (cannot be) | - |
pub struct Block {
    disk: Disk,
    config: [u8; CONFIG_LEN],
    errors: GuestErrorLog,
}

/// What serving a request needs (apart from the error log, borrowed alongside).
struct Disk {
    file: File,
    readonly: bool,
    id: [u8; ID_BYTES],
    /// Size in 512-byte sectors (a partial last sector is not exposed).
    capacity: u64,
}

/// How a request ended, when not with OK.
struct Failed {
    status: u8,
    /// Bytes already written into the guest's buffers.
    written: u32,
    why: String,
}

impl Failed {
    fn ioerr(written: u32, why: String) -> Failed {
        Failed {
            status: VIRTIO_BLK_S_IOERR as u8,
            written,
            why,
        }
    }
}

fn ioerr<T>(why: impl Into<String>) -> Result<T, Failed> {
    Err(Failed::ioerr(0, why.into()))
}

impl Block {
    /// A block device on `disk`, which the VMM opened read-write unless `readonly` (then
    /// read-only is enough; the guest is told with `VIRTIO_BLK_F_RO` and writes are
    /// refused). `id` is what `VIRTIO_BLK_T_GET_ID` returns (the guest's serial number,
    /// `/sys/block/vdX/serial`), at most 20 bytes; none reads as 20 zero bytes. The size
    /// is taken now, rounded down to whole sectors.
    pub fn new(disk: File, readonly: bool, id: Option<&str>) -> Result<Block, BlockError> {
        let mut id_bytes = [0u8; ID_BYTES];
        if let Some(s) = id {
            if s.len() > ID_BYTES {
                return Err(BlockError::IdTooLong(s.to_string()));
            }
            id_bytes[..s.len()].copy_from_slice(s.as_bytes());
        }
        // Seeking works for block devices too, whose metadata says 0 bytes.
        let bytes = (&disk).seek(SeekFrom::End(0)).map_err(BlockError::Size)?;
        if !bytes.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "virtio-blk: disk image of {bytes} bytes is not whole sectors; the last {} bytes are not visible to the guest",
                bytes % SECTOR_SIZE
            );
        }
        let capacity = bytes / SECTOR_SIZE;
        let mut config = [0u8; CONFIG_LEN];
        config[CONFIG_CAPACITY..CONFIG_CAPACITY + 8].copy_from_slice(&capacity.to_le_bytes());
        config[CONFIG_SEG_MAX..CONFIG_SEG_MAX + 4].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[CONFIG_BLK_SIZE..CONFIG_BLK_SIZE + 4]
            .copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Ok(Block {
            disk: Disk {
                file: disk,
                readonly,
                id: id_bytes,
                capacity,
            },
            config,
            errors: GuestErrorLog::new("virtio-blk"),
        })
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    pub fn readonly(&self) -> bool {
        self.disk.readonly
    }

    /// How many bad requests the guest made (or host I/O errors it got) so far.
    pub fn errors(&self) -> u64 {
        self.errors.total()
    }
}

impl Disk {
    /// Serves one chain; returns the used length.
    fn serve(&self, w: &Walked, ram: &GuestRam, log: &mut GuestErrorLog) -> u32 {
        let status_at = match status_byte(w) {
            Ok(at) => at,
            Err(why) => {
                log.report(format_args!("head {}: {why}; not answered", w.head));
                return 0;
            }
        };
        let (status, written) = match self.execute(w, ram) {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(f) => {
                log.report(format_args!("head {}: {}", w.head, f.why));
                (f.status, f.written)
            }
        };
        // The last byte of the last descriptor: serve_chains marks its page for the round.
        match ram.write_marked_by_round(status_at, &[status]) {
            Ok(()) => written.saturating_add(1),
            Err(e) => {
                log.report(format_args!("head {}: status byte: {e}", w.head));
                written
            }
        }
    }

    /// Carries out a request whose status byte is known; returns the data bytes written
    /// into the guest.
    fn execute(&self, w: &Walked, ram: &GuestRam) -> Result<u32, Failed> {
        if w.too_long() {
            return ioerr(format!(
                "{} descriptors, more than {SEG_MAX} data descriptors",
                w.count
            ));
        }
        let status = w.descs[w.descs.len() - 1];
        if status.len() != 1 {
            return ioerr(format!(
                "status descriptor of {} bytes, not 1",
                status.len()
            ));
        }
        let header = w.descs[0];
        if header.is_write_only() || header.len() != HEADER_LEN {
            return ioerr(format!(
                "header descriptor is {} bytes {}, not {HEADER_LEN} device-readable",
                header.len(),
                if header.is_write_only() {
                    "device-writable"
                } else {
                    "device-readable"
                }
            ));
        }
        let mut h = [0u8; HEADER_LEN as usize];
        if let Err(e) = ram.read(header.addr().0, &mut h) {
            return ioerr(format!("header: {e}"));
        }
        let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let data = &w.descs[1..w.descs.len() - 1];
        match kind {
            VIRTIO_BLK_T_IN => {
                let start = self.check_data(data, true, sector, "read")?;
                self.read(data, start, ram)
            }
            VIRTIO_BLK_T_OUT => {
                if self.readonly {
                    return ioerr("write to a read-only disk");
                }
                let start = self.check_data(data, false, sector, "write")?;
                self.write(data, start, ram).map(|()| 0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !data.is_empty() {
                    return ioerr(format!("flush with {} data descriptors", data.len()));
                }
                if !self.readonly {
                    if let Err(e) = self.file.sync_data() {
                        return Err(Failed::ioerr(0, format!("host: flush: {e}")));
                    }
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                if data.iter().any(|d| !d.is_write_only()) {
                    return ioerr("get-id buffer is device-readable");
                }
                self.get_id(data, ram)
            }
            _ => Err(Failed {
                status: VIRTIO_BLK_S_UNSUPP as u8,
                written: 0,
                why: format!("request type {kind} is not supported"),
            }),
        }
    }

    /// Checks a read's or write's data descriptors: direction, whole sectors, inside the
    /// disk. Returns the byte offset in the disk.
    fn check_data(
        &self,
        data: &[Descriptor],
        to_guest: bool,
        sector: u64,
        what: &str,
    ) -> Result<u64, Failed> {
        if let Some(d) = data.iter().find(|d| d.is_write_only() != to_guest) {
            return ioerr(format!(
                "{what} with a {} data descriptor ({:#x}+{:#x})",
                if to_guest {
                    "device-readable"
                } else {
                    "device-writable"
                },
                d.addr().0,
                d.len()
            ));
        }
        let len: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        if !len.is_multiple_of(SECTOR_SIZE) {
            return ioerr(format!(
                "{what} of {len} bytes, not whole {SECTOR_SIZE}-byte sectors"
            ));
        }
        let start = sector.checked_mul(SECTOR_SIZE);
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(start), Some(end)) if end <= self.capacity * SECTOR_SIZE => Ok(start),
            _ => ioerr(format!(
                "{what} of {len} bytes at sector {sector} is past the end of the disk ({} sectors)",
                self.capacity
            )),
        }
    }

    fn read(&self, data: &[Descriptor], start: u64, ram: &GuestRam) -> Result<u32, Failed> {
        let mut at = start;
        let mut written = 0u32;
        for d in data {
            let len = d.len() as usize;
            match ram.read_file_at(d.addr().0, len, &self.file, at) {
                Ok(n) => {
                    // virtio-queue ends a chain before its lengths pass u32::MAX.
                    written = written.saturating_add(n as u32);
                    if n < len {
                        return Err(Failed::ioerr(
                            written,
                            format!(
                                "host: short read at byte {}: the image shrank?",
                                at + n as u64
                            ),
                        ));
                    }
                }
                Err(e) => return Err(Failed::ioerr(written, dma_why("read", &e))),
            }
            at += len as u64;
        }
        Ok(written)
    }

    fn write(&self, data: &[Descriptor], start: u64, ram: &GuestRam) -> Result<(), Failed> {
        let mut at = start;
        for d in data {
            let len = d.len() as usize;
            match ram.write_file_at(d.addr().0, len, &self.file, at) {
                Ok(n) if n == len => {}
                Ok(n) => {
                    return ioerr(format!(
                        "host: short write at byte {} ({n} of {len})",
                        at + n as u64
                    ))
                }
                Err(e) => return ioerr(dma_why("write", &e)),
            }
            at += len as u64;
        }
        Ok(())
    }

    fn get_id(&self, data: &[Descriptor], ram: &GuestRam) -> Result<u32, Failed> {
        let mut left = &self.id[..];
        let mut written = 0u32;
        for d in data {
            if left.is_empty() {
                break;
            }
            let n = left.len().min(d.len() as usize);
            if let Err(e) = ram.write(d.addr().0, &left[..n]) {
                return Err(Failed::ioerr(written, format!("get-id: {e}")));
            }
            written += n as u32;
            left = &left[n..];
        }
        Ok(written)
    }
}

/// Says whether a failed transfer was the guest's doing (a buffer outside RAM) or the
/// host's (an I/O error on the image).
fn dma_why(what: &str, e: &DmaError) -> String {
    match e {
        DmaError::OutOfRam { .. } | DmaError::Fault { .. } => format!("{what}: {e}"),
        DmaError::Io { .. } => format!("host: {what}: {e}"),
    }
}

/// Where the status byte goes: the last byte of the chain's last descriptor, if the
/// chain ends, has a header before it, and that descriptor is device-writable.
fn status_byte(w: &Walked) -> Result<u64, &'static str> {
    if let Some(why) = w.broken() {
        return Err(why);
    }
    let Some(last) = w.last else {
        return Err("empty chain");
    };
    if w.count < 2 {
        return Err("a single descriptor: no header and status");
    }
    if !last.is_write_only() {
        return Err("the last descriptor (the status) is device-readable");
    }
    if last.len() == 0 {
        return Err("the last descriptor (the status) is empty");
    }
    last.addr()
        .0
        .checked_add(u64::from(last.len()) - 1)
        .ok_or("the status descriptor wraps around the address space")
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        BLOCK_DEVICE_TYPE
    }

    fn pci_class(&self) -> u32 {
        BLOCK_PCI_CLASS
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![BLOCK_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if self.disk.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn process_queue(&mut self, index: u16, queue: &mut Queue, ram: &GuestRam) -> usize {
        if index != 0 {
            return 0;
        }
        let disk = &self.disk;
        serve_chains(
            queue,
            ram,
            SEG_MAX as usize + 2,
            &mut self.errors,
            |w, ram, log| disk.serve(w, ram, log),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::fuzzing::testing::{Driver, HOLE, INDIRECT, NEXT, USED, WRITE};
    use crate::virtio::fuzzing::{self, temp_disk, Prng};
    use std::os::unix::fs::FileExt;

    const SECTORS: u64 = 64;
    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
    /// Where the tests put headers, data and status bytes.
    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x4_0000;
    const STATUS: u64 = 0x6_0000;

    fn block(readonly: bool) -> Block {
        Block::new(temp_disk(SECTORS), readonly, Some("ferry-disk-1")).unwrap()
    }

    /// Writes a request header at `at`.
    fn header(d: &Driver, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[4..8].copy_from_slice(&7u32.to_le_bytes()); // ioprio, ignored
        h[8..].copy_from_slice(&sector.to_le_bytes());
        d.ram.write(at, &h).unwrap();
    }

    /// Serves the queue; returns the used entries added.
    fn serve(d: &mut Driver, b: &mut Block) -> Vec<(u32, u32)> {
        let n = b.process_queue(0, &mut d.q, &d.ram.clone());
        let used = d.used();
        assert_eq!(used.len(), n);
        used
    }

    /// A good one-sector read of sector 5 must still be served after whatever came before.
    fn still_serves(d: &mut Driver, b: &mut Block) {
        header(d, HDR + 0x800, VIRTIO_BLK_T_IN, 5);
        d.ram.write(STATUS + 0x800, &[0xff]).unwrap();
        let head = d.chain(&[
            (HDR + 0x800, 16, 0),
            (DATA + 0x8000, 512, WRITE),
            (STATUS + 0x800, 1, WRITE),
        ]);
        assert_eq!(serve(d, b), vec![(u32::from(head), 513)]);
        assert_eq!(d.byte(STATUS + 0x800), OK);
        assert_eq!(d.bytes(DATA + 0x8000, 512), vec![5u8; 512]);
    }

    /// Serves one chain expected to fail: returns (status byte, used len).
    fn bad(d: &mut Driver, b: &mut Block, descs: &[(u64, u32, u16)], status_at: u64) -> (u8, u32) {
        d.ram.write(status_at, &[0xff]).unwrap();
        let errors = b.errors();
        let head = d.chain(descs);
        let used = serve(d, b);
        assert_eq!(used.len(), 1, "the chain is given back");
        assert_eq!(used[0].0, u32::from(head));
        assert!(b.errors() > errors, "counted as a bad request");
        let r = (d.byte(status_at), used[0].1);
        still_serves(d, b);
        r
    }

    #[test]
    fn describes_itself() {
        let b = block(false);
        assert_eq!(b.device_type(), 2);
        assert_eq!(b.pci_class(), 0x01_80_00);
        assert_eq!(b.queue_max_sizes(), vec![256]);
        assert_eq!(b.capacity(), SECTORS);
        let f = b.features();
        for bit in [32, 28, 29, 9, 2, 6] {
            assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
        }
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(block(true).features() & (1 << VIRTIO_BLK_F_RO), 0);

        let mut c = [0u8; 8];
        b.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), SECTORS);
        let mut c = [0u8; 4];
        b.read_config(12, &mut c);
        assert_eq!(u32::from_le_bytes(c), SEG_MAX);
        b.read_config(20, &mut c);
        assert_eq!(u32::from_le_bytes(c), 512);
        // Any offset and width: a byte of the capacity, across fields, past the end.
        let mut one = [0u8; 1];
        b.read_config(0, &mut one);
        assert_eq!(one[0], SECTORS as u8);
        let mut c = [0xee; 6];
        b.read_config(10, &mut c);
        assert_eq!(c, [0, 0, 254, 0, 0, 0]);
        let mut c = [0xee; 8];
        b.read_config(92, &mut c);
        assert_eq!(c, [0; 8]);
        b.read_config(u64::MAX - 2, &mut c);
        assert_eq!(c, [0; 8]);
        // Writes are ignored.
        let mut b = b;
        b.write_config(0, &[1, 2, 3, 4]);
        let mut c = [0u8; 8];
        b.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), SECTORS);

        assert!(matches!(
            Block::new(temp_disk(1), false, Some("123456789012345678901")),
            Err(BlockError::IdTooLong(_))
        ));
    }

    #[test]
    fn a_read_lands_in_ram_and_marks_exactly_its_pages_dirty() {
        let mut d = Driver::new();
        let mut b = block(false);
        header(&d, HDR, VIRTIO_BLK_T_IN, 3);
        d.clean();
        // One sector inside a page, then 8 KiB starting mid-page (three pages).
        let head = d.chain(&[
            (HDR, 16, 0),
            (DATA + 0x100, 512, WRITE),
            (DATA + 0x1_0800, 8192, WRITE),
            (STATUS, 1, WRITE),
        ]);
        d.clean();
        assert_eq!(
            serve(&mut d, &mut b),
            vec![(u32::from(head), 512 + 8192 + 1)]
        );
        assert_eq!(d.byte(STATUS), OK);
        assert_eq!(d.bytes(DATA + 0x100, 512), vec![3; 512]);
        let big = d.bytes(DATA + 0x1_0800, 8192);
        for (i, chunk) in big.chunks(512).enumerate() {
            assert_eq!(chunk, vec![4 + i as u8; 512], "sector {}", 4 + i);
        }
        assert_eq!(
            d.dirty_pages(),
            vec![
                USED,
                DATA,
                DATA + 0x1_0000,
                DATA + 0x1_1000,
                DATA + 0x1_2000,
                STATUS
            ],
            "the used ring, the data pages and the status page, nothing else"
        );
    }

    #[test]
    fn a_write_reaches_the_disk() {
        let mut d = Driver::new();
        let mut b = block(false);
        header(&d, HDR, VIRTIO_BLK_T_OUT, 10);
        d.ram.write(DATA, &[0xa5; 512]).unwrap();
        d.ram.write(DATA + 0x1000, &[0x5a; 1024]).unwrap();
        let head = d.chain(&[
            (HDR, 16, 0),
            (DATA, 512, 0),
            (DATA + 0x1000, 1024, 0),
            (STATUS, 1, WRITE),
        ]);
        assert_eq!(serve(&mut d, &mut b), vec![(u32::from(head), 1)]);
        assert_eq!(d.byte(STATUS), OK);
        let mut back = vec![0u8; 2048];
        b.disk.file.read_exact_at(&mut back, 9 * 512).unwrap();
        assert_eq!(back[..512], [9; 512], "sector 9 untouched");
        assert_eq!(back[512..1024], [0xa5; 512]);
        assert_eq!(back[1024..], [0x5a; 1024]);
        still_serves(&mut d, &mut b);
    }

    #[test]
    fn flush_and_get_id() {
        let mut d = Driver::new();
        let mut b = block(false);
        header(&d, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let head = d.chain(&[(HDR, 16, 0), (STATUS, 1, WRITE)]);
        assert_eq!(serve(&mut d, &mut b), vec![(u32::from(head), 1)]);
        assert_eq!(d.byte(STATUS), OK);

        header(&d, HDR + 16, VIRTIO_BLK_T_GET_ID, 0);
        d.ram.write(DATA, &[0xee; 32]).unwrap();
        let head = d.chain(&[(HDR + 16, 16, 0), (DATA, 20, WRITE), (STATUS + 1, 1, WRITE)]);
        assert_eq!(serve(&mut d, &mut b), vec![(u32::from(head), 21)]);
        assert_eq!(d.byte(STATUS + 1), OK);
        let mut want = b"ferry-disk-1".to_vec();
        want.resize(20, 0);
        want.extend([0xee; 12]);
        assert_eq!(d.bytes(DATA, 32), want);

        // A buffer split in two and too short: what fits.
        let head = d.chain(&[
            (HDR + 16, 16, 0),
            (DATA + 0x100, 4, WRITE),
            (DATA + 0x200, 4, WRITE),
            (STATUS + 2, 1, WRITE),
        ]);
        assert_eq!(serve(&mut d, &mut b), vec![(u32::from(head), 9)]);
        assert_eq!(d.bytes(DATA + 0x100, 4), b"ferr");
        assert_eq!(d.bytes(DATA + 0x200, 4), b"y-di");
        still_serves(&mut d, &mut b);
    }

    #[test]
    fn a_read_only_disk_refuses_writes_and_serves_the_rest() {
        let mut d = Driver::new();
        let mut b = block(true);
        header(&d, HDR, VIRTIO_BLK_T_OUT, 1);
        d.ram.write(DATA, &[0xa5; 512]).unwrap();
        let r = bad(
            &mut d,
            &mut b,
            &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)],
            STATUS,
        );
        assert_eq!(r, (IOERR, 1));
        let mut back = [0u8; 512];
        b.disk.file.read_exact_at(&mut back, 512).unwrap();
        assert_eq!(back, [1; 512], "nothing written");
        header(&d, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let head = d.chain(&[(HDR, 16, 0), (STATUS, 1, WRITE)]);
        assert_eq!(serve(&mut d, &mut b), vec![(u32::from(head), 1)]);
        assert_eq!(d.byte(STATUS), OK);
    }

    #[test]
    fn requests_past_the_disk_or_not_in_sectors_are_io_errors() {
        let mut d = Driver::new();
        let mut b = block(false);
        for (kind, sector, len) in [
            (VIRTIO_BLK_T_IN, SECTORS - 1, 1024u32), // one sector past the end
            (VIRTIO_BLK_T_IN, SECTORS, 512),
            (VIRTIO_BLK_T_IN, u64::MAX / 512, 1024), // sector * 512 + len overflows
            (VIRTIO_BLK_T_IN, u64::MAX, 512),        // sector * 512 overflows
            (VIRTIO_BLK_T_IN, 0, 100),               // not whole sectors
            (VIRTIO_BLK_T_OUT, SECTORS - 1, 1024),
            (VIRTIO_BLK_T_OUT, 0, 513),
        ] {
            header(&d, HDR, kind, sector);
            d.ram.write(DATA, &[0xee; 1024]).unwrap();
            let flags = if kind == VIRTIO_BLK_T_IN { WRITE } else { 0 };
            let r = bad(
                &mut d,
                &mut b,
                &[(HDR, 16, 0), (DATA, len, flags), (STATUS, 1, WRITE)],
                STATUS,
            );
            assert_eq!(r, (IOERR, 1), "type {kind} sector {sector} len {len}");
            assert_eq!(d.bytes(DATA, 1024), vec![0xee; 1024], "RAM untouched");
        }
        // The last sector itself is fine.
        header(&d, HDR, VIRTIO_BLK_T_IN, SECTORS - 1);
        d.chain(&[(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)]);
        assert_eq!(serve(&mut d, &mut b)[0].1, 513);
        assert_eq!(d.byte(STATUS), OK);
    }

    #[test]
    fn malformed_requests_get_ioerr_or_unsupp_and_the_queue_goes_on() {
        let mut d = Driver::new();
        let mut b = block(false);
        let s = STATUS;
        header(&d, HDR, VIRTIO_BLK_T_IN, 0);
        header(&d, HDR + 0x100, VIRTIO_BLK_T_OUT, 0);
        header(&d, HDR + 0x200, VIRTIO_BLK_T_FLUSH, 0);
        header(&d, HDR + 0x300, 11, 0); // DISCARD, not offered
        header(&d, HDR + 0x400, VIRTIO_BLK_T_GET_ID, 0);
        type Case = (&'static str, Vec<(u64, u32, u16)>, (u8, u32));
        let cases: Vec<Case> = vec![
            (
                "read into device-readable data",
                vec![(HDR, 16, 0), (DATA, 512, 0), (s, 1, WRITE)],
                (IOERR, 1),
            ),
            (
                "write from device-writable data",
                vec![(HDR + 0x100, 16, 0), (DATA, 512, WRITE), (s, 1, WRITE)],
                (IOERR, 1),
            ),
            (
                "mixed directions",
                vec![
                    (HDR, 16, 0),
                    (DATA, 512, WRITE),
                    (DATA + 512, 512, 0),
                    (s, 1, WRITE),
                ],
                (IOERR, 1),
            ),
            (
                "flush with data",
                vec![(HDR + 0x200, 16, 0), (DATA, 512, WRITE), (s, 1, WRITE)],
                (IOERR, 1),
            ),
            (
                "get-id into a device-readable buffer",
                vec![(HDR + 0x400, 16, 0), (DATA, 20, 0), (s, 1, WRITE)],
                (IOERR, 1),
            ),
            (
                "unsupported type",
                vec![(HDR + 0x300, 16, 0), (DATA, 512, 0), (s, 1, WRITE)],
                (UNSUPP, 1),
            ),
            (
                "header of 8 bytes",
                vec![(HDR, 8, 0), (DATA, 512, WRITE), (s, 1, WRITE)],
                (IOERR, 1),
            ),
            (
                "header of 17 bytes",
                vec![(HDR, 17, 0), (DATA, 512, WRITE), (s, 1, WRITE)],
                (IOERR, 1),
            ),
            (
                "device-writable header",
                vec![(HDR, 16, WRITE), (DATA, 512, WRITE), (s, 1, WRITE)],
                (IOERR, 1),
            ),
            (
                "header in the hole",
                vec![(HOLE, 16, 0), (DATA, 512, WRITE), (s, 1, WRITE)],
                (IOERR, 1),
            ),
            (
                "header across the end of RAM",
                vec![(0x30_0000 - 8, 16, 0), (DATA, 512, WRITE), (s, 1, WRITE)],
                (IOERR, 1),
            ),
            (
                "read into the hole",
                vec![(HDR, 16, 0), (HOLE + 0x1000, 512, WRITE), (s, 1, WRITE)],
                (IOERR, 1),
            ),
            (
                "read into a wrapping address",
                vec![(HDR, 16, 0), (u64::MAX - 0xff, 512, WRITE), (s, 1, WRITE)],
                (IOERR, 1),
            ),
            (
                "write from the hole",
                vec![(HDR + 0x100, 16, 0), (HOLE, 512, 0), (s, 1, WRITE)],
                (IOERR, 1),
            ),
        ];
        for (what, descs, want) in cases {
            assert_eq!(bad(&mut d, &mut b, &descs, s), want, "{what}");
        }
    }

    #[test]
    fn a_read_that_runs_out_of_ram_counts_what_landed() {
        let mut d = Driver::new();
        let mut b = block(false);
        header(&d, HDR, VIRTIO_BLK_T_IN, 2);
        // The second buffer runs from the end of the first region into the hole.
        let r = bad(
            &mut d,
            &mut b,
            &[
                (HDR, 16, 0),
                (DATA, 512, WRITE),
                (HOLE - 256, 512, WRITE),
                (STATUS, 1, WRITE),
            ],
            STATUS,
        );
        assert_eq!(r, (IOERR, 513));
        assert_eq!(d.bytes(DATA, 512), vec![2; 512]);
    }

    #[test]
    fn status_descriptors_that_cannot_take_the_status() {
        let mut d = Driver::new();
        let mut b = block(false);
        header(&d, HDR, VIRTIO_BLK_T_IN, 0);
        d.ram.write(DATA, &[0xee; 512]).unwrap();
        // Device-readable, empty: nothing written at all, used length 0.
        for status in [(STATUS, 1, 0), (STATUS, 0, WRITE)] {
            let r = bad(
                &mut d,
                &mut b,
                &[(HDR, 16, 0), (DATA, 512, WRITE), status],
                STATUS,
            );
            assert_eq!(r, (0xff, 0));
            assert_eq!(d.bytes(DATA, 512), vec![0xee; 512], "no read done");
        }
        // A lone descriptor.
        assert_eq!(
            bad(&mut d, &mut b, &[(STATUS, 1, WRITE)], STATUS),
            (0xff, 0)
        );
        // Two bytes: IOERR in the last of them (where the status of a bigger buffer is).
        d.ram.write(STATUS, &[0xff, 0xff]).unwrap();
        let r = bad(
            &mut d,
            &mut b,
            &[(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 2, WRITE)],
            STATUS + 1,
        );
        assert_eq!(r, (IOERR, 1));
        assert_eq!(d.byte(STATUS), 0xff);
        assert_eq!(d.bytes(DATA, 512), vec![0xee; 512], "no read done");
        // In the hole: the read is not done either way, nothing to tell.
        let r = bad(
            &mut d,
            &mut b,
            &[(HDR + 0x100, 16, 0), (HOLE, 1, WRITE)],
            STATUS,
        );
        assert_eq!(r.1, 0);
    }

    #[test]
    fn broken_chains_are_given_back_empty() {
        let mut d = Driver::new();
        let mut b = block(false);
        header(&d, HDR, VIRTIO_BLK_T_IN, 0);
        d.ram.write(DATA, &[0xee; 512]).unwrap();
        let table = crate::virtio::fuzzing::testing::DESC;
        let expect_empty = |d: &mut Driver, b: &mut Block, head: u16| {
            d.ram.write(STATUS, &[0xff]).unwrap();
            d.publish(head);
            assert_eq!(serve(d, b), vec![(u32::from(head), 0)]);
            assert_eq!(d.byte(STATUS), 0xff);
            assert_eq!(d.bytes(DATA, 512), vec![0xee; 512]);
            still_serves(d, b);
        };
        // A loop: header -> data -> header ...
        let i = d.take(2);
        d.desc_at(table, i[0], HDR, 16, NEXT, i[1]);
        d.desc_at(table, i[1], DATA, 512, WRITE | NEXT, i[0]);
        expect_empty(&mut d, &mut b, i[0]);
        // A status descriptor pointing at itself.
        let i = d.take(2);
        d.desc_at(table, i[0], HDR, 16, NEXT, i[1]);
        d.desc_at(table, i[1], STATUS, 1, WRITE | NEXT, i[1]);
        expect_empty(&mut d, &mut b, i[0]);
        // `next` past the table.
        let i = d.take(1);
        d.desc_at(table, i[0], HDR, 16, NEXT, 16);
        expect_empty(&mut d, &mut b, i[0]);
        // An indirect table in the hole, one of a bad length, an indirect inside one.
        let ind = DATA + 0x2_0000;
        for (addr, len) in [(HOLE, 48u32), (ind, 40)] {
            let i = d.take(1);
            d.desc_at(table, i[0], addr, len, INDIRECT, 0);
            expect_empty(&mut d, &mut b, i[0]);
        }
        d.desc_at(ind, 0, HDR, 16, NEXT, 1);
        d.desc_at(ind, 1, ind + 0x100, 16, INDIRECT, 0);
        let i = d.take(1);
        d.desc_at(table, i[0], ind, 32, INDIRECT, 0);
        expect_empty(&mut d, &mut b, i[0]);

        // A head past the queue is consumed but cannot be given back.
        d.publish(16);
        assert_eq!(serve(&mut d, &mut b), vec![]);
        still_serves(&mut d, &mut b);
    }

    #[test]
    fn requests_through_indirect_tables() {
        let mut d = Driver::new();
        let mut b = block(false);
        header(&d, HDR, VIRTIO_BLK_T_IN, 7);
        let table = DATA + 0x2_0000;
        d.desc_at(table, 0, HDR, 16, NEXT, 1);
        d.desc_at(table, 1, DATA, 512, WRITE | NEXT, 2);
        d.desc_at(table, 2, DATA + 512, 512, WRITE | NEXT, 3);
        d.desc_at(table, 3, STATUS, 1, WRITE, 0);
        let head = d.chain(&[(table, 64, INDIRECT)]);
        assert_eq!(serve(&mut d, &mut b), vec![(u32::from(head), 1025)]);
        assert_eq!(d.byte(STATUS), OK);
        assert_eq!(d.bytes(DATA, 1024), [vec![7; 512], vec![8; 512]].concat());

        // Longer than a queue may be: 300 descriptors (1 MiB table allows 65535).
        let big = DATA + 0x3_0000;
        d.desc_at(big, 0, HDR, 16, NEXT, 1);
        for k in 1..299u16 {
            d.desc_at(big, k, DATA + 0x4_0000, 0, WRITE | NEXT, k + 1);
        }
        d.desc_at(big, 299, STATUS, 1, WRITE, 0);
        let r = bad(&mut d, &mut b, &[(big, 300 * 16, INDIRECT)], STATUS);
        assert_eq!(r, (IOERR, 1));
    }

    #[test]
    fn an_available_index_far_ahead_is_skipped_not_spun_on() {
        use virtio_queue::QueueT;
        let mut d = Driver::new();
        let mut b = block(false);
        d.set_avail_idx(1000);
        assert_eq!(b.process_queue(0, &mut d.q, &d.ram.clone()), 0);
        assert_eq!(d.q.next_avail(), 1000, "moved to the driver's index");
        assert!(
            !d.q.enable_notification(d.ram.queue_memory()).unwrap(),
            "nothing left for the worker to spin on"
        );
        assert!(b.errors() > 0);
        // The driver goes on from there.
        still_serves(&mut d, &mut b);
        // Other queue indexes are not served.
        assert_eq!(b.process_queue(1, &mut d.q, &d.ram.clone()), 0);
    }

    #[test]
    fn the_committed_fuzz_seeds_do_what_they_say() {
        for seed in fuzzing::seeds() {
            let run = match seed.target {
                "virtio_blk_request" => fuzzing::block_request(&seed.input),
                _ => fuzzing::descriptor_chain(&seed.input),
            };
            assert_eq!(run.used_lens, seed.used_lens, "{}", seed.name);
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/seeds")
                .join(seed.target)
                .join(seed.name);
            if std::env::var_os("FERRY_WRITE_SEEDS").is_some() {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &seed.input).unwrap();
            }
            assert_eq!(
                std::fs::read(&path).ok(),
                Some(seed.input),
                "{} (FERRY_WRITE_SEEDS=1 writes it)",
                path.display()
            );
        }
    }

    #[test]
    fn thousands_of_generated_queues_never_panic() {
        let mut r = Prng::new(0xb10c);
        let (mut completed, mut reads, mut runs) = (0usize, 0usize, 0usize);
        for i in 0..4000 {
            let input = if i % 5 == 4 {
                // Plain random bytes too.
                let n = r.below(700) as usize;
                (0..n).map(|_| r.next_u64() as u8).collect()
            } else {
                fuzzing::plausible_input(&mut r)
            };
            let run = fuzzing::block_request(&input);
            runs += 1;
            completed += run.completed;
            reads += run
                .used_lens
                .iter()
                .filter(|&&l| l > 1 && (l - 1) % 512 == 0)
                .count();
        }
        assert_eq!(runs, 4000);
        // The generator reaches the request code, not just the ring checks.
        assert!(completed > 4000, "{completed} chains given back");
        // (7490 and 382 when written.)
        assert!(reads > 200, "{reads} reads with data");
    }
}
