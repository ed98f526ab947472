//! What the device dirty log costs per request: the time vm-memory takes to mark pages in
//! the per-region `AtomicBitmap`, measured against the same writes into memory without a
//! bitmap, scaled by the marks one virtio-blk read makes (data pages, the status byte,
//! the used-ring element and index). Run: `cargo bench -p devices --bench dirty_marks`
//! (part of `scripts/dev_cli.sh bench dma`). Prints a table; nothing is asserted.

use std::hint::black_box;
use std::num::NonZeroUsize;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress};

const N: u64 = 5_000_000;

#[path = "support/timing.rs"]
mod timing;

fn ns_per(f: impl FnMut(u64)) -> f64 {
    timing::ns_per(N, f)
}

fn main() {
    let logged =
        vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20)])
            .unwrap();
    let plain =
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let small_logged = ns_per(|i| logged.write_obj(i as u16, GuestAddress(0x2002)).unwrap());
    let small_plain = ns_per(|i| plain.write_obj(i as u16, GuestAddress(0x2002)).unwrap());
    let bitmap = AtomicBitmap::new(1 << 20, NonZeroUsize::new(4096).unwrap());
    let page = ns_per(|_| bitmap.set_addr_range(black_box(0x3000), 4096));
    let pages16 = ns_per(|_| bitmap.set_addr_range(black_box(0x10000), 16 * 4096));
    let mark = small_logged - small_plain;
    println!("| what | ns |");
    println!("|---|---|");
    println!("| 2-byte write into guest RAM, logged | {small_logged:.1} |");
    println!("| the same, no bitmap | {small_plain:.1} |");
    println!("| one mark (the difference) | {mark:.1} |");
    println!("| marking one 4 KiB page (set_addr_range) | {page:.1} |");
    println!("| marking 16 pages (a 64 KiB read) | {pages16:.1} |");
    // A read request: its data, the status byte, the used element and the used index.
    let req4k = page + 3.0 * mark;
    let req64k = pages16 + 3.0 * mark;
    println!();
    println!("| request | log cost per request, ns |");
    println!("|---|---|");
    println!("| 4K read | {req4k:.0} |");
    println!("| 64K read | {req64k:.0} |");
}
