//! Just enough ELF to boot a PVH kernel: the header, the loadable segments and the Xen
//! `XEN_ELFNOTE_PHYS32_ENTRY` note.
//!
//! Why not `linux_loader::loader::Elf`: it reads only ELF64 (a PVH entry is 32-bit code
//! and small guests are often linked as ELF32), it keeps the PVH result of the *last*
//! PT_NOTE segment only (so a Xen note followed by, say, a GNU property note is missed),
//! and it does not zero `.bss`. Parsing the headers first also lets the caller check
//! every segment against the memory layout before anything is written.

use std::io::{Read, Seek, SeekFrom};

/// `\x7fELF`.
pub const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
/// Note type of the 32-bit physical PVH entry point, in notes named "Xen".
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const EI_CLASS: usize = 4;
const EI_DATA: usize = 5;
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// More than any kernel has; bounds the header read for a hostile file.
const MAX_PHNUM: u16 = 1024;
/// Note segments are small; refuse to buffer a huge one.
const MAX_NOTE_SEGMENT: u64 = 1 << 20;

/// Why an ELF file cannot be booted.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("not an ELF file (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("ELF class {0} is neither 32-bit (1) nor 64-bit (2)")]
    Class(u8),
    #[error("ELF data encoding {0} is not little-endian (1)")]
    Endian(u8),
    #[error("ELF machine {0} is not x86 (EM_386=3, EM_X86_64=62)")]
    Machine(u16),
    #[error("program header entry size {got} is not {want}")]
    PhentSize { got: u16, want: u16 },
    #[error("{0} program headers is more than the {MAX_PHNUM} accepted")]
    PhNum(u16),
    #[error("{what} at file offset {offset:#x} (+{len:#x}) runs past the end of the file ({file_len:#x} bytes)")]
    Truncated {
        what: &'static str,
        offset: u64,
        len: u64,
        file_len: u64,
    },
    #[error("segment {index}: file size {filesz:#x} is larger than memory size {memsz:#x}")]
    SegmentSizes {
        index: usize,
        filesz: u64,
        memsz: u64,
    },
    #[error("segment {index}: physical address {paddr:#x} + size {memsz:#x} overflows")]
    SegmentOverflow {
        index: usize,
        paddr: u64,
        memsz: u64,
    },
    #[error(
        "note segment {index} is {size:#x} bytes, more than the {MAX_NOTE_SEGMENT:#x} accepted"
    )]
    NoteSegmentTooBig { index: usize, size: u64 },
    #[error("malformed note in segment {index} at byte {at:#x}")]
    BadNote { index: usize, at: usize },
    #[error("PVH entry note descriptor is {0} bytes (expected 4 or 8)")]
    PvhNoteSize(u32),
    #[error("PVH entry point {0:#x} is not a 32-bit address")]
    PvhEntryTooHigh(u64),
    #[error("PVH entry point {0:#x} is outside every loadable segment")]
    PvhEntryOutsideImage(u64),
}

/// One PT_LOAD segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

impl Segment {
    /// End (exclusive) of the segment in guest physical memory.
    pub fn end(&self) -> u64 {
        self.paddr + self.memsz
    }
}

/// What booting needs from an ELF image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfImage {
    /// 32 or 64.
    pub bits: u8,
    /// PT_LOAD segments with a non-zero memory size.
    pub segments: Vec<Segment>,
    /// The PVH 32-bit entry point, if the image has the Xen note.
    pub pvh_entry: Option<u64>,
}

/// Whether `head` (the first bytes of a file) starts like an ELF file.
pub fn is_elf(head: &[u8]) -> bool {
    head.starts_with(&ELF_MAGIC)
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Reads `len` bytes at `offset`, after checking they are inside the file.
fn read_at<R: Read + Seek>(
    r: &mut R,
    what: &'static str,
    offset: u64,
    len: u64,
    file_len: u64,
) -> Result<Vec<u8>, ElfError> {
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(ElfError::Truncated {
            what,
            offset,
            len,
            file_len,
        });
    }
    r.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Parses the ELF header, the program headers and any PVH entry note.
pub fn parse<R: Read + Seek>(r: &mut R) -> Result<ElfImage, ElfError> {
    let file_len = r.seek(SeekFrom::End(0))?;
    let ident = read_at(r, "ELF identification", 0, 16, file_len)?;
    if !is_elf(&ident) {
        return Err(ElfError::Magic(ident[..4].try_into().unwrap()));
    }
    if ident[EI_DATA] != ELFDATA2LSB {
        return Err(ElfError::Endian(ident[EI_DATA]));
    }
    let bits = match ident[EI_CLASS] {
        ELFCLASS32 => 32,
        ELFCLASS64 => 64,
        c => return Err(ElfError::Class(c)),
    };
    let ehdr_len = if bits == 64 { 64 } else { 52 };
    let eh = read_at(r, "ELF header", 0, ehdr_len, file_len)?;
    let machine = u16_at(&eh, 18);
    if machine != EM_386 && machine != EM_X86_64 {
        return Err(ElfError::Machine(machine));
    }
    let (phoff, phentsize, phnum, want_phentsize) = if bits == 64 {
        (u64_at(&eh, 32), u16_at(&eh, 54), u16_at(&eh, 56), 56)
    } else {
        (
            u64::from(u32_at(&eh, 28)),
            u16_at(&eh, 42),
            u16_at(&eh, 44),
            32,
        )
    };
    if phnum > MAX_PHNUM {
        return Err(ElfError::PhNum(phnum));
    }
    if phnum > 0 && phentsize != want_phentsize {
        return Err(ElfError::PhentSize {
            got: phentsize,
            want: want_phentsize,
        });
    }
    let phdrs = read_at(
        r,
        "program headers",
        phoff,
        u64::from(phnum) * u64::from(want_phentsize),
        file_len,
    )?;

    let mut segments = Vec::new();
    let mut pvh_entry = None;
    for (index, ph) in phdrs.chunks_exact(usize::from(want_phentsize)).enumerate() {
        // (type, offset, paddr, filesz, memsz, align)
        let (p_type, offset, paddr, filesz, memsz, align) = if bits == 64 {
            (
                u32_at(ph, 0),
                u64_at(ph, 8),
                u64_at(ph, 24),
                u64_at(ph, 32),
                u64_at(ph, 40),
                u64_at(ph, 48),
            )
        } else {
            (
                u32_at(ph, 0),
                u64::from(u32_at(ph, 4)),
                u64::from(u32_at(ph, 12)),
                u64::from(u32_at(ph, 16)),
                u64::from(u32_at(ph, 20)),
                u64::from(u32_at(ph, 28)),
            )
        };
        match p_type {
            PT_LOAD if memsz > 0 => {
                if filesz > memsz {
                    return Err(ElfError::SegmentSizes {
                        index,
                        filesz,
                        memsz,
                    });
                }
                if paddr.checked_add(memsz).is_none() {
                    return Err(ElfError::SegmentOverflow {
                        index,
                        paddr,
                        memsz,
                    });
                }
                if offset.checked_add(filesz).is_none_or(|end| end > file_len) {
                    return Err(ElfError::Truncated {
                        what: "loadable segment",
                        offset,
                        len: filesz,
                        file_len,
                    });
                }
                segments.push(Segment {
                    offset,
                    paddr,
                    filesz,
                    memsz,
                });
            }
            PT_NOTE if pvh_entry.is_none() => {
                if filesz > MAX_NOTE_SEGMENT {
                    return Err(ElfError::NoteSegmentTooBig {
                        index,
                        size: filesz,
                    });
                }
                let notes = read_at(r, "note segment", offset, filesz, file_len)?;
                pvh_entry = find_pvh_note(&notes, align, index)?;
            }
            _ => {}
        }
    }
    if let Some(entry) = pvh_entry {
        if !segments.iter().any(|s| (s.paddr..s.end()).contains(&entry)) {
            return Err(ElfError::PvhEntryOutsideImage(entry));
        }
    }
    Ok(ElfImage {
        bits,
        segments,
        pvh_entry,
    })
}

/// Walks the notes of one PT_NOTE segment for the Xen PHYS32_ENTRY note.
fn find_pvh_note(notes: &[u8], seg_align: u64, index: usize) -> Result<Option<u64>, ElfError> {
    // Name and descriptor each start aligned, relative to the segment: to 4 bytes, or to
    // 8 in segments aligned to 8 (GNU property notes), as readelf decides.
    let align = if seg_align == 8 { 8 } else { 4 };
    let mut at = 0;
    while at + 12 <= notes.len() {
        let bad = || ElfError::BadNote { index, at };
        let namesz = u32_at(notes, at) as usize;
        let descsz = u32_at(notes, at + 4) as usize;
        let n_type = u32_at(notes, at + 8);
        let name_at = at + 12;
        let name_end = name_at + namesz;
        let desc_at = name_end.next_multiple_of(align);
        let desc_end = desc_at + descsz;
        if desc_end > notes.len() {
            return Err(bad());
        }
        if n_type == XEN_ELFNOTE_PHYS32_ENTRY && &notes[name_at..name_end] == b"Xen\0" {
            let desc = &notes[desc_at..desc_end];
            let entry = match descsz {
                4 => u64::from(u32_at(desc, 0)),
                8 => u64_at(desc, 0),
                n => return Err(ElfError::PvhNoteSize(n as u32)),
            };
            if entry > u64::from(u32::MAX) {
                return Err(ElfError::PvhEntryTooHigh(entry));
            }
            return Ok(Some(entry));
        }
        at = desc_end.next_multiple_of(align);
    }
    Ok(None)
}

/// Builds small ELF images for tests (here and in `pvh`): one PT_LOAD segment with
/// `code` at `paddr` (plus `bss` zero bytes), and PT_NOTE segments holding `notes`.
#[cfg(test)]
pub(crate) mod build {
    /// One note: name, type, descriptor.
    pub struct Note<'a> {
        pub name: &'a [u8],
        pub n_type: u32,
        pub desc: &'a [u8],
    }

    /// The Xen PVH entry note with a 4-byte descriptor.
    pub fn pvh_note(entry: u32) -> Vec<u8> {
        note_bytes(&Note {
            name: b"Xen\0",
            n_type: super::XEN_ELFNOTE_PHYS32_ENTRY,
            desc: &entry.to_le_bytes(),
        })
    }

    pub fn note_bytes(n: &Note) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend((n.name.len() as u32).to_le_bytes());
        v.extend((n.desc.len() as u32).to_le_bytes());
        v.extend(n.n_type.to_le_bytes());
        v.extend(n.name);
        v.resize(v.len().next_multiple_of(4), 0);
        v.extend(n.desc);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    /// An x86 ELF of class `bits` (32 or 64): PT_LOAD(code at paddr, memsz = code + bss),
    /// then one PT_NOTE per entry of `note_segments`.
    pub fn elf(bits: u8, paddr: u64, code: &[u8], bss: u64, note_segments: &[Vec<u8>]) -> Vec<u8> {
        let (ehsize, phentsize) = if bits == 64 { (64, 56) } else { (52, 32) };
        let phnum = 1 + note_segments.len();
        let data_off = ehsize + phentsize * phnum;
        let mut out = vec![0u8; data_off];
        out[..4].copy_from_slice(&super::ELF_MAGIC);
        out[4] = if bits == 64 { 2 } else { 1 };
        out[5] = 1; // little-endian
        out[6] = 1; // EV_CURRENT
        let put16 =
            |o: &mut Vec<u8>, at: usize, v: u16| o[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let put32 =
            |o: &mut Vec<u8>, at: usize, v: u32| o[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let put64 =
            |o: &mut Vec<u8>, at: usize, v: u64| o[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put16(&mut out, 16, 2); // ET_EXEC
        put16(&mut out, 18, if bits == 64 { 62 } else { 3 });
        put32(&mut out, 20, 1);
        // Segments: (type, file offset, paddr, filesz, memsz, align)
        let mut segs = vec![(
            1u32,
            data_off,
            paddr,
            code.len() as u64,
            code.len() as u64 + bss,
            0x1000u64,
        )];
        let mut data = code.to_vec();
        for n in note_segments {
            segs.push((
                4,
                data_off + data.len(),
                0,
                n.len() as u64,
                n.len() as u64,
                4,
            ));
            data.extend(n);
        }
        if bits == 64 {
            put64(&mut out, 24, paddr); // e_entry
            put64(&mut out, 32, ehsize as u64); // e_phoff
            put16(&mut out, 52, ehsize as u16);
            put16(&mut out, 54, phentsize as u16);
            put16(&mut out, 56, phnum as u16);
        } else {
            put32(&mut out, 24, paddr as u32);
            put32(&mut out, 28, ehsize as u32);
            put16(&mut out, 40, ehsize as u16);
            put16(&mut out, 42, phentsize as u16);
            put16(&mut out, 44, phnum as u16);
        }
        for (i, (t, off, pa, fsz, msz, al)) in segs.into_iter().enumerate() {
            let at = ehsize + i * phentsize;
            put32(&mut out, at, t);
            if bits == 64 {
                put32(&mut out, at + 4, 5); // R+X
                put64(&mut out, at + 8, off as u64);
                put64(&mut out, at + 16, pa);
                put64(&mut out, at + 24, pa);
                put64(&mut out, at + 32, fsz);
                put64(&mut out, at + 40, msz);
                put64(&mut out, at + 48, al);
            } else {
                put32(&mut out, at + 4, off as u32);
                put32(&mut out, at + 8, pa as u32);
                put32(&mut out, at + 12, pa as u32);
                put32(&mut out, at + 16, fsz as u32);
                put32(&mut out, at + 20, msz as u32);
                put32(&mut out, at + 24, 5);
                put32(&mut out, at + 28, al as u32);
            }
        }
        out.extend(data);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use std::io::Cursor;

    fn parse_bytes(b: Vec<u8>) -> Result<ElfImage, ElfError> {
        parse(&mut Cursor::new(b))
    }

    #[test]
    fn elf64_with_pvh_note() {
        let img = parse_bytes(elf(64, 0x20000, &[0x90; 64], 0x1000, &[pvh_note(0x20010)])).unwrap();
        assert_eq!(img.bits, 64);
        assert_eq!(img.pvh_entry, Some(0x20010));
        assert_eq!(
            img.segments,
            vec![Segment {
                offset: 64 + 2 * 56,
                paddr: 0x20000,
                filesz: 64,
                memsz: 64 + 0x1000
            }]
        );
    }

    #[test]
    fn elf32_with_pvh_note() {
        let img = parse_bytes(elf(32, 0x20000, &[0x90; 16], 0, &[pvh_note(0x20000)])).unwrap();
        assert_eq!((img.bits, img.pvh_entry), (32, Some(0x20000)));
    }

    #[test]
    fn pvh_note_after_other_notes_and_segments_is_found() {
        let gnu = note_bytes(&Note {
            name: b"GNU\0",
            n_type: 3,
            desc: &[1, 2, 3, 4, 5, 6, 7, 8, 9],
        });
        let other_xen = note_bytes(&Note {
            name: b"Xen\0",
            n_type: 6, // XEN_ELFNOTE_LOADER, not the entry
            desc: b"generic\0",
        });
        let mut seg2 = other_xen.clone();
        seg2.extend(pvh_note(0x20004));
        let img = parse_bytes(elf(64, 0x20000, &[0; 8], 0, &[gnu, seg2])).unwrap();
        assert_eq!(img.pvh_entry, Some(0x20004));
    }

    #[test]
    fn eight_byte_descriptor_is_accepted() {
        let n = note_bytes(&Note {
            name: b"Xen\0",
            n_type: XEN_ELFNOTE_PHYS32_ENTRY,
            desc: &0x20008u64.to_le_bytes(),
        });
        let img = parse_bytes(elf(64, 0x20000, &[0; 16], 0, &[n])).unwrap();
        assert_eq!(img.pvh_entry, Some(0x20008));
    }

    #[test]
    fn notes_in_an_8_aligned_segment() {
        // GNU property note (desc 16 bytes), then the Xen note, 8-byte aligned.
        let mut seg = Vec::new();
        seg.extend(4u32.to_le_bytes());
        seg.extend(16u32.to_le_bytes());
        seg.extend(5u32.to_le_bytes()); // NT_GNU_PROPERTY_TYPE_0
        seg.extend(b"GNU\0");
        seg.extend([0xee; 16]);
        seg.extend(4u32.to_le_bytes());
        seg.extend(4u32.to_le_bytes());
        seg.extend(XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
        seg.extend(b"Xen\0");
        seg.extend(0x20000u32.to_le_bytes());
        assert_eq!(find_pvh_note(&seg, 8, 0).unwrap(), Some(0x20000));
    }

    #[test]
    fn no_note_means_no_pvh_entry() {
        let img = parse_bytes(elf(64, 0x100000, &[0; 16], 0, &[])).unwrap();
        assert_eq!(img.pvh_entry, None);
    }

    #[test]
    fn malformed_images_are_rejected_with_the_value() {
        let e = parse_bytes(b"MZ\x90\0garbage garbage".to_vec()).unwrap_err();
        assert!(matches!(e, ElfError::Magic(_)), "{e}");
        let e = parse_bytes(b"\x7fELF".to_vec()).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");

        let mut b = elf(64, 0x20000, &[0; 16], 0, &[pvh_note(0x20000)]);
        b[18] = 183; // EM_AARCH64
        assert!(parse_bytes(b).unwrap_err().to_string().contains("183"));

        let b = elf(64, 0x20000, &[0; 16], 0, &[pvh_note(0x30000)]);
        let e = parse_bytes(b).unwrap_err().to_string();
        assert!(e.contains("0x30000") && e.contains("outside"), "{e}");

        // A segment whose file bytes run past the end of the file.
        let mut b = elf(32, 0x20000, &[0; 16], 0, &[]);
        b.truncate(b.len() - 4);
        let e = parse_bytes(b).unwrap_err().to_string();
        assert!(e.contains("loadable segment"), "{e}");

        // A note whose size points past its segment.
        let mut n = pvh_note(0x20000);
        n[4] = 0xff;
        let e = parse_bytes(elf(64, 0x20000, &[0; 16], 0, &[n])).unwrap_err();
        assert!(matches!(e, ElfError::BadNote { .. }), "{e}");

        let n = note_bytes(&Note {
            name: b"Xen\0",
            n_type: XEN_ELFNOTE_PHYS32_ENTRY,
            desc: &[1, 2],
        });
        let e = parse_bytes(elf(64, 0x20000, &[0; 16], 0, &[n])).unwrap_err();
        assert!(e.to_string().contains("2 bytes"), "{e}");
    }
}
