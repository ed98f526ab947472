//! A tiny 32-bit guest that writes one byte into each of a set of pages, on one or more
//! vCPUs, for the dirty tracking tests and the harvest benchmark. Every run is bounded:
//! a vCPU that does not finish by its deadline fails with its ring's indexes.
#![allow(dead_code)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::kvm_bindings::{kvm_mp_state, kvm_segment, KVM_MP_STATE_RUNNABLE};
use hypervisor::*;

const CODE_GPA: u64 = 0x1000;
/// 32-bit code: `loop: mov [esi], al; add esi, edx; dec ecx; jnz loop; out 0xf4, al; hlt`.
const WRITER: [u8; 10] = [0x88, 0x06, 0x01, 0xd6, 0x49, 0x75, 0xf9, 0xe6, 0xf4, 0xf4];
pub const PAGE: u64 = 4096;
/// How long one `write_pages` may take before the test fails (CI runs on 2 loaded cores;
/// a healthy run of the largest test writer takes well under a second).
pub const WRITE_DEADLINE: Duration = Duration::from_secs(60);

pub struct Guest {
    pub vm: Arc<Vm>,
    pub vcpus: Vec<Vcpu>,
    pub mem: *mut u8,
    pub size: usize,
}

// SAFETY: `mem` is the guest RAM mapping, owned by Guest and only unmapped in Drop; the
// tests read it from other threads the way the VMM does (plain bytes).
unsafe impl Send for Guest {}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `guest`. No vCPU runs any more, and KVM's MMU
        // notifiers drop its own references when the range is unmapped.
        unsafe { libc::munmap(self.mem.cast(), self.size) };
    }
}

pub enum Mode {
    Ring(u32),
    Bitmap,
}

pub fn guest(mode: Mode, size: usize) -> Guest {
    guest_with_vcpus(mode, size, 1)
}

/// A guest of `size` bytes with `count` vCPUs, each ready to run the writer.
pub fn guest_with_vcpus(mode: Mode, size: usize, count: u32) -> Guest {
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
    let (vm, mut vcpus) = wm.create_vcpus(count).unwrap();
    for vcpu in &mut vcpus {
        flat_protected_mode(vcpu);
    }
    Guest {
        vm,
        vcpus,
        mem,
        size,
    }
}

/// Flat 32-bit protected mode; application processors made runnable (they would wait
/// for INIT/SIPI otherwise).
fn flat_protected_mode(vcpu: &mut Vcpu) {
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
    // Protected mode with caches on (KVM resets CR0 with CD and NW set).
    sregs.cr0 = 0x11;
    vcpu.fd().set_sregs(&sregs).unwrap();
    vcpu.fd()
        .set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .unwrap();
}

/// What one vCPU's ring and the VM's ring counters looked like, for failure messages.
pub fn ring_report(vm: &Vm, index: u32) -> String {
    format!(
        "vCPU {index} ring: {}; VM: {}",
        vm.ring_indexes(index)
            .map_or("no ring".to_string(), |i| i.to_string()),
        ring_counters(vm)
    )
}

/// The VM's ring counters.
pub fn ring_counters(vm: &Vm) -> String {
    let s = &vm.stats;
    format!(
        "ring-full exits {}, overflows {}, retaken {}, skipped {}, steps {}, reset retries {}",
        s.ring_full_exits.load(Ordering::Relaxed),
        s.ring_overflows.load(Ordering::Relaxed),
        s.ring_retaken.load(Ordering::Relaxed),
        s.ring_skipped.load(Ordering::Relaxed),
        s.ring_steps.load(Ordering::Relaxed),
        s.ring_reset_retries.load(Ordering::Relaxed),
    )
}

/// Runs the writer on `vcpu` over `count` pages from `start`, every `stride_pages` pages,
/// storing `value` in the first byte of each, until it reports done on port 0xf4. Fails
/// with the ring's state if that takes longer than `WRITE_DEADLINE` or the vCPU exits
/// in a way the writer never does.
pub fn run_writer(vcpu: &mut Vcpu, start: u64, count: u64, stride_pages: u64, value: u8) {
    let mut regs = vcpu.fd().get_regs().unwrap();
    regs.rip = CODE_GPA;
    regs.rflags = 2;
    regs.rsi = start;
    regs.rcx = count;
    regs.rdx = stride_pages * PAGE;
    regs.rax = u64::from(value);
    vcpu.fd().set_regs(&regs).unwrap();
    let deadline = Instant::now() + WRITE_DEADLINE;
    let mut exits = 0u64;
    let vm = vcpu.vm().clone();
    let index = vcpu.index();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(0xf4, _)) => return,
            Ok(VcpuExit::DirtyRingFull | VcpuExit::Interrupted) => exits += 1,
            Ok(other) => panic!(
                "vCPU {index}: unexpected exit {other:?}; {}",
                ring_report(&vm, index)
            ),
            Err(e) => panic!("vCPU {index}: {e}; {}", ring_report(&vm, index)),
        }
        assert!(
            Instant::now() < deadline,
            "vCPU {index} did not finish {count} pages within {WRITE_DEADLINE:?} \
             ({exits} exits): {}",
            ring_report(&vm, index)
        );
    }
}

impl Guest {
    /// Runs the writer on vCPU 0 (see [`run_writer`]).
    pub fn write_pages(&mut self, start: u64, count: u64, stride_pages: u64) {
        run_writer(&mut self.vcpus[0], start, count, stride_pages, 0x5a);
    }

    /// Where guest RAM is, for threads that copy pages while vCPUs run.
    pub fn ram(&self) -> GuestRam {
        GuestRam {
            base: self.mem as usize,
            size: self.size,
        }
    }
}

/// Guest RAM seen from another thread, the way a VMM copies it during a migration.
#[derive(Clone, Copy)]
pub struct GuestRam {
    base: usize,
    size: usize,
}

impl GuestRam {
    /// Copies page `page` into `out` (4096 bytes).
    pub fn copy_page(&self, page: u64, out: &mut [u8]) {
        let at = (page * PAGE) as usize;
        assert!(at + PAGE as usize <= self.size && out.len() == PAGE as usize);
        // SAFETY: inside the mapping, which outlives every user (Guest drops last). A
        // vCPU may write the page meanwhile: the bytes are then stale, which is what the
        // dirty log exists to catch.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.base + at) as *const u8,
                out.as_mut_ptr(),
                out.len(),
            )
        };
    }
}
