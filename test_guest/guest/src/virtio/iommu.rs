//! The virtio-iommu driver (virtio 1.2 §5.13, with Ferry's dirty-tracking extension,
//! `devices/src/viommu/DIRTY_TRACKING.md`) that `dma-verify iommu=on` puts its DMA device
//! behind. Set up once at boot in ring 0 ([`setup`]); requests are then sent from ring 0
//! at boot and from ring 3 during the workload ([`Batch`]), the eventq looked at now and
//! then ([`take_faults`]).
//!
//! * Function: vendor 0x1af4, device 0x1057 on bus 0, through the same virtio-pci
//!   transport as the DMA device (`super::Transport`); the device configuration must hold
//!   at least `probe_size` (36 bytes; 37 with BYPASS_CONFIG, for `bypass`).
//! * Features: VERSION_1 and MAP_UNMAP (required); INPUT_RANGE, DOMAIN_RANGE, PROBE,
//!   BYPASS_CONFIG and ACCESS_PLATFORM when offered; DIRTY_TRACKING (bit 10) when offered
//!   and asked for (`nested-dirty=on`). Not MMIO, BYPASS, EVENT_IDX or INDIRECT_DESC.
//!   With BYPASS_CONFIG, `bypass` is written 0 (endpoints not attached to a domain are
//!   blocked) and must read back 0.
//! * Queues: requestq (0) and eventq (1), split rings in the virtio-iommu's part of the
//!   driver memory, no interrupts. The device itself is not behind an IOMMU: every
//!   address it is given is a guest-physical one.
//! * Requests: each a chain of two descriptors, the device-readable part and the
//!   device-writable part (the tail, after the bitmap of a GET_DIRTY_BITMAP or the
//!   properties of a PROBE), in a slot of [`IOMMU_SLOT_BYTES`] of the sending vCPU's
//!   request pages; up to [`Batch::capacity`] per notification. The status byte is preset
//!   to 0xff and a used length of 0 counts as no answer.
//! * Eventq: [`EVENT_BUFFERS`] (fewer if the queue is shorter) buffers of
//!   [`EVENT_BUFFER_BYTES`] posted at boot, each put back once its fault record is read.

use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use guest_pattern::cmdline::Irq;
use guest_pattern::dma::{
    DriverMemory, BATCH, EVENT_BUFFERS, EVENT_BUFFER_BYTES, IOMMU_SLOTS, IOMMU_SLOT_BYTES,
};
use guest_pattern::viommu::*;

use super::queue::{self, Buf, Chain, Posted, IOMMU_EVENTQ, IOMMU_REQUESTQ};
use super::{Kind, Transport, NO_VECTOR, VENDOR};

/// What [`setup`] found and agreed.
pub struct Iommu {
    pub dev: u8,
    pub func: u8,
    pub offered: u64,
    pub features: u64,
    pub page_size_mask: u64,
    /// Inclusive.
    pub input_range: (u64, u64),
    /// Inclusive.
    pub domain_range: (u32, u32),
    /// Bytes of PROBE properties (0 without PROBE).
    pub probe_size: u32,
    /// `bypass` as written (with BYPASS_CONFIG).
    pub bypass: Option<u8>,
    pub requestq: u16,
    pub eventq: u16,
    /// Eventq buffers posted.
    pub events: u16,
}

impl Iommu {
    /// Prints `guest: viommu device pci=00:DD.F id=1af4:1057 features=0x.. offered=0x..
    /// requestq=<n> eventq=<n> events=<n>` and `guest: viommu config page_size_mask=0x..
    /// input_range=0x..-0x.. domain_range=<a>-<b> probe_size=<n> bypass=<0|none>`.
    pub fn announce(&self) {
        struct Bypass(Option<u8>);
        impl fmt::Display for Bypass {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.0 {
                    Some(b) => write!(f, "{b}"),
                    None => f.write_str("none"),
                }
            }
        }
        say!(
            "viommu device pci=00:{:02x}.{} id={VENDOR:04x}:{DEVICE_ID:04x} features={:#x} offered={:#x} requestq={} eventq={} events={}",
            self.dev,
            self.func,
            self.features,
            self.offered,
            self.requestq,
            self.eventq,
            self.events
        );
        say!(
            "viommu config page_size_mask={:#x} input_range={:#x}-{:#x} domain_range={}-{} probe_size={} bypass={}",
            self.page_size_mask,
            self.input_range.0,
            self.input_range.1,
            self.domain_range.0,
            self.domain_range.1,
            self.probe_size,
            Bypass(self.bypass),
        );
    }

    pub fn has(&self, feature: u64) -> bool {
        self.features & feature == feature
    }
}

/// Published at boot (before `smp::GO`): requests per notification, where the eventq
/// buffers are.
static BATCH_MAX: AtomicU32 = AtomicU32::new(1);
static EVENTS: AtomicU64 = AtomicU64::new(0);

/// Finds the virtio-iommu (none fails the run), negotiates, sets `bypass` to 0 when it
/// can, sets up both queues with memory in `mem` and posts the eventq buffers. `dirty`:
/// take DIRTY_TRACKING if offered. Ring 0, at boot.
#[inline(never)]
pub fn setup(mem: &DriverMemory, dirty: bool) -> Iommu {
    let mut t = Transport::open(Kind::Iommu, Irq::Off, Some(CFG_BYPASS as u32));
    let offered = t.offered;
    if offered & F_MAP_UNMAP == 0 {
        t.fail(format_args!(
            "MAP_UNMAP not offered (features {offered:#x}): nothing to translate with"
        ));
    }
    let mut wanted = F_VERSION_1
        | F_MAP_UNMAP
        | offered
            & (F_INPUT_RANGE | F_DOMAIN_RANGE | F_PROBE | F_BYPASS_CONFIG | F_ACCESS_PLATFORM);
    if dirty {
        wanted |= offered & F_DIRTY_TRACKING;
    }
    if wanted & F_DIRTY_TRACKING != 0 && wanted & F_PROBE == 0 {
        t.fail(format_args!(
            "DIRTY_TRACKING offered without PROBE (features {offered:#x})"
        ));
    }
    let cfg_len = t.device_cfg.map_or(0, |c| c.len());
    if wanted & F_BYPASS_CONFIG != 0 && cfg_len < CFG_LEN {
        t.fail(format_args!(
            "BYPASS_CONFIG offered but the device configuration has {cfg_len} bytes, no bypass"
        ));
    }
    t.negotiate(wanted);

    let (page_size_mask, input, domains, probe_size) = t.read_config_stable(|c| {
        (
            c.read_u64(CFG_PAGE_SIZE_MASK),
            (c.read_u64(CFG_INPUT_START), c.read_u64(CFG_INPUT_END)),
            (
                c.read::<u32>(CFG_DOMAIN_START),
                c.read::<u32>(CFG_DOMAIN_END),
            ),
            c.read::<u32>(CFG_PROBE_SIZE),
        )
    });
    let input_range = if wanted & F_INPUT_RANGE != 0 {
        input
    } else {
        (0, u64::MAX)
    };
    let domain_range = if wanted & F_DOMAIN_RANGE != 0 {
        domains
    } else {
        (0, u32::MAX)
    };
    let probe_size = if wanted & F_PROBE != 0 { probe_size } else { 0 };
    if page_size_mask == 0 {
        t.fail(format_args!("page_size_mask is 0"));
    }
    let granule = 1u64 << page_size_mask.trailing_zeros();
    if granule > 4096 {
        t.fail(format_args!(
            "page granule {granule:#x} (page_size_mask {page_size_mask:#x}): the driver maps 4 KiB pages"
        ));
    }
    if u64::from(PROBE_LEN + probe_size + TAIL_LEN) > 4096 {
        t.fail(format_args!(
            "probe_size {probe_size}: the driver's PROBE buffer holds {} bytes of properties",
            4096 - PROBE_LEN - TAIL_LEN
        ));
    }
    let bypass = (wanted & F_BYPASS_CONFIG != 0).then(|| {
        let cfg = t.device_cfg.expect("checked above");
        cfg.write::<u8>(CFG_BYPASS, 0);
        let now = t.read_config_stable(|c| c.read::<u8>(CFG_BYPASS));
        if now != 0 {
            t.fail(format_args!("bypass reads {now} after writing 0"));
        }
        0
    });
    if t.num_queues() < 2 {
        t.fail(format_args!(
            "{} queue(s): a virtio-iommu has a requestq and an eventq",
            t.num_queues()
        ));
    }
    let mut sizes = [0u16; 2];
    for (q, (size, slot)) in sizes
        .iter_mut()
        .zip([IOMMU_REQUESTQ, IOMMU_EVENTQ])
        .enumerate()
    {
        let rings = mem.iommu_rings(q as u16);
        *size = t.queue(q as u16, slot, rings, rings, NO_VECTOR, false);
    }
    t.driver_ok();

    let batch = (IOMMU_SLOTS.min(BATCH))
        .min(usize::from(sizes[0]) / 2)
        .max(1);
    BATCH_MAX.store(batch as u32, Ordering::Relaxed);
    EVENTS.store(mem.iommu_event(0), Ordering::Relaxed);
    let events = (EVENT_BUFFERS as u16).min(sizes[1]);
    Posted::post(IOMMU_EVENTQ, events, event_buffer);
    Iommu {
        dev: t.dev,
        func: t.func,
        offered,
        features: wanted,
        page_size_mask,
        input_range,
        domain_range,
        probe_size,
        bypass,
        requestq: sizes[0],
        eventq: sizes[1],
        events,
    }
}

/// Eventq buffer `d`.
fn event_buffer(d: u16) -> Buf {
    Buf {
        addr: EVENTS.load(Ordering::Relaxed) + EVENT_BUFFER_BYTES * u64::from(d),
        len: EVENT_BUFFER_BYTES as u32,
        device_writes: true,
    }
}

/// Calls `fault(record)` for every fault record the device has put in the eventq since
/// the last look, without waiting; returns how many. A used length shorter than a record
/// fails the run.
#[inline(never)]
pub fn take_faults(mut fault: impl FnMut(Fault)) -> usize {
    let mut short = None;
    let r = Posted::take(
        IOMMU_EVENTQ,
        |d, len| {
            let at = event_buffer(d).addr;
            if (len as usize) < FAULT_BYTES {
                short = Some((d, len));
                return;
            }
            let mut b = [0u8; FAULT_BYTES];
            for (i, x) in b.iter_mut().enumerate() {
                *x = read8(at + i as u64);
            }
            fault(Fault::parse(&b));
        },
        event_buffer,
    );
    match r {
        Err(e) => crate::workload::fail(format_args!("virtio-iommu eventq: {e}")),
        Ok(_) if short.is_some() => {
            let (d, len) = short.unwrap_or_default();
            crate::workload::fail(format_args!(
                "virtio-iommu eventq: buffer {d} came back with {len} bytes, a fault record has {FAULT_BYTES}"
            ))
        }
        Ok(n) => n,
    }
}

fn read8(at: u64) -> u8 {
    // SAFETY: `at` is a byte of the virtio-iommu's part of the driver memory (RAM checked
    // at boot): an eventq buffer the device has used (and writes no more until it is
    // posted again) or a request slot / the PROBE page whose request has completed.
    unsafe { core::ptr::read_volatile(at as *const u8) }
}

/// A request slot: `IOMMU_SLOT_BYTES` (or the PROBE page) of the driver memory.
#[derive(Clone, Copy)]
struct Slot(u64);

impl Slot {
    fn put<T: crate::arch::Plain>(&self, off: u64, v: T) {
        // SAFETY: `off` is inside the slot (callers write the request's own fields, within
        // IOMMU_SLOT_BYTES or the PROBE page), which is RAM of the driver memory used only
        // by the vCPU that owns it (the boot vCPU for the PROBE page), and the device
        // touches it only while its request is in flight, which is not now. Fields are
        // naturally aligned (slots are 256-byte aligned, offsets multiples of the size).
        unsafe { core::ptr::write_volatile((self.0 + off) as *mut T, v) }
    }

    fn get<T: crate::arch::Plain>(&self, off: u64) -> T {
        // SAFETY: as for `put`; read after the request completed.
        unsafe { core::ptr::read_volatile((self.0 + off) as *const T) }
    }

    /// Zeroes `len` bytes from `off`, then fills `fill` bytes from `off + len` with 0xff
    /// (the device-writable part, so that what the device does not write shows).
    fn clear(&self, off: u64, len: u64, fill: u64) {
        for i in 0..len {
            self.put::<u8>(off + i, 0);
        }
        for i in 0..fill {
            self.put::<u8>(off + len + i, 0xff);
        }
    }
}

/// What a request was, for failure lines.
#[derive(Clone, Copy, Default)]
struct What {
    kind: u8,
    domain: u32,
    /// Endpoint (ATTACH, DETACH) or flags.
    a: u32,
    /// virt_start / iova.
    b: u64,
    /// virt_end / length.
    c: u64,
    /// phys_start.
    d: u64,
}

impl fmt::Display for What {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = request_name(self.kind);
        match self.kind {
            T_ATTACH | T_DETACH => write!(
                f,
                "{name} of endpoint {:#x} to domain {}",
                self.a, self.domain
            ),
            T_MAP => write!(
                f,
                "MAP of iova {:#x}-{:#x} to gpa {:#x} (flags {:#x}) in domain {}",
                self.b, self.c, self.d, self.a, self.domain
            ),
            T_UNMAP => write!(
                f,
                "UNMAP of iova {:#x}-{:#x} in domain {}",
                self.b, self.c, self.domain
            ),
            T_SET_DIRTY_TRACKING => write!(
                f,
                "SET_DIRTY_TRACKING flags={:#x} of domain {}",
                self.a, self.domain
            ),
            T_GET_DIRTY_BITMAP => write!(
                f,
                "GET_DIRTY_BITMAP flags={:#x} of iova {:#x} length {:#x} in domain {}",
                self.a, self.b, self.c, self.domain
            ),
            _ => write!(f, "{name} request"),
        }
    }
}

/// Up to [`Batch::capacity`] requests in a vCPU's slots, sent with one notification.
pub struct Batch {
    area: u64,
    n: usize,
    /// Device-readable and device-writable bytes of each.
    lens: [(u16, u16); IOMMU_SLOTS],
    what: [What; IOMMU_SLOTS],
    used: [u32; IOMMU_SLOTS],
}

impl Batch {
    /// A batch in the request slots at `area` (`DriverMemory::iommu_requests`).
    pub fn new(area: u64) -> Batch {
        Batch {
            area,
            n: 0,
            lens: [(0, 0); IOMMU_SLOTS],
            what: [What::default(); IOMMU_SLOTS],
            used: [0; IOMMU_SLOTS],
        }
    }

    /// Requests sent with one notification, at most.
    pub fn capacity() -> usize {
        BATCH_MAX.load(Ordering::Relaxed) as usize
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_full(&self) -> bool {
        self.n >= Self::capacity()
    }

    fn slot(&self, i: usize) -> Slot {
        Slot(self.area + IOMMU_SLOT_BYTES * i as u64)
    }

    /// A new request of `readable` + `writable` bytes: its slot, cleared; its index.
    fn push(&mut self, what: What, readable: u32, writable: u32) -> (Slot, usize) {
        assert!(!self.is_full(), "a full batch");
        assert!(u64::from(readable + writable) <= IOMMU_SLOT_BYTES);
        let i = self.n;
        self.n += 1;
        let s = self.slot(i);
        s.clear(0, u64::from(readable), u64::from(writable));
        s.put::<u8>(0, what.kind);
        self.lens[i] = (readable as u16, writable as u16);
        self.what[i] = what;
        self.used[i] = 0;
        (s, i)
    }

    pub fn attach(&mut self, domain: u32, endpoint: u32) -> usize {
        let what = What {
            kind: T_ATTACH,
            domain,
            a: endpoint,
            ..What::default()
        };
        let (s, i) = self.push(what, ATTACH_LEN, TAIL_LEN);
        s.put::<u32>(4, domain);
        s.put::<u32>(8, endpoint);
        i
    }

    pub fn detach(&mut self, domain: u32, endpoint: u32) -> usize {
        let what = What {
            kind: T_DETACH,
            domain,
            a: endpoint,
            ..What::default()
        };
        let (s, i) = self.push(what, DETACH_LEN, TAIL_LEN);
        s.put::<u32>(4, domain);
        s.put::<u32>(8, endpoint);
        i
    }

    /// MAP of `[virt_start, virt_end]` (inclusive) to `phys_start`.
    pub fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    ) -> usize {
        let what = What {
            kind: T_MAP,
            domain,
            a: flags,
            b: virt_start,
            c: virt_end,
            d: phys_start,
        };
        let (s, i) = self.push(what, MAP_LEN, TAIL_LEN);
        s.put::<u32>(4, domain);
        s.put::<u64>(8, virt_start);
        s.put::<u64>(16, virt_end);
        s.put::<u64>(24, phys_start);
        s.put::<u32>(32, flags);
        i
    }

    /// UNMAP of `[virt_start, virt_end]` (inclusive).
    pub fn unmap(&mut self, domain: u32, virt_start: u64, virt_end: u64) -> usize {
        let what = What {
            kind: T_UNMAP,
            domain,
            b: virt_start,
            c: virt_end,
            ..What::default()
        };
        let (s, i) = self.push(what, UNMAP_LEN, TAIL_LEN);
        s.put::<u32>(4, domain);
        s.put::<u64>(8, virt_start);
        s.put::<u64>(16, virt_end);
        i
    }

    pub fn set_dirty_tracking(&mut self, domain: u32, flags: u32) -> usize {
        let what = What {
            kind: T_SET_DIRTY_TRACKING,
            domain,
            a: flags,
            ..What::default()
        };
        let (s, i) = self.push(what, SET_DIRTY_TRACKING_LEN, TAIL_LEN);
        s.put::<u32>(4, domain);
        s.put::<u32>(8, flags);
        i
    }

    /// GET_DIRTY_BITMAP of `pages` 4 KiB pages from `iova`; the bitmap is preset to all
    /// ones.
    pub fn get_dirty_bitmap(&mut self, domain: u32, flags: u32, iova: u64, pages: u64) -> usize {
        let what = What {
            kind: T_GET_DIRTY_BITMAP,
            domain,
            a: flags,
            b: iova,
            c: pages * 4096,
            ..What::default()
        };
        let writable = 8 * bitmap_words(pages) as u32 + TAIL_LEN;
        let (s, i) = self.push(what, GET_DIRTY_BITMAP_LEN, writable);
        s.put::<u32>(4, domain);
        s.put::<u32>(8, flags);
        s.put::<u64>(16, iova);
        s.put::<u64>(24, pages * 4096);
        s.put::<u64>(32, 4096);
        i
    }

    /// Sends the requests and waits for every answer; a device breaking the queue
    /// protocol fails the run. The batch is empty again afterwards (answers stay readable
    /// until the next push).
    #[inline(never)]
    pub fn send(&mut self) {
        let n = self.n;
        if n == 0 {
            return;
        }
        let area = self.area;
        let lens = self.lens;
        let r = queue::transfer(
            IOMMU_REQUESTQ,
            n,
            |j| {
                let at = area + IOMMU_SLOT_BYTES * j as u64;
                let (readable, writable) = lens[j];
                Chain::new(&[
                    Buf {
                        addr: at,
                        len: u32::from(readable),
                        device_writes: false,
                    },
                    Buf {
                        addr: at + u64::from(readable),
                        len: u32::from(writable),
                        device_writes: true,
                    },
                ])
            },
            |j, len| self.used[j] = len,
        );
        if let Err(e) = r {
            crate::workload::fail(format_args!("virtio-iommu requestq: {e}"));
        }
        self.n = 0;
    }

    /// Request `i`'s status: the tail's first byte, or `None` if the device answered with
    /// a used length of 0 (no answer).
    pub fn status(&self, i: usize) -> Option<u8> {
        if self.used[i] == 0 {
            return None;
        }
        let (readable, writable) = self.lens[i];
        Some(
            self.slot(i)
                .get::<u8>(u64::from(readable) + u64::from(writable) - u64::from(TAIL_LEN)),
        )
    }

    /// Fails the run unless request `i` was answered OK: `guest: FAIL virtio-iommu: <what>
    /// answered <STATUS> (<n>)` (`why` is added in parentheses if given).
    pub fn expect_ok(&self, i: usize, why: Option<fmt::Arguments>) {
        match self.status(i) {
            Some(S_OK) => {}
            s => self.fail(i, s, why),
        }
    }

    /// Fails the run for request `i`'s answer `s`.
    #[cold]
    #[inline(never)]
    pub fn fail(&self, i: usize, s: Option<u8>, why: Option<fmt::Arguments>) -> ! {
        struct Answer(Option<u8>);
        impl fmt::Display for Answer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.0 {
                    Some(s) => write!(f, "answered {} ({s})", status_name(s)),
                    None => f.write_str("came back with used length 0 (no answer)"),
                }
            }
        }
        struct Why<'a>(Option<fmt::Arguments<'a>>);
        impl fmt::Display for Why<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.0 {
                    Some(w) => write!(f, " ({w})"),
                    None => Ok(()),
                }
            }
        }
        crate::workload::fail(format_args!(
            "virtio-iommu: {} {}{}",
            self.what[i],
            Answer(s),
            Why(why)
        ))
    }

    /// Word `w` of the bitmap of GET_DIRTY_BITMAP request `i`.
    pub fn bitmap_word(&self, i: usize, w: u64) -> u64 {
        self.slot(i)
            .get::<u64>(u64::from(GET_DIRTY_BITMAP_LEN) + 8 * w)
    }
}

/// PROBE of `endpoint` with `probe_size` bytes of properties, in the PROBE page of `mem`
/// (ring 0, at boot): the status (`None`: used length 0) and the properties.
#[inline(never)]
pub fn probe(mem: &DriverMemory, endpoint: u32, probe_size: u32) -> (Option<u8>, &'static [u8]) {
    let page = mem.iommu_probe();
    let s = Slot(page);
    s.clear(0, u64::from(PROBE_LEN), u64::from(probe_size + TAIL_LEN));
    s.put::<u8>(0, T_PROBE);
    s.put::<u32>(4, endpoint);
    let mut used = 0;
    let r = queue::transfer(
        IOMMU_REQUESTQ,
        1,
        |_| {
            Chain::new(&[
                Buf {
                    addr: page,
                    len: PROBE_LEN,
                    device_writes: false,
                },
                Buf {
                    addr: page + u64::from(PROBE_LEN),
                    len: probe_size + TAIL_LEN,
                    device_writes: true,
                },
            ])
        },
        |_, len| used = len,
    );
    if let Err(e) = r {
        crate::workload::fail(format_args!("virtio-iommu requestq: {e}"));
    }
    let props = page + u64::from(PROBE_LEN);
    // SAFETY: the PROBE page is RAM of the driver memory (checked at boot), used by the
    // boot vCPU only, at boot; the request has completed, so the device no longer writes
    // it; `probe_size` + 4 bytes fit the page (checked by `setup`). The slice is only read
    // during setup, before anything writes the page again.
    let bytes = unsafe { core::slice::from_raw_parts(props as *const u8, probe_size as usize) };
    let status = (used != 0).then(|| s.get::<u8>(u64::from(PROBE_LEN + probe_size)));
    (status, bytes)
}
