//! Dirty tracking against the real /dev/kvm: a tiny 32-bit guest writes a known set of
//! pages and the harvest must return exactly those.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hypervisor::kvm_bindings::{
    kvm_segment, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
};
use hypervisor::*;

const CODE_GPA: u64 = 0x1000;
/// 32-bit code: `loop: mov [esi], al; add esi, edx; dec ecx; jnz loop; out 0xf4, al; hlt`.
const WRITER: [u8; 10] = [0x88, 0x06, 0x01, 0xd6, 0x49, 0x75, 0xf9, 0xe6, 0xf4, 0xf4];
const PAGE: u64 = 4096;

struct Guest {
    vm: Arc<Vm>,
    vcpu: Vcpu,
    mem: *mut u8,
    size: usize,
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `guest`. No vCPU runs any more, and KVM's MMU
        // notifiers drop its own references when the range is unmapped.
        unsafe { libc::munmap(self.mem.cast(), self.size) };
    }
}

enum Mode {
    Ring(u32),
    Bitmap,
}

fn guest(mode: Mode, size: usize) -> Guest {
    // SAFETY: anonymous private mapping, checked below; it outlives the VM (see Drop).
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED);
    let mem = mem.cast::<u8>();
    // SAFETY: CODE_GPA + code length is inside the fresh mapping.
    unsafe {
        std::ptr::copy_nonoverlapping(WRITER.as_ptr(), mem.add(CODE_GPA as usize), WRITER.len())
    };
    let b = VmBuilder::new().unwrap();
    let b = match mode {
        Mode::Ring(n) => b.enable_dirty_ring(n).unwrap(),
        Mode::Bitmap => b.use_dirty_bitmap().unwrap(),
    };
    let slot = MemorySlot {
        guest_phys_addr: 0,
        size: size as u64,
        host_addr: mem as u64,
    };
    // SAFETY: the mapping stays until Guest is dropped, after the VM.
    let wm = unsafe { b.add_memory(vec![slot]) }.unwrap();
    let (vm, mut vcpus) = wm.create_vcpus(1).unwrap();
    let vcpu = vcpus.pop().unwrap();
    let mut sregs = vcpu.fd().get_sregs().unwrap();
    let flat = |selector, type_| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = flat(0x8, 0xb);
    sregs.ds = flat(0x10, 0x3);
    sregs.es = sregs.ds;
    sregs.ss = sregs.ds;
    sregs.fs = sregs.ds;
    sregs.gs = sregs.ds;
    sregs.cr0 |= 1;
    vcpu.fd().set_sregs(&sregs).unwrap();
    Guest {
        vm,
        vcpu,
        mem,
        size,
    }
}

impl Guest {
    /// Runs the writer over `count` pages from `start`, every `stride_pages` pages, until
    /// it reports done on port 0xf4.
    fn write_pages(&mut self, start: u64, count: u64, stride_pages: u64) {
        let mut regs = self.vcpu.fd().get_regs().unwrap();
        regs.rip = CODE_GPA;
        regs.rflags = 2;
        regs.rsi = start;
        regs.rcx = count;
        regs.rdx = stride_pages * PAGE;
        regs.rax = 0x5a;
        self.vcpu.fd().set_regs(&regs).unwrap();
        loop {
            match self.vcpu.run().unwrap() {
                VcpuExit::IoOut(0xf4, _) => return,
                VcpuExit::DirtyRingFull | VcpuExit::Interrupted => {}
                other => panic!("unexpected exit {other:?}"),
            }
        }
    }
}

fn dirty_pages(bitmaps: &[Vec<u64>]) -> Vec<u64> {
    let mut out = vec![];
    for (w, word) in bitmaps[0].iter().enumerate() {
        for b in 0..64 {
            if word & (1 << b) != 0 {
                out.push(w as u64 * 64 + b);
            }
        }
    }
    out
}

fn expected(start: u64, count: u64, stride: u64) -> Vec<u64> {
    (0..count).map(|i| start / PAGE + i * stride).collect()
}

fn harvest_is_exact(mode: Mode) {
    let mut g = guest(mode, 64 << 20);
    g.vm.start_dirty_log().unwrap();
    g.write_pages(0x10_0000, 37, 3);
    let got = dirty_pages(&g.vm.sync_dirty(SyncKind::Live).unwrap());
    assert_eq!(got, expected(0x10_0000, 37, 3));
    // Nothing more until the guest writes again.
    assert!(dirty_pages(&g.vm.sync_dirty(SyncKind::Live).unwrap()).is_empty());
    // The same pages dirtied again are reported again (they were re-protected).
    g.write_pages(0x10_0000, 5, 3);
    g.write_pages(0x200_0000, 3, 1);
    let mut want = expected(0x10_0000, 5, 3);
    want.extend(expected(0x200_0000, 3, 1));
    assert_eq!(
        dirty_pages(&g.vm.sync_dirty(SyncKind::Final).unwrap()),
        want
    );
}

#[test]
fn ring_harvest_returns_exactly_the_written_pages() {
    harvest_is_exact(Mode::Ring(4096));
}

#[test]
fn bitmap_harvest_returns_exactly_the_written_pages() {
    harvest_is_exact(Mode::Bitmap);
}

#[test]
fn sync_before_start_is_an_error() {
    let g = guest(Mode::Ring(4096), 16 << 20);
    let e = g.vm.sync_dirty(SyncKind::Live).unwrap_err().to_string();
    assert!(e.contains("start_dirty_log"), "{e}");
}

#[test]
fn ring_full_exits_lose_no_page() {
    // 1024 entries, or KVM's minimum if larger.
    let entries = 1024u32.max(MIN_RING_ENTRIES);
    let pages = u64::from(entries) * 12;
    let mut g = guest(Mode::Ring(entries), ((pages + 512) * PAGE) as usize);
    g.vm.start_dirty_log().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let vm = g.vm.clone();
    let s = stop.clone();
    // A harvester running beside the vCPU, slower than the guest dirties pages, so the
    // ring fills and the vCPU must harvest on its own.
    let harvester = std::thread::spawn(move || {
        let mut collected = vec![0u64; 0];
        while !s.load(Ordering::Relaxed) {
            let bm = vm.sync_dirty(SyncKind::Live).unwrap();
            if collected.is_empty() {
                collected = bm[0].clone();
            } else {
                collected.iter_mut().zip(&bm[0]).for_each(|(a, b)| *a |= b);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        collected
    });
    g.write_pages(0x20_0000, pages, 1);
    stop.store(true, Ordering::Relaxed);
    let mut collected = harvester.join().unwrap();
    let last = g.vm.sync_dirty(SyncKind::Final).unwrap();
    if collected.is_empty() {
        collected = last[0].clone();
    } else {
        collected
            .iter_mut()
            .zip(&last[0])
            .for_each(|(a, b)| *a |= b);
    }
    let full = g.vm.stats.ring_full_exits.load(Ordering::Relaxed);
    assert!(full > 0, "the test must provoke ring-full exits");
    assert_eq!(dirty_pages(&[collected]), expected(0x20_0000, pages, 1));
    eprintln!("ring of {entries}: {pages} pages, {full} ring-full exits");
}

/// A probe that adds capabilities to what the real kernel advertises.
struct Claim(&'static [(u32, i32)]);

impl CapabilityProbe for Claim {
    fn check_extension_raw(&self, cap: u32) -> i32 {
        if let Some((_, v)) = self.0.iter().find(|(c, _)| *c == cap) {
            return *v;
        }
        let kvm = hypervisor::kvm_ioctls::Kvm::new().unwrap();
        kvm.check_extension_raw(cap as _)
    }
}

#[test]
fn with_bitmap_absent_enables_ring_only() {
    let b = VmBuilder::new().unwrap();
    let caps = b.dirty_caps();
    assert!(caps.ring.is_some(), "this machine's KVM has dirty rings");
    let t = b
        .enable_dirty_ring_probed(4096, &Claim(&[(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, 0)]))
        .unwrap()
        .tracking();
    assert!(matches!(
        t,
        DirtyTracking::Ring {
            entries: 4096,
            backup_bitmap: false,
            ..
        }
    ));
}

#[test]
fn with_bitmap_advertised_is_enabled_before_memslots() {
    let b = VmBuilder::new().unwrap();
    let real = b.dirty_caps().with_bitmap;
    let r = b.enable_dirty_ring_probed(4096, &Claim(&[(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, 1)]));
    if real {
        assert!(matches!(
            r.unwrap().tracking(),
            DirtyTracking::Ring {
                backup_bitmap: true,
                ..
            }
        ));
    } else {
        // This kernel lacks it: the builder still asked for it, and KVM's refusal is a
        // clear error naming the capability and the value.
        let e = r.err().expect("x86 KVM refuses WITH_BITMAP").to_string();
        assert!(
            e.contains("KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP") && e.contains("value 0"),
            "{e}"
        );
    }
}

#[test]
fn kernel_refusal_names_capability_and_value() {
    // Claim a larger maximum than KVM really has, so validation passes and KVM refuses.
    let b = VmBuilder::new().unwrap();
    let r = b.enable_dirty_ring_probed(
        1 << 20,
        &Claim(&[
            (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 1 << 30),
            (KVM_CAP_DIRTY_LOG_RING, 1 << 30),
        ]),
    );
    let e = r.err().expect("KVM refuses a 16 MiB ring").to_string();
    assert!(
        e.contains("KVM_CAP_DIRTY_LOG_RING_ACQ_REL") && e.contains("16777216"),
        "{e}"
    );
}

#[test]
fn bad_ring_sizes_name_the_accepted_range() {
    for n in [1000, 64, 1 << 20] {
        let e = VmBuilder::new()
            .unwrap()
            .enable_dirty_ring(n)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&n.to_string()) && e.contains("256") && e.contains("65536"),
            "{e}"
        );
    }
}
