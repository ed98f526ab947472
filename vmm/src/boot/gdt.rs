//! The boot GDT, shared by both protocols, and the `kvm_segment`s that match it.
//!
//! KVM takes segment state from `kvm_sregs`, not from the GDT in memory; the table is
//! written anyway so that a guest reloading a selector gets the same descriptor.

use kvm_bindings::{kvm_dtable, kvm_segment};
use vm_memory::Bytes;

use super::layout::BOOT_GDT_ADDR;
use super::BootError;
use crate::memory::GuestMemoryMmap;

/// Flat 4 GiB 32-bit code, execute/read: the PVH CS.
pub const CODE32_SELECTOR: u16 = 0x08;
/// 64-bit code: Linux's `__BOOT_CS`, which the 64-bit boot protocol asks for.
pub const CODE64_SELECTOR: u16 = 0x10;
/// Flat 4 GiB data, read/write: Linux's `__BOOT_DS`, and the PVH DS/ES/SS.
pub const DATA_SELECTOR: u16 = 0x18;
/// A 32-bit busy TSS (base 0, limit 0x67), which PVH requires in TR and VMX wants usable.
pub const TSS_SELECTOR: u16 = 0x20;

/// Descriptor access/flag bits in the layout of bits 40..56 of a descriptor:
/// low byte = P|DPL|S|type, high nibble = G|D/B|L|AVL.
const CODE32_FLAGS: u16 = 0xc09b; // G, D, P, S, code execute/read accessed
const CODE64_FLAGS: u16 = 0xa09b; // G, L, P, S, code execute/read accessed
const DATA_FLAGS: u16 = 0xc093; // G, B, P, S, data read/write accessed
const TSS_FLAGS: u16 = 0x008b; // P, system type 0xb: busy 32-bit TSS

/// Encodes a segment descriptor.
const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | (((flags as u64) & 0xf0ff) << 40)
}

/// The boot GDT: null, code32, code64, data, TSS (plus the upper half a 64-bit TSS
/// descriptor would use, zero, so the table is valid in either mode).
pub const GDT: [u64; 6] = [
    0,
    descriptor(CODE32_FLAGS, 0, 0xfffff),
    descriptor(CODE64_FLAGS, 0, 0xfffff),
    descriptor(DATA_FLAGS, 0, 0xfffff),
    descriptor(TSS_FLAGS, 0, 0x67),
    0,
];

/// Writes the boot GDT at `BOOT_GDT_ADDR`.
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let mut bytes = [0u8; GDT.len() * 8];
    for (chunk, d) in bytes.chunks_exact_mut(8).zip(GDT) {
        chunk.copy_from_slice(&d.to_le_bytes());
    }
    mem.write_slice(&bytes, BOOT_GDT_ADDR)
        .map_err(|source| BootError::GuestMemory {
            what: "boot GDT",
            addr: BOOT_GDT_ADDR.0,
            source,
        })
}

/// GDTR value for the boot GDT.
pub fn gdt_table() -> kvm_dtable {
    kvm_dtable {
        base: BOOT_GDT_ADDR.0,
        limit: (GDT.len() * 8 - 1) as u16,
        ..Default::default()
    }
}

/// The hidden segment state KVM needs for `selector`, decoded from its GDT descriptor.
pub fn segment(selector: u16) -> kvm_segment {
    let d = GDT[usize::from(selector >> 3)];
    let bit = |n: u32| ((d >> n) & 1) as u8;
    let raw_limit = ((d >> 32) & 0xf_0000) | (d & 0xffff);
    let g = bit(55);
    // KVM wants the limit in bytes; with G set the descriptor counts 4 KiB units.
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base: ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000),
        limit: limit as u32,
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        s: bit(44),
        dpl: ((d >> 45) & 3) as u8,
        present: bit(47),
        avl: bit(52),
        l: bit(53),
        db: bit(54),
        g,
        unusable: 0,
        padding: 0,
    }
}

/// Loads the boot GDT's flat segments into `sregs`: CS = `code`, every data segment =
/// [`DATA_SELECTOR`], a busy TSS in TR, and no IDT until the guest loads one (an early
/// fault then ends in a clean shutdown exit, not a jump through real-mode vectors).
pub fn load_boot_segments(sregs: &mut kvm_bindings::kvm_sregs, code: u16) {
    sregs.cs = segment(code);
    let data = segment(DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SELECTOR);
    sregs.gdt = gdt_table();
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress as Ga;

    #[test]
    fn descriptors_match_the_usual_encodings() {
        assert_eq!(GDT[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(GDT[2], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[3], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT[4], 0x0000_8b00_0000_0067);
    }

    #[test]
    fn segments_decode() {
        let cs = segment(CODE32_SELECTOR);
        assert_eq!((cs.base, cs.limit, cs.type_), (0, 0xffff_ffff, 0xb));
        assert_eq!(
            (cs.present, cs.s, cs.db, cs.l, cs.g, cs.dpl),
            (1, 1, 1, 0, 1, 0)
        );
        let cs64 = segment(CODE64_SELECTOR);
        assert_eq!((cs64.l, cs64.db, cs64.type_), (1, 0, 0xb));
        let ds = segment(DATA_SELECTOR);
        assert_eq!((ds.limit, ds.type_, ds.db, ds.s), (0xffff_ffff, 3, 1, 1));
        let tr = segment(TSS_SELECTOR);
        assert_eq!(
            (tr.base, tr.limit, tr.type_, tr.s, tr.g),
            (0, 0x67, 0xb, 0, 0)
        );
    }

    #[test]
    fn gdt_is_written_where_gdtr_points() {
        let mem = GuestMemoryMmap::from_ranges(&[(Ga(0), 0x10_0000)]).unwrap();
        write_gdt(&mem).unwrap();
        let t = gdt_table();
        assert_eq!(t.base, BOOT_GDT_ADDR.0);
        assert_eq!(usize::from(t.limit) + 1, GDT.len() * 8);
        for (i, d) in GDT.iter().enumerate() {
            let got: u64 = mem.read_obj(Ga(t.base + 8 * i as u64)).unwrap();
            assert_eq!(got, *d);
        }
    }
}
