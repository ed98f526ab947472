//! Time to collect the dirty set, dirty rings vs the dirty bitmap, for guest RAM of 1, 4
//! and 16 GiB with 0.1 %, 1 % and 10 % of its pages dirty. Prints a table and writes it
//! to docs/benchmarks/harvest.{md,json}. Run: `scripts/dev_cli.sh bench harvest`.
//!
//! The guest is the 32-bit page writer of the tests, so dirty pages lie in the first
//! 3.75 GiB (spread evenly there); the memslot, and so the bitmap KVM scans, is the full
//! RAM size. Ring mode harvests after every half ring of writes (as a migration
//! harvester running beside the vCPUs would), and the figure is the sum of those
//! harvests; bitmap mode is one `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG` per sync.

#[path = "../tests/common/writer.rs"]
mod writer;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hypervisor::{count_bits, SyncKind};
use writer::{guest, Mode, PAGE};

const RING: u32 = 65536;
const WRITABLE: u64 = 0xf000_0000; // below the 4 GiB a 32-bit guest reaches

impl Row {
    /// The row of the printed and the written table.
    fn table_row(&self) -> String {
        format!(
            "| {} GiB | {}% | {} | {:.3} ms ({}) | {:.3} ms | {:.2} |",
            self.ram_gib,
            self.percent,
            self.pages,
            self.ring.as_secs_f64() * 1e3,
            self.ring_harvests,
            self.bitmap.as_secs_f64() * 1e3,
            self.ring.as_secs_f64() / self.bitmap.as_secs_f64()
        )
    }
}

struct Row {
    ram_gib: u64,
    percent: f64,
    pages: u64,
    ring: Duration,
    ring_harvests: u64,
    bitmap: Duration,
}

fn measure(mode: Mode, ram: u64, pages: u64) -> (Duration, u64) {
    let ring = matches!(mode, Mode::Ring(_));
    let mut g = guest(mode, ram as usize);
    g.vm.start_dirty_log().unwrap();
    let span = WRITABLE.min(ram) - 0x10_0000;
    let stride = (span / PAGE / pages).max(1);
    let chunk = if ring { u64::from(RING / 2) } else { pages };
    let (mut spent, mut syncs, mut found, mut done) = (Duration::ZERO, 0, 0, 0);
    while done < pages {
        let n = chunk.min(pages - done);
        g.write_pages(0x10_0000 + done * stride * PAGE, n, stride);
        done += n;
        let t = Instant::now();
        let bm = g.vm.sync_dirty(SyncKind::Live).unwrap();
        spent += t.elapsed();
        syncs += 1;
        found += bm.iter().map(|b| count_bits(b)).sum::<u64>();
    }
    assert_eq!(found, pages, "every written page must be collected once");
    assert_eq!(
        g.vm.stats
            .ring_overflows
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    (spent, syncs)
}

const REPEATS: usize = 5;

/// Median of REPEATS runs, each on a fresh VM.
fn median(mut f: impl FnMut() -> (Duration, u64)) -> (Duration, u64) {
    let mut runs: Vec<_> = (0..REPEATS).map(|_| f()).collect();
    runs.sort();
    runs[REPEATS / 2]
}

fn main() {
    let mut rows = vec![];
    println!(
        "| RAM | dirty | pages | ring: collect (harvests) | bitmap: collect | ring / bitmap |"
    );
    println!("|---|---|---|---|---|---|");
    for ram_gib in [1u64, 4, 16] {
        let ram = ram_gib << 30;
        for percent in [0.1f64, 1.0, 10.0] {
            let pages = ((ram / PAGE) as f64 * percent / 100.0) as u64;
            let (ring, ring_harvests) = median(|| measure(Mode::Ring(RING), ram, pages));
            let (bitmap, _) = median(|| measure(Mode::Bitmap, ram, pages));
            let r = Row {
                ram_gib,
                percent,
                pages,
                ring,
                ring_harvests,
                bitmap,
            };
            println!("{}", r.table_row());
            rows.push(r);
        }
    }
    write_results(&rows);
}

fn write_results(rows: &[Row]) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let dir = root.join("docs/benchmarks");
    std::fs::create_dir_all(&dir).unwrap();
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output();
    let date = date
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(md, "# Dirty-set collection: rings vs bitmap\n");
    let _ = writeln!(md, "Measured {date} on {cpu}, {} cores, nested PVM KVM. Command: `scripts/dev_cli.sh bench harvest`.\n", std::thread::available_parallelism().map_or(0, |n| n.get()));
    let _ = writeln!(md, "Ring mode: {RING}-entry rings, harvested after every {} written pages; the time is the sum of the harvests (walk + `KVM_RESET_DIRTY_RINGS` + taking the accumulated bits). Bitmap mode: one `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG` (manual protect) per slot. Both include turning KVM's log into Ferry's per-slot bitmap. Each cell is the median of {REPEATS} runs on fresh VMs. Dirty pages are spread evenly over the first 3.75 GiB (the test writer is a 32-bit guest); the memslot is the whole RAM.\n", RING / 2);
    let _ = writeln!(md, "| RAM | dirty | pages | ring: collect (harvests) | bitmap: collect | ring / bitmap |\n|---|---|---|---|---|---|");
    let mut json = String::from("{\n  \"benchmark\": \"harvest\",\n");
    let _ = writeln!(json, "  \"date\": \"{date}\",\n  \"cpu\": \"{cpu}\",\n  \"ring_entries\": {RING},\n  \"rows\": [");
    for (i, r) in rows.iter().enumerate() {
        let _ = writeln!(md, "{}", r.table_row());
        let _ = writeln!(json, "    {{\"ram_gib\": {}, \"dirty_percent\": {}, \"pages\": {}, \"ring_ms\": {:.4}, \"ring_harvests\": {}, \"bitmap_ms\": {:.4}}}{}", r.ram_gib, r.percent, r.pages, r.ring.as_secs_f64() * 1e3, r.ring_harvests, r.bitmap.as_secs_f64() * 1e3, if i + 1 < rows.len() { "," } else { "" });
    }
    json.push_str("  ]\n}\n");
    std::fs::write(dir.join("harvest.md"), md).unwrap();
    std::fs::write(dir.join("harvest.json"), json).unwrap();
    println!("\nwritten to docs/benchmarks/harvest.md and harvest.json");
}
