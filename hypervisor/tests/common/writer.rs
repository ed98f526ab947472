//! A tiny 32-bit guest that writes one byte into each of a set of pages, for the dirty
//! tracking tests and the harvest benchmark.
#![allow(dead_code)]

use std::sync::Arc;

use hypervisor::kvm_bindings::kvm_segment;
use hypervisor::*;

const CODE_GPA: u64 = 0x1000;
/// 32-bit code: `loop: mov [esi], al; add esi, edx; dec ecx; jnz loop; out 0xf4, al; hlt`.
const WRITER: [u8; 10] = [0x88, 0x06, 0x01, 0xd6, 0x49, 0x75, 0xf9, 0xe6, 0xf4, 0xf4];
pub const PAGE: u64 = 4096;

pub struct Guest {
    pub vm: Arc<Vm>,
    pub vcpu: Vcpu,
    pub mem: *mut u8,
    pub size: usize,
}

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
    // Protected mode with caches on (KVM resets CR0 with CD and NW set).
    sregs.cr0 = 0x11;
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
    pub fn write_pages(&mut self, start: u64, count: u64, stride_pages: u64) {
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
