//! A kernel file as `--kernel` reads it (user-supplied): Ferry's ELF reader must refuse
//! what it cannot load with an error, never panic or read outside the file, and whatever
//! it accepts must be sane — segments whose end does not overflow and whose file bytes
//! lie inside the file — before the layout check places them in a 512 MiB guest.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmm::boot::{elf, pvh};

fuzz_target!(|data: &[u8]| {
    let Ok(img) = elf::parse(&mut Cursor::new(data)) else {
        return;
    };
    assert!(img.bits == 32 || img.bits == 64);
    for s in &img.segments {
        assert!(s.memsz > 0 && s.filesz <= s.memsz);
        assert!(s.offset.checked_add(s.filesz).is_some_and(|e| e <= data.len() as u64));
        assert!(s.paddr.checked_add(s.memsz).is_some());
    }
    let _ = pvh::check_segments(Path::new("fuzz.elf"), &img, 512 << 20);
});
