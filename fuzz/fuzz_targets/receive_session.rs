//! The migration destination's whole receive state machine
//! (`vm_migration::receive_migration_from`) fed by a fake source: message order, chunk
//! places against the RAM layout, extra connections and their tokens, pass barriers,
//! duplicate or missing state, `Complete` with pages missing.
//!
//! Input: segments of `u32` little-endian length + bytes (a last segment whose length
//! prefix is cut, or longer than what is left, takes the rest). Segment 0 is what the
//! source sends on the main connection; segments 1.. are what it sends on the extra
//! connections, handed out in order by the accept callback (then `TimedOut`). Replies go
//! to a sink.
//!
//! Oracles, on a fake VM with at most 4 RAM ranges and 4 MiB: pages are written or zeroed
//! only after `check_config` accepted a layout, whole pages inside one range;
//! `restore_state` runs at most once, after `check_config`; `resume` at most once, after
//! `restore_state`; `Ok` means the VM was resumed; and when it is resumed, every page of
//! the layout was in some memory chunk of the input (what the engine counts as arrived can
//! only come from there).
//!
//! `RECEIVE_SESSION_VERBOSE=1` prints each input's outcome (to check seeds).
#![no_main]

use std::io::{self, Cursor, Read, Write};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vm_migration::protocol::{check_ram_layout, Message, MessageReader};
use vm_migration::{
    receive_migration_from, DestinationVm, HookResult, MigrationProgress, MigrationStream,
    RamRange, ReceiveOptions, PAGE_SIZE,
};

const PAGE: u64 = PAGE_SIZE as u64;
const MAX_RANGES: usize = 4;
const MAX_RAM: u64 = 4 << 20;
/// The main connection and at most 16 extra ones (more than the protocol allows).
const MAX_SEGMENTS: usize = 17;

/// One connection: reads the source's bytes, swallows the replies.
struct Stream<'a> {
    input: Cursor<&'a [u8]>,
}

impl Read for Stream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Stream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl MigrationStream for Stream<'_> {
    fn set_io_timeouts(&self, _timeout: Option<Duration>) -> io::Result<()> {
        Ok(())
    }

    fn shutdown_both(&self) {}
}

/// Splits the input into its connections' bytes.
fn segments(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !data.is_empty() && out.len() < MAX_SEGMENTS {
        if data.len() < 4 {
            out.push(data);
            break;
        }
        let len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let rest = &data[4..];
        let len = len.min(rest.len());
        out.push(&rest[..len]);
        data = &rest[len..];
    }
    out
}

/// Every page any memory chunk of the input names, per range of `layout`: an upper bound
/// of what the engine can have received (it decodes with the same reader).
fn announced_pages(segs: &[&[u8]], layout: &[RamRange]) -> Vec<Vec<bool>> {
    let mut seen: Vec<Vec<bool>> = layout
        .iter()
        .map(|r| vec![false; r.pages() as usize])
        .collect();
    for seg in segs {
        let mut reader = MessageReader::new(*seg);
        while let Ok(msg) = reader.read_message() {
            let (gpa, count) = match msg {
                Message::MemoryChunk(c) => (c.gpa, c.page_count),
                Message::SparseChunk(c) => (c.gpa, c.page_count),
                _ => continue,
            };
            for p in 0..u64::from(count) {
                let Some(g) = gpa.checked_add(p * PAGE) else {
                    break;
                };
                for (r, pages) in layout.iter().zip(seen.iter_mut()) {
                    if g >= r.gpa && g < r.end() {
                        pages[((g - r.gpa) / PAGE) as usize] = true;
                    }
                }
            }
        }
    }
    seen
}

#[derive(Default)]
struct FakeVm<'a> {
    segs: &'a [&'a [u8]],
    layout: Option<Vec<RamRange>>,
    /// One buffer per range of `layout`.
    ram: Mutex<Vec<Vec<u8>>>,
    restored: bool,
    resumed: bool,
}

impl FakeVm<'_> {
    /// The range index and byte offset of `len` bytes at `gpa`: the oracle on places.
    fn place(&self, op: &str, gpa: u64, len: u64) -> (usize, usize) {
        let layout = self
            .layout
            .as_ref()
            .unwrap_or_else(|| panic!("{op} before check_config accepted a layout"));
        assert!(
            gpa % PAGE == 0 && len % PAGE == 0 && len > 0,
            "{op}: {len:#x} bytes at {gpa:#x} are not whole pages"
        );
        let i = layout
            .iter()
            .position(|r| gpa >= r.gpa && gpa.checked_add(len).is_some_and(|e| e <= r.end()))
            .unwrap_or_else(|| panic!("{op}: {len:#x} bytes at {gpa:#x} not inside one range"));
        assert!(!self.restored, "{op} after restore_state");
        (i, (gpa - layout[i].gpa) as usize)
    }
}

impl DestinationVm for FakeVm<'_> {
    fn check_config(&mut self, _vm_config: &[u8], ram: &[RamRange]) -> HookResult<Vec<RamRange>> {
        assert!(self.layout.is_none(), "check_config twice");
        check_ram_layout(ram)?;
        if ram.len() > MAX_RANGES {
            return Err(format!(
                "{} RAM ranges, at most {MAX_RANGES} here",
                ram.len()
            ));
        }
        let total = ram.iter().map(|r| r.size).sum::<u64>();
        if total > MAX_RAM {
            return Err(format!(
                "{total:#x} bytes of RAM, at most {MAX_RAM:#x} here"
            ));
        }
        *self.ram.lock().unwrap() = ram.iter().map(|r| vec![0; r.size as usize]).collect();
        self.layout = Some(ram.to_vec());
        Ok(ram.to_vec())
    }

    fn write_pages(&self, gpa: u64, data: &[u8]) -> HookResult<()> {
        let (i, off) = self.place("write_pages", gpa, data.len() as u64);
        self.ram.lock().unwrap()[i][off..off + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn zero_pages(&self, gpa: u64, pages: u64) -> HookResult<()> {
        let len = pages
            .checked_mul(PAGE)
            .expect("zero_pages: page count overflows");
        let (i, off) = self.place("zero_pages", gpa, len);
        self.ram.lock().unwrap()[i][off..off + len as usize].fill(0);
        Ok(())
    }

    fn restore_state(&mut self, _vcpus: &[u8], _devices: &[u8]) -> HookResult<()> {
        assert!(self.layout.is_some(), "restore_state before check_config");
        assert!(!self.restored, "restore_state twice");
        self.restored = true;
        Ok(())
    }

    fn resume(&mut self) -> HookResult<()> {
        assert!(self.restored, "resume before restore_state");
        assert!(!self.resumed, "resume twice");
        self.resumed = true;
        let layout = self.layout.as_ref().expect("restored, so configured");
        let seen = announced_pages(self.segs, layout);
        for (r, pages) in layout.iter().zip(&seen) {
            if let Some(p) = pages.iter().position(|&s| !s) {
                panic!(
                    "resumed, but page {:#x} was in no memory chunk of the input",
                    r.gpa + p as u64 * PAGE
                );
            }
        }
        Ok(())
    }
}

/// Threads of this process now.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fn verbose() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| std::env::var_os("RECEIVE_SESSION_VERBOSE").is_some())
}

fuzz_target!(|data: &[u8]| {
    let segs = segments(data);
    let Some((main, extra)) = segs.split_first() else {
        return;
    };
    let mut extra = extra.iter();
    let mut accept = |_wait: Duration| match extra.next() {
        Some(seg) => Ok(Stream {
            input: Cursor::new(*seg),
        }),
        None => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no more connections in the input",
        )),
    };
    let mut vm = FakeVm {
        segs: &segs,
        ..FakeVm::default()
    };
    let opts = ReceiveOptions {
        idle_timeout: Duration::from_millis(50),
        ..ReceiveOptions::default()
    };
    let threads_before = threads();
    let progress = MigrationProgress::new();
    let stream = Stream {
        input: Cursor::new(*main),
    };
    let result = receive_migration_from(&mut vm, stream, Some(&mut accept), &opts, &progress);
    // The engine's extra-connection threads are joined when their closures end, but
    // free their thread-local bookkeeping only as they exit: wait for that, or LeakSanitizer
    // may see it still allocated.
    let deadline = Instant::now() + Duration::from_secs(1);
    while threads() > threads_before && Instant::now() < deadline {
        std::thread::yield_now();
    }
    if verbose() {
        match &result {
            Ok(_) => eprintln!("receive_session: Ok (resumed: {})", vm.resumed),
            Err(e) => eprintln!("receive_session: Err: {e}"),
        }
    }
    if result.is_ok() {
        assert!(
            vm.resumed,
            "receive_migration_from returned Ok without resuming"
        );
    }
});
