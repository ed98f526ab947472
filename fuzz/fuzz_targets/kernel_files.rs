//! A `--kernel` file (user-supplied) through the whole loader, `vmm::boot::load_kernel`,
//! into a 512 MiB guest: format detection, the bzImage setup-header reader and its checks
//! (protocol version, 64-bit entry, setup sectors against the file's length, where the
//! kernel runs and how far `init_size` reaches), the copy into RAM, and the ELF/PVH path
//! for files that are ELF. Any file must be loaded or refused with an error, never a
//! panic or a write outside RAM; a loaded kernel's entry point lies in RAM.
#![no_main]

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryBackend;
use vmm::boot::{layout, load_kernel, BootEntry};
use vmm::memory::GuestMemoryMmap;

const MEM: u64 = 512 << 20;

fn guest() -> &'static GuestMemoryMmap {
    static MEMORY: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEMORY.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&layout::ram_regions(MEM)).expect("512 MiB of guest RAM")
    })
}

fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("ferry-fuzz-kernel-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(data))
        .expect("writing the scratch kernel file");
    let mem = guest();
    let Ok(entry) = load_kernel(mem, path, "console=ttyS0 reboot=t", None, 1) else {
        return;
    };
    let at = match entry {
        BootEntry::Pvh { entry, .. } => entry,
        BootEntry::Linux64 { entry, .. } => entry,
    };
    assert!(mem.address_in_range(at), "entry {at:#x?} outside RAM");
});
