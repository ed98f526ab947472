//! The precopy engine end to end over real sockets, with a fake source VM whose "guest"
//! thread keeps incrementing counters in its pages (any lost dirty page shows up as a
//! byte difference) and a fake destination; plus a destination fed hostile streams.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vm_migration::protocol::{
    encode, encode_memory_chunk, encode_page_chunk, Complete, Config, Header, Hello, Message,
    MessageReader, MessageType, ProtocolError, HEADER_LEN,
};
use vm_migration::transport::FdUnixStream;
use vm_migration::{
    receive_migration, receive_migration_from, send_migration, send_migration_parallel,
    DestinationVm, HookResult, MigrationInfo, MigrationProgress, MigrationStatus, MigrationStream,
    RamRange, ReceiveError, ReceiveOptions, SendError, SendOptions, SourceVm, SwitchOver,
    TimeoutStrategy, PAGE_SIZE, TEST_SPARSE_NEVER_CLEARED_ENV,
};

const PAGE: u64 = PAGE_SIZE as u64;

/// Two RAM ranges with a hole between them, 4 MiB in all.
fn layout() -> Vec<RamRange> {
    vec![
        RamRange {
            gpa: 0,
            size: 512 << 10,
        },
        RamRange {
            gpa: 1 << 20,
            size: 3584 << 10,
        },
    ]
}

fn ram_size(layout: &[RamRange]) -> usize {
    layout.iter().map(|r| r.size as usize).sum()
}

/// Offset in a flat buffer of `len` bytes at `gpa`, which must lie in one range.
fn offset(layout: &[RamRange], gpa: u64, len: usize) -> Result<usize, String> {
    let mut base = 0u64;
    for r in layout {
        if gpa >= r.gpa && gpa + len as u64 <= r.end() {
            return Ok((base + gpa - r.gpa) as usize);
        }
        base += r.size;
    }
    Err(format!("{len} bytes at {gpa:#x} are not RAM"))
}

fn gpa_of_page(layout: &[RamRange], mut page: u64) -> u64 {
    for r in layout {
        if page < r.pages() {
            return r.gpa + page * PAGE;
        }
        page -= r.pages();
    }
    unreachable!()
}

struct GuestRam {
    bytes: Vec<u8>,
    dirty: Vec<bool>,
    logging: bool,
    paused: bool,
}

struct FakeSource {
    layout: Vec<RamRange>,
    ram: Mutex<GuestRam>,
    /// RAM at the moment of the pause: what the destination must end up with.
    at_pause: Mutex<Option<Vec<u8>>>,
    resumes: AtomicU32,
    /// Every throttle the engine asked for, in order.
    throttles: Mutex<Vec<u8>>,
    /// Every collection reports all of RAM dirty: a migration that cannot converge.
    always_dirty: bool,
    state: (Vec<u8>, Vec<u8>),
    /// Runs inside `pause`, once the vCPUs stopped.
    on_pause: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Reading takes this long per page (a slow source: passes outlast the engine's
    /// interval between dirty-log reads).
    read_delay: Mutex<Duration>,
    /// `collect_dirty` calls while the guest ran.
    running_collects: AtomicU32,
    /// `state_ready_at_pause`.
    state_at_pause: AtomicBool,
    /// What `peer_reads_binary_state` was told.
    peer_binary: Mutex<Option<bool>>,
}

impl FakeSource {
    fn new(always_dirty: bool) -> Arc<Self> {
        let layout = layout();
        let size = ram_size(&layout);
        let mut bytes = vec![0u8; size];
        // Every third page zero, the others with a pattern.
        for (i, page) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
            if i % 3 != 0 {
                for (j, b) in page.iter_mut().enumerate() {
                    *b = (i * 7 + j) as u8;
                }
            }
        }
        let pages = size / PAGE_SIZE;
        Arc::new(FakeSource {
            layout,
            ram: Mutex::new(GuestRam {
                bytes,
                dirty: vec![false; pages],
                logging: false,
                paused: false,
            }),
            at_pause: Mutex::new(None),
            resumes: AtomicU32::new(0),
            throttles: Mutex::new(Vec::new()),
            always_dirty,
            state: (b"vcpu registers".to_vec(), b"serial, pm".to_vec()),
            on_pause: Mutex::new(None),
            read_delay: Mutex::new(Duration::ZERO),
            running_collects: AtomicU32::new(0),
            state_at_pause: AtomicBool::new(false),
            peer_binary: Mutex::new(None),
        })
    }

    fn is_paused(&self) -> bool {
        self.ram.lock().unwrap().paused
    }

    /// Starts a "guest" that increments a counter in pseudo-random pages (writes zero
    /// pages too, and sometimes zeroes a page) every `period`, until `stop`.
    fn run_guest(
        self: &Arc<Self>,
        period: Duration,
        stop: Arc<AtomicBool>,
    ) -> thread::JoinHandle<u64> {
        let me = self.clone();
        thread::spawn(move || {
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let mut writes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                {
                    let mut ram = me.ram.lock().unwrap();
                    if !ram.paused {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let pages = ram.dirty.len();
                        let page = (x % pages as u64) as usize;
                        let off = page * PAGE_SIZE + (x as usize >> 40) % (PAGE_SIZE - 8) / 8 * 8;
                        if x.is_multiple_of(97) {
                            ram.bytes[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].fill(0);
                        } else {
                            let mut v = [0u8; 8];
                            v.copy_from_slice(&ram.bytes[off..off + 8]);
                            let v = u64::from_le_bytes(v).wrapping_add(1);
                            ram.bytes[off..off + 8].copy_from_slice(&v.to_le_bytes());
                        }
                        if ram.logging {
                            ram.dirty[page] = true;
                        }
                        writes += 1;
                    }
                }
                if period.is_zero() {
                    thread::yield_now();
                } else {
                    thread::sleep(period);
                }
            }
            writes
        })
    }
}

impl SourceVm for FakeSource {
    fn config(&self) -> HookResult<Vec<u8>> {
        Ok(br#"{"cpus":1,"memory":"4M"}"#.to_vec())
    }

    fn ram_layout(&self) -> Vec<RamRange> {
        self.layout.clone()
    }

    fn read_pages(&self, gpa: u64, buf: &mut [u8]) -> HookResult<()> {
        let delay = *self.read_delay.lock().unwrap();
        if !delay.is_zero() {
            thread::sleep(delay * (buf.len() / PAGE_SIZE) as u32);
        }
        let off = offset(&self.layout, gpa, buf.len())?;
        buf.copy_from_slice(&self.ram.lock().unwrap().bytes[off..off + buf.len()]);
        Ok(())
    }

    fn start_dirty_log(&self) -> HookResult<()> {
        self.ram.lock().unwrap().logging = true;
        Ok(())
    }

    fn collect_dirty(&self, final_pass: bool) -> HookResult<Vec<(u64, u64)>> {
        let mut ram = self.ram.lock().unwrap();
        assert_eq!(
            final_pass, ram.paused,
            "the final collection comes paused, and only it"
        );
        if !final_pass {
            self.running_collects.fetch_add(1, Ordering::SeqCst);
        }
        let mut out = Vec::new();
        for (i, d) in ram.dirty.iter_mut().enumerate() {
            if std::mem::take(d) {
                out.push((gpa_of_page(&self.layout, i as u64), PAGE));
            }
        }
        if self.always_dirty {
            out.extend(self.layout.iter().map(|r| (r.gpa, r.size)));
        }
        Ok(out)
    }

    fn stop_dirty_log(&self) {
        self.ram.lock().unwrap().logging = false;
    }

    fn pause(&self) -> HookResult<()> {
        let mut ram = self.ram.lock().unwrap();
        // A vCPU writes one last time before it leaves KVM_RUN: only the final
        // collection can see that page.
        let last = ram.bytes.len() - 8;
        ram.bytes[last] = ram.bytes[last].wrapping_add(1);
        if ram.logging {
            let page = last / PAGE_SIZE;
            ram.dirty[page] = true;
        }
        ram.paused = true;
        *self.at_pause.lock().unwrap() = Some(ram.bytes.clone());
        if let Some(f) = self.on_pause.lock().unwrap().take() {
            f();
        }
        Ok(())
    }

    fn resume(&self) -> HookResult<()> {
        self.ram.lock().unwrap().paused = false;
        self.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn save_state(&self) -> HookResult<(Vec<u8>, Vec<u8>)> {
        assert!(self.is_paused(), "the state is saved paused");
        Ok(self.state.clone())
    }

    fn state_ready_at_pause(&self) -> bool {
        self.state_at_pause.load(Ordering::SeqCst)
    }

    fn peer_reads_binary_state(&self, yes: bool) {
        *self.peer_binary.lock().unwrap() = Some(yes);
    }

    fn set_throttle(&self, percent: u8) -> HookResult<()> {
        self.throttles.lock().unwrap().push(percent);
        Ok(())
    }
}

/// A machine state as the engine carries it: `(vcpus, devices)`.
type StateBlobs = (Vec<u8>, Vec<u8>);

#[derive(Default)]
struct FakeDestination {
    layout: Vec<RamRange>,
    ram: Mutex<Vec<u8>>,
    refuse: Option<String>,
    config_checked: bool,
    state: Option<(Vec<u8>, Vec<u8>)>,
    resumed: bool,
    page_writes: Arc<AtomicU64>,
    /// Each `write_pages` takes this long while the flag is set (a slow destination).
    write_delay: Option<(Duration, Arc<AtomicBool>)>,
    /// Runs inside `check_config`, before the answer.
    during_config_check: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Each `expect_pages` call's runs.
    expected: Mutex<Vec<Vec<(u64, u32)>>>,
    /// What `prepare_state` got, and the pages written by then.
    prepared: Mutex<Option<(StateBlobs, u64)>>,
    /// `warm_up` calls (each one before the state, or the fake panics).
    warm_ups: AtomicU64,
}

impl DestinationVm for FakeDestination {
    fn check_config(&mut self, vm_config: &[u8], ram: &[RamRange]) -> HookResult<Vec<RamRange>> {
        self.config_checked = true;
        assert!(vm_config.starts_with(b"{"));
        if let Some(f) = self.during_config_check.lock().unwrap().take() {
            f();
        }
        if let Some(reason) = &self.refuse {
            return Err(reason.clone());
        }
        self.layout = ram.to_vec();
        self.ram = Mutex::new(vec![0; ram_size(ram)]);
        Ok(ram.to_vec())
    }

    fn write_pages(&self, gpa: u64, data: &[u8]) -> HookResult<()> {
        self.fill_pages(gpa, data.len(), &mut |buf| buf.copy_from_slice(data))
    }

    /// In place, as the vmm's does: a sparse page goes over what the page holds.
    fn fill_pages(&self, gpa: u64, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> HookResult<()> {
        assert!(!self.resumed);
        if let Some((delay, on)) = &self.write_delay {
            if on.load(Ordering::SeqCst) {
                thread::sleep(*delay);
            }
        }
        let off = offset(&self.layout, gpa, len)?;
        fill(&mut self.ram.lock().unwrap()[off..off + len]);
        self.page_writes
            .fetch_add((len / PAGE_SIZE) as u64, Ordering::Relaxed);
        Ok(())
    }

    fn expect_pages(&self, runs: Vec<(u64, u32)>) {
        assert!(!self.resumed);
        self.expected.lock().unwrap().push(runs);
    }

    fn zero_pages(&self, gpa: u64, pages: u64) -> HookResult<()> {
        let len = (pages * PAGE) as usize;
        let off = offset(&self.layout, gpa, len)?;
        self.ram.lock().unwrap()[off..off + len].fill(0);
        Ok(())
    }

    fn warm_up(&self) {
        assert!(
            self.prepared.lock().unwrap().is_none(),
            "warm_up after the state: a real VM would undo the loaded state"
        );
        self.warm_ups.fetch_add(1, Ordering::SeqCst);
    }

    fn prepare_state(&self, vcpus: &[u8], devices: &[u8]) -> HookResult<()> {
        let mut p = self.prepared.lock().unwrap();
        assert!(p.is_none(), "prepared twice");
        let written = self.page_writes.load(Ordering::SeqCst);
        *p = Some(((vcpus.to_vec(), devices.to_vec()), written));
        Ok(())
    }

    fn restore_state(&mut self, vcpus: &[u8], devices: &[u8]) -> HookResult<()> {
        self.state = Some((vcpus.to_vec(), devices.to_vec()));
        Ok(())
    }

    fn resume(&mut self) -> HookResult<()> {
        assert!(
            self.state.is_some(),
            "resumed before the state was restored"
        );
        self.resumed = true;
        Ok(())
    }
}

fn fast_opts(downtime: Duration, timeout: Duration, strategy: TimeoutStrategy) -> SendOptions {
    SendOptions {
        downtime,
        timeout,
        timeout_strategy: strategy,
        io_timeout: Duration::from_millis(800),
        confirm_timeout: Duration::from_millis(800),
        chunk_pages: 64,
        local_memory: false,
        auto_converge: true,
        switch_over: SwitchOver::MinDowntime,
        postcopy_after_passes: None,
    }
}

fn receive_opts() -> ReceiveOptions {
    ReceiveOptions {
        idle_timeout: Duration::from_secs(2),
        ..ReceiveOptions::default()
    }
}

type DestinationOutcome = (Result<MigrationInfo, ReceiveError>, FakeDestination);

fn spawn_destination<S: MigrationStream + 'static>(
    stream: S,
    mut dest: FakeDestination,
) -> thread::JoinHandle<DestinationOutcome> {
    thread::spawn(move || {
        let progress = MigrationProgress::new();
        let r = receive_migration(&mut dest, stream, &receive_opts(), &progress);
        (r, dest)
    })
}

fn assert_migrated(src: &FakeSource, dest: &FakeDestination) {
    assert!(dest.resumed);
    let at_pause = src.at_pause.lock().unwrap();
    let at_pause = at_pause.as_ref().expect("the source was paused");
    let diff = at_pause
        .chunks_exact(PAGE_SIZE)
        .zip(dest.ram.lock().unwrap().chunks_exact(PAGE_SIZE))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(diff, 0, "{diff} pages differ");
    assert_eq!(dest.state.as_ref(), Some(&src.state));
    // Nothing changed after the pause.
    assert_eq!(&src.ram.lock().unwrap().bytes, at_pause);
}

/// A source whose state is final at the pause sends it before the last pages, so the
/// destination loads it (`prepare_state`) while they come; `restore_state` still gets the
/// same blobs after them. Otherwise the state comes after every page.
#[test]
fn the_state_goes_before_the_last_pages_when_final_at_the_pause() {
    for early in [true, false] {
        let src = FakeSource::new(false);
        src.state_at_pause.store(early, Ordering::SeqCst);
        let (a, b) = UnixStream::pair().unwrap();
        let dest = spawn_destination(b, FakeDestination::default());
        let opts = fast_opts(
            Duration::from_millis(50),
            Duration::from_secs(30),
            TimeoutStrategy::Cancel,
        );
        send_migration(&*src, a, &opts, &MigrationProgress::new()).expect("migration");
        let (dr, d) = dest.join().unwrap();
        let info = dr.expect("destination");
        assert_migrated(&src, &d);
        let (blobs, written) = d.prepared.lock().unwrap().clone().expect("prepared");
        assert_eq!(blobs, src.state);
        let total = d.page_writes.load(Ordering::SeqCst);
        // The pause writes a page: the final pass carries at least that one.
        let last_pass = info.iterations.last().map_or(0, |i| i.pages);
        assert!(last_pass >= 1, "{info:?}");
        // Warm-ups after passes made while the guest ran (the fake panics on one after
        // the state), only where the source sends its state at the pause: otherwise the
        // final pass's end comes before the state, in the downtime.
        let passes = info.iterations.len() as u64;
        let warm_ups = d.warm_ups.load(Ordering::SeqCst);
        if early {
            assert!(
                (1..passes).contains(&warm_ups),
                "{warm_ups} warm-ups in {passes} passes"
            );
        } else {
            assert_eq!(warm_ups, 0, "{passes} passes, the state after them");
        }
        if early {
            assert!(
                written <= total - last_pass,
                "the state came after {written} of {total} page writes, the last pass's \
                 {last_pass} among them"
            );
        } else {
            assert_eq!(written, total, "the state came before the last pages");
        }
    }
}

/// The source's VM learns whether the destination reads the binary state encoding, from
/// the destination's `BINARY_STATE` feature bit (an older destination has none).
#[test]
fn the_source_learns_whether_the_destination_reads_binary_state() {
    use vm_migration::protocol::features;
    for offered in [true, false] {
        let src = FakeSource::new(false);
        let (a, b) = UnixStream::pair().unwrap();
        let mut opts = receive_opts();
        if !offered {
            opts.features &= !features::BINARY_STATE;
        }
        let dest = thread::spawn(move || {
            let mut d = FakeDestination::default();
            receive_migration(&mut d, b, &opts, &MigrationProgress::new()).map(|_| ())
        });
        let send = fast_opts(
            Duration::from_millis(50),
            Duration::from_secs(30),
            TimeoutStrategy::Cancel,
        );
        send_migration(&*src, a, &send, &MigrationProgress::new()).expect("migration");
        dest.join().unwrap().expect("destination");
        assert_eq!(*src.peer_binary.lock().unwrap(), Some(offered));
    }
}

#[test]
fn converging_migration_copies_ram_exactly() {
    let src = FakeSource::new(false);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = src.run_guest(Duration::from_micros(200), stop.clone());
    thread::sleep(Duration::from_millis(20));
    let (a, b) = UnixStream::pair().unwrap();
    let dest = spawn_destination(b, FakeDestination::default());
    // The destination waits a while for its source: that is not part of the migration.
    thread::sleep(Duration::from_millis(1500));
    let progress = MigrationProgress::new();
    let opts = fast_opts(
        Duration::from_millis(50),
        Duration::from_secs(30),
        TimeoutStrategy::Cancel,
    );
    let info = send_migration(&*src, a, &opts, &progress).expect("migration");
    stop.store(true, Ordering::Relaxed);
    let writes = guest.join().unwrap();
    let (dr, d) = dest.join().unwrap();
    let dinfo = dr.expect("destination");
    assert!(writes > 0);
    assert_migrated(&src, &d);
    assert!(src.is_paused(), "the source stays paused after success");
    assert_eq!(src.resumes.load(Ordering::SeqCst), 0);

    assert_eq!(info.status, MigrationStatus::Completed);
    assert_eq!(info.ram.total, 4 << 20);
    assert!(info.ram.duplicate > 0 && info.ram.normal > 0, "{info:?}");
    assert!(info.ram.normal + info.ram.duplicate >= 1024);
    assert!(info.downtime.is_some() && info.setup_time.is_some());
    // The exact figure, and the whole milliseconds rounded up from it.
    let us = info.downtime_us.expect("downtime-us");
    assert_eq!(info.downtime, Some(us.div_ceil(1000)), "{us} us");
    assert!(!info.iterations.is_empty());
    assert_eq!(info.ram.remaining, 0);
    assert_eq!(progress.snapshot().status, MigrationStatus::Completed);
    // The destination reports the same migration, with its downtime.
    assert_eq!(dinfo.status, MigrationStatus::Completed);
    assert_eq!(dinfo.ram.total, info.ram.total);
    assert_eq!(dinfo.ram.normal, info.ram.normal);
    assert_eq!(dinfo.downtime, info.downtime);
    assert_eq!(dinfo.downtime_us, info.downtime_us);
    let (total, dtotal) = (info.total_time.unwrap(), dinfo.total_time.unwrap());
    assert!(
        dtotal + 100 >= total && dtotal < total + 1000,
        "destination total-time {dtotal} ms, source {total} ms"
    );
    let json = serde_json::to_value(&dinfo).unwrap();
    assert!(json["ram"]["normal-bytes"].as_u64().unwrap() > 0);
}

#[test]
fn busy_guest_still_loses_nothing() {
    // The guest writes as fast as it can; a generous downtime lets it converge anyway.
    let src = FakeSource::new(false);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = src.run_guest(Duration::ZERO, stop.clone());
    let (a, b) = UnixStream::pair().unwrap();
    let dest = spawn_destination(b, FakeDestination::default());
    let opts = fast_opts(
        Duration::from_millis(500),
        Duration::from_secs(30),
        TimeoutStrategy::Cancel,
    );
    send_migration(&*src, a, &opts, &MigrationProgress::new()).expect("migration");
    stop.store(true, Ordering::Relaxed);
    guest.join().unwrap();
    let (dr, d) = dest.join().unwrap();
    dr.expect("destination");
    assert_migrated(&src, &d);
}

#[test]
fn over_tcp_loopback() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut d = FakeDestination::default();
        let r = receive_migration(&mut d, s, &receive_opts(), &MigrationProgress::new());
        (r, d)
    });
    let src = FakeSource::new(false);
    let s = std::net::TcpStream::connect(addr).unwrap();
    let opts = fast_opts(
        Duration::from_millis(100),
        Duration::from_secs(30),
        TimeoutStrategy::Cancel,
    );
    send_migration(&*src, s, &opts, &MigrationProgress::new()).expect("migration");
    let (dr, d) = dest.join().unwrap();
    dr.expect("destination");
    assert_migrated(&src, &d);
    // Nothing written during pass 0: nothing was left for later.
    assert!(d.expected.lock().unwrap().is_empty());
}

/// Migrates `src` (whose every collection says all RAM is dirty) with a 1 ns downtime
/// until `timeout` cancels it; the error, the source's progress and the destination.
fn until_cancelled(
    src: &FakeSource,
    timeout: Duration,
) -> (
    SendError,
    MigrationProgress,
    thread::JoinHandle<DestinationOutcome>,
) {
    let (a, b) = UnixStream::pair().unwrap();
    let dest = spawn_destination(b, FakeDestination::default());
    let progress = MigrationProgress::new();
    let opts = fast_opts(Duration::from_nanos(1), timeout, TimeoutStrategy::Cancel);
    let e = send_migration(src, a, &opts, &progress).unwrap_err();
    (e, progress, dest)
}

#[test]
fn non_convergence_with_cancel_keeps_the_source_running() {
    let src = FakeSource::new(true);
    let start = Instant::now();
    let (e, progress, dest) = until_cancelled(&src, Duration::from_millis(300));
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(matches!(e, SendError::TimedOut { .. }), "{e}");
    assert!(e.to_string().contains("timed out"), "{e}");
    assert!(!src.is_paused() && src.at_pause.lock().unwrap().is_none());
    assert!(!src.ram.lock().unwrap().logging, "dirty log stopped");
    let info = progress.snapshot();
    assert_eq!(info.status, MigrationStatus::Failed);
    assert!(info.iterations.len() > 1);
    assert!(info.error_desc.unwrap().contains("timed out"));
    // Auto-converge held the vCPUs back more and more (at least QEMU's ramp: 20 %, then
    // 10 % more a step, up to 99 %), and let go when it gave up.
    let throttles = src.throttles.lock().unwrap().clone();
    assert!(throttles.len() >= 2, "{throttles:?}");
    assert!((20..=99).contains(&throttles[0]), "{throttles:?}");
    assert!(
        throttles
            .windows(2)
            .take(throttles.len() - 2)
            .all(|w| w[1] >= (w[0] + 10).min(99) && w[1] <= 99),
        "{throttles:?}"
    );
    assert_eq!(throttles.last(), Some(&0), "{throttles:?}");
    assert!(info.cpu_throttle_percentage.is_some_and(|p| p >= 20));
    let (dr, d) = dest.join().unwrap();
    let de = dr.unwrap_err();
    assert!(
        matches!(de, ReceiveError::PeerAborted(ref r) if r.contains("timed out")),
        "{de}"
    );
    assert!(!d.resumed);
}

/// A guest that dirties pages faster than pass 0 sends them (every read of the dirty log
/// says all of RAM; pass 0 reads it after 50 ms, about half-way, and leaves the rest for
/// later) is throttled after that first pass, and that first step stays at 50 % even
/// though its rates call for more: one pass is little evidence.
#[test]
fn a_guest_outdirtying_the_first_pass_is_throttled_at_most_half_after_it() {
    let src = FakeSource::new(true);
    *src.read_delay.lock().unwrap() = Duration::from_micros(100);
    let (e, progress, dest) = until_cancelled(&src, Duration::from_millis(400));
    assert!(matches!(e, SendError::TimedOut { .. }), "{e}");
    let info = progress.snapshot();
    let first = &info.iterations[0];
    assert!(first.pages < 1024, "pass 0 sent all {} pages", first.pages);
    let throttles = src.throttles.lock().unwrap().clone();
    // 50 % first (the rates would have given more: the next step, aimed the same way,
    // goes past it), then let go at the end.
    assert_eq!(
        throttles.first(),
        Some(&50),
        "{throttles:?} {:?}",
        info.iterations
    );
    if throttles.len() > 2 {
        assert!(throttles[1] > 60, "{throttles:?}");
    }
    assert_eq!(throttles.last(), Some(&0), "{throttles:?}");
    let _ = dest.join().unwrap();
}

#[test]
fn non_convergence_with_ignore_switches_over() {
    let src = FakeSource::new(true);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = src.run_guest(Duration::from_micros(50), stop.clone());
    let (a, b) = UnixStream::pair().unwrap();
    let dest = spawn_destination(b, FakeDestination::default());
    let opts = fast_opts(
        Duration::from_nanos(1),
        Duration::from_millis(300),
        TimeoutStrategy::Ignore,
    );
    let info = send_migration(&*src, a, &opts, &MigrationProgress::new()).expect("migration");
    stop.store(true, Ordering::Relaxed);
    guest.join().unwrap();
    assert!(info.iterations.len() > 1);
    let (dr, d) = dest.join().unwrap();
    dr.expect("destination");
    assert_migrated(&src, &d);
}

/// `switch_over: Fits` pauses after the first pass whose leftovers fit the downtime (here
/// pass 0: any dirty set fits 10 s), and what the guest wrote meanwhile still arrives.
#[test]
fn the_fits_rule_pauses_after_the_first_pass_that_fits() {
    let src = FakeSource::new(true);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = src.run_guest(Duration::from_micros(50), stop.clone());
    let (a, b) = UnixStream::pair().unwrap();
    let dest = spawn_destination(b, FakeDestination::default());
    let opts = SendOptions {
        switch_over: SwitchOver::Fits,
        ..fast_opts(
            Duration::from_secs(10),
            Duration::from_secs(30),
            TimeoutStrategy::Cancel,
        )
    };
    let info = send_migration(&*src, a, &opts, &MigrationProgress::new()).expect("migration");
    stop.store(true, Ordering::Relaxed);
    guest.join().unwrap();
    let passes: Vec<u64> = info.iterations.iter().map(|i| i.pages).collect();
    assert_eq!(
        passes.len(),
        2,
        "pass 0 and the final pass; sent {passes:?}"
    );
    let (dr, d) = dest.join().unwrap();
    dr.expect("destination");
    assert_migrated(&src, &d);
}

#[test]
fn cancel_mid_way() {
    let src = FakeSource::new(true);
    let (a, b) = UnixStream::pair().unwrap();
    let dest = spawn_destination(b, FakeDestination::default());
    let progress = MigrationProgress::new();
    let api = progress.clone();
    let canceller = thread::spawn(move || {
        thread::sleep(Duration::from_millis(150));
        api.cancel();
    });
    let opts = fast_opts(
        Duration::from_nanos(1),
        Duration::from_secs(60),
        TimeoutStrategy::Cancel,
    );
    let e = send_migration(&*src, a, &opts, &progress).unwrap_err();
    canceller.join().unwrap();
    assert!(matches!(e, SendError::Cancelled), "{e}");
    assert_eq!(progress.status(), MigrationStatus::Cancelled);
    assert!(!src.is_paused());
    let (dr, d) = dest.join().unwrap();
    assert!(matches!(dr, Err(ReceiveError::PeerAborted(_))), "{dr:?}");
    assert!(!d.resumed);
}

#[test]
fn cancel_while_the_destination_checks_the_configuration() {
    // By the time the destination answers `Config`, the cancelled source has sent its
    // `Abort` and closed the stream: the answer fails to go out, yet the destination must
    // report why the source left.
    let src = FakeSource::new(false);
    let (a, b) = UnixStream::pair().unwrap();
    let progress = MigrationProgress::new();
    let api = progress.clone();
    let (source_done, wait_for_source) = std::sync::mpsc::channel::<()>();
    let dest = spawn_destination(
        b,
        FakeDestination {
            during_config_check: Mutex::new(Some(Box::new(move || {
                api.cancel();
                let _ = wait_for_source.recv();
            }))),
            ..Default::default()
        },
    );
    // Only the cancel may end the wait for `ConfigAccepted`, however slow the machine.
    let opts = SendOptions {
        io_timeout: Duration::from_secs(10),
        confirm_timeout: Duration::from_secs(10),
        ..fast_opts(
            Duration::from_millis(50),
            Duration::from_secs(30),
            TimeoutStrategy::Cancel,
        )
    };
    let e = send_migration(&*src, a, &opts, &progress).unwrap_err();
    source_done.send(()).unwrap();
    assert!(matches!(e, SendError::Cancelled), "{e}");
    assert_eq!(progress.status(), MigrationStatus::Cancelled);
    assert!(!src.ram.lock().unwrap().logging);
    let (dr, d) = dest.join().unwrap();
    assert!(
        matches!(dr, Err(ReceiveError::PeerAborted(ref r)) if r.contains("cancelled")),
        "{dr:?}"
    );
    assert!(d.config_checked);
    assert_eq!(d.page_writes.load(Ordering::Relaxed), 0);
    assert!(!d.resumed);
}

#[test]
fn refused_configuration_moves_no_page() {
    let src = FakeSource::new(false);
    let (a, b) = UnixStream::pair().unwrap();
    let dest = spawn_destination(
        b,
        FakeDestination {
            refuse: Some("needs 4 vCPUs, this host has 2".into()),
            ..Default::default()
        },
    );
    let opts = fast_opts(
        Duration::from_millis(50),
        Duration::from_secs(30),
        TimeoutStrategy::Cancel,
    );
    let e = send_migration(&*src, a, &opts, &MigrationProgress::new()).unwrap_err();
    assert!(
        matches!(e, SendError::Refused(ref r) if r.contains("4 vCPUs")),
        "{e}"
    );
    assert!(!src.ram.lock().unwrap().logging);
    let (dr, d) = dest.join().unwrap();
    assert!(matches!(dr, Err(ReceiveError::ConfigRefused(_))), "{dr:?}");
    assert_eq!(d.page_writes.load(Ordering::Relaxed), 0);
    assert!(!d.resumed);
}

/// A stream that damages what goes through it after `at` bytes: flips one bit there, or
/// cuts the stream there.
struct Damaging {
    inner: UnixStream,
    at: usize,
    written: usize,
    cut: bool,
}

impl Read for Damaging {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Damaging {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let start = self.written;
        if self.cut && start + buf.len() > self.at {
            let keep = self.at.saturating_sub(start);
            if keep > 0 {
                self.inner.write_all(&buf[..keep])?;
                self.written += keep;
            }
            self.inner.shutdown(std::net::Shutdown::Both)?;
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let n = if !self.cut && (start..start + buf.len()).contains(&self.at) {
            let mut copy = buf.to_vec();
            copy[self.at - start] ^= 0x10;
            self.inner.write(&copy)?
        } else {
            self.inner.write(buf)?
        };
        self.written += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl MigrationStream for Damaging {
    fn set_io_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.inner.set_io_timeouts(t)
    }

    fn shutdown_both(&self) {
        self.inner.shutdown_both()
    }
}

#[test]
fn corrupted_chunk_is_refused_and_the_source_keeps_running() {
    let src = FakeSource::new(false);
    let (a, b) = UnixStream::pair().unwrap();
    let dest = spawn_destination(b, FakeDestination::default());
    let damaged = Damaging {
        inner: a,
        at: 100_000,
        written: 0,
        cut: false,
    };
    let opts = fast_opts(
        Duration::from_millis(50),
        Duration::from_secs(30),
        TimeoutStrategy::Cancel,
    );
    let start = Instant::now();
    let e = send_migration(&*src, damaged, &opts, &MigrationProgress::new()).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5));
    let (dr, d) = dest.join().unwrap();
    let de = dr.unwrap_err();
    assert!(
        matches!(
            de,
            ReceiveError::Protocol(ProtocolError::ChecksumMismatch { .. })
        ),
        "{de}"
    );
    assert!(!d.resumed);
    assert!(e.to_string().contains("checksum mismatch"), "source: {e}");
    assert!(!src.is_paused());
}

#[test]
fn truncated_stream_is_refused_and_the_source_keeps_running() {
    for at in [5, 30, 300, 200_000] {
        let src = FakeSource::new(false);
        let (a, b) = UnixStream::pair().unwrap();
        let dest = spawn_destination(b, FakeDestination::default());
        let cut = Damaging {
            inner: a,
            at,
            written: 0,
            cut: true,
        };
        let opts = fast_opts(
            Duration::from_millis(50),
            Duration::from_secs(30),
            TimeoutStrategy::Cancel,
        );
        let e = send_migration(&*src, cut, &opts, &MigrationProgress::new()).unwrap_err();
        assert!(matches!(e, SendError::Protocol(_)), "{at}: {e}");
        let (dr, d) = dest.join().unwrap();
        let de = dr.unwrap_err();
        assert!(
            matches!(
                de,
                ReceiveError::Protocol(ProtocolError::Truncated { .. } | ProtocolError::Closed)
            ),
            "{at}: {de}"
        );
        assert!(!d.resumed);
        assert!(!src.is_paused());
    }
}

/// Sends `bytes` to a fresh destination and returns its outcome.
fn feed_destination(bytes: Vec<u8>) -> DestinationOutcome {
    feed(bytes, |b| spawn_destination(b, FakeDestination::default()))
}

/// Writes `bytes` into a destination that `start` runs on the other end of a socket
/// pair, and returns what that destination's thread returned.
fn feed<T: Send + 'static>(
    bytes: Vec<u8>,
    start: impl FnOnce(UnixStream) -> thread::JoinHandle<T>,
) -> T {
    let (mut a, b) = UnixStream::pair().unwrap();
    let dest = start(b);
    // Drain the replies so that the destination never blocks on them.
    let mut reader = a.try_clone().unwrap();
    let drain = thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
    });
    let _ = a.write_all(&bytes);
    let _ = a.shutdown(std::net::Shutdown::Write);
    let out = dest.join().unwrap();
    let _ = a.shutdown(std::net::Shutdown::Both);
    drain.join().unwrap();
    out
}

fn frame(msg: &Message<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    encode(msg, &mut v).unwrap();
    v
}

/// Appends a session's end: the machine state, then `Complete`.
fn end_session(v: &mut Vec<u8>) {
    v.extend(frame(&Message::State {
        vcpus: b"v",
        devices: b"d",
    }));
    v.extend(frame(&Message::Complete(Complete {
        paused_us: 1,
        source_info: b"not json",
    })));
}

fn hello_and_config() -> Vec<u8> {
    let mut v = frame(&Message::Hello(Hello {
        version: 1,
        features: 0,
        build: "test",
    }));
    v.extend(frame(&Message::Config(Config {
        ram: layout(),
        vm_config: b"{}",
    })));
    v
}

/// A whole valid session: all RAM (as `page` bytes everywhere), state, complete.
fn valid_session(skip_page_at: Option<u64>) -> Vec<u8> {
    let mut v = hello_and_config();
    let page = vec![0x5au8; PAGE_SIZE];
    for r in layout() {
        for p in 0..r.pages() {
            let gpa = r.gpa + p * PAGE;
            if Some(gpa) != skip_page_at {
                encode_memory_chunk(gpa, &page, &mut v).unwrap();
            }
        }
    }
    end_session(&mut v);
    v
}

#[test]
fn destination_accepts_a_hand_made_session() {
    let (r, d) = feed_destination(valid_session(None));
    let info = r.expect("valid session");
    assert!(d.resumed);
    assert!(d.ram.lock().unwrap().iter().all(|&b| b == 0x5a));
    assert_eq!(info.status, MigrationStatus::Completed);
}

#[test]
fn destination_refuses_hostile_streams_without_resuming() {
    let wrong_version = {
        let mut v = hello_and_config();
        v[4..6].copy_from_slice(&2u16.to_le_bytes());
        v
    };
    let missing_page = valid_session(Some(1 << 20));
    let outside_ram = {
        let mut v = hello_and_config();
        encode_memory_chunk(512 << 10, &[1u8; PAGE_SIZE], &mut v).unwrap();
        v
    };
    let no_state = {
        let full = valid_session(None);
        let complete = frame(&Message::Complete(Complete {
            paused_us: 1,
            source_info: b"not json",
        }));
        let state = frame(&Message::State {
            vcpus: b"v",
            devices: b"d",
        });
        let mut v = full[..full.len() - complete.len() - state.len()].to_vec();
        v.extend(complete);
        v
    };
    let corrupted = {
        let mut v = valid_session(None);
        let at = v.len() / 2;
        v[at] ^= 1;
        v
    };
    let truncated = {
        let v = valid_session(None);
        v[..v.len() - 3].to_vec()
    };
    let chunk_before_config = {
        let mut v = frame(&Message::Hello(Hello {
            version: 1,
            features: 0,
            build: "x",
        }));
        encode_memory_chunk(0, &[1u8; PAGE_SIZE], &mut v).unwrap();
        v
    };
    let huge_header = Header {
        version: 1,
        kind: MessageType::MemoryChunk,
        payload_len: u32::MAX,
    }
    .to_bytes()
    .to_vec();
    for (name, bytes, needle) in [
        ("garbage", b"GET / HTTP/1.1\r\n\r\n".to_vec(), "bad magic"),
        (
            "wrong version",
            wrong_version,
            "unsupported protocol version 2",
        ),
        ("missing page", missing_page, "page 0x100000"),
        ("outside RAM", outside_ram, "0x80000"),
        ("no state", no_state, "machine state"),
        ("corrupted", corrupted, ""),
        ("truncated", truncated, "truncated"),
        ("chunk before config", chunk_before_config, "MemoryChunk"),
        ("huge payload", huge_header, "exceeds its cap"),
        ("empty", Vec::new(), "closed"),
    ] {
        let (r, d) = feed_destination(bytes);
        let e = r.expect_err(name);
        assert!(e.to_string().contains(needle), "{name}: {e}");
        assert!(!d.resumed, "{name}: resumed");
        assert!(d.state.is_none(), "{name}: state restored");
    }
}

/// A session whose RAM comes as page chunks of 64 pages mixing zero, whole and sparse
/// pages; returns it with the RAM it leaves, and where its first chunk's data starts.
fn page_chunk_session() -> (Vec<u8>, Vec<u8>, usize) {
    let mut v = hello_and_config();
    let mut ram = Vec::new();
    let mut first_data = 0;
    for r in layout() {
        let mut pages = vec![0u8; r.size as usize];
        for (i, page) in pages.chunks_exact_mut(PAGE_SIZE).enumerate() {
            match i % 3 {
                0 => {}
                1 => page
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = (i + j) as u8 | 1),
                _ => page[i % PAGE_SIZE] = 0x77,
            }
        }
        for (c, chunk) in pages.chunks(64 * PAGE_SIZE).enumerate() {
            if first_data == 0 {
                // Header, fixed part, a kind per page.
                first_data = v.len() + HEADER_LEN + 16 + 2 * 64;
            }
            let gpa = r.gpa + (c * 64 * PAGE_SIZE) as u64;
            encode_page_chunk(gpa, chunk, &mut v).unwrap();
        }
        ram.extend(pages);
    }
    end_session(&mut v);
    (v, ram, first_data)
}

#[test]
fn page_chunks_stream_into_ram_and_damage_is_refused() {
    let (session, ram, first_data) = page_chunk_session();
    let (r, d) = feed_destination(session.clone());
    r.expect("valid page chunk session");
    assert!(d.resumed);
    assert!(*d.ram.lock().unwrap() == ram, "the RAM differs");

    // One bit of page data flipped: the pages were already in RAM, but the checksum
    // fails the chunk, so the VM never runs.
    let mut flipped = session.clone();
    flipped[first_data + PAGE_SIZE + 5] ^= 0x10;
    let outside_ram = {
        let mut v = hello_and_config();
        encode_page_chunk(512 << 10, &[1u8; PAGE_SIZE], &mut v).unwrap();
        v
    };
    // The kinds claim a whole page the payload does not hold.
    let short = {
        let mut v = hello_and_config();
        let at = v.len();
        encode_page_chunk(0, &[0u8; 2 * PAGE_SIZE], &mut v).unwrap();
        v[at + HEADER_LEN + 16..at + HEADER_LEN + 18].copy_from_slice(&0xffffu16.to_le_bytes());
        v
    };
    let bad_kind = {
        let mut v = hello_and_config();
        let at = v.len();
        encode_page_chunk(0, &[0u8; PAGE_SIZE], &mut v).unwrap();
        v[at + HEADER_LEN + 16..at + HEADER_LEN + 18].copy_from_slice(&65u16.to_le_bytes());
        v
    };
    for (name, bytes, needle) in [
        ("flipped bit", flipped, "checksum mismatch"),
        ("outside RAM", outside_ram, "0x80000"),
        ("short", short, "needs 4096 bytes"),
        ("bad kind", bad_kind, "kind 0x41"),
        (
            "truncated",
            session[..first_data + 100].to_vec(),
            "truncated",
        ),
    ] {
        let (r, d) = feed_destination(bytes);
        let e = r.expect_err(name);
        assert!(e.to_string().contains(needle), "{name}: {e}");
        assert!(!d.resumed, "{name}: resumed");
    }
}

/// A sparse page comes into fresh RAM without being cleared first (it reads as zero
/// there), but one sent again must be: the stretch it had the first time is zero now.
/// The same session with the seam that never clears (in a child process: the seam is an
/// environment variable) must leave that stretch behind.
#[test]
fn a_sparse_page_sent_again_lands_whole() {
    let seam = std::env::var_os(TEST_SPARSE_NEVER_CLEARED_ENV).is_some();
    let mut v = hello_and_config();
    let mut ram = Vec::new();
    for r in layout() {
        let mut pages = vec![0u8; r.size as usize];
        for (i, page) in pages.chunks_exact_mut(PAGE_SIZE).enumerate() {
            page[(i * 8) % PAGE_SIZE] = 0x11;
            page[PAGE_SIZE - 1] = 0x12;
        }
        for (c, chunk) in pages.chunks(64 * PAGE_SIZE).enumerate() {
            encode_page_chunk(r.gpa + (c * 64 * PAGE_SIZE) as u64, chunk, &mut v).unwrap();
        }
        ram.extend(pages);
    }
    // Page 0 again (a later pass): its stretches moved.
    let mut again = vec![0u8; PAGE_SIZE];
    again[2000] = 0x22;
    encode_page_chunk(0, &again, &mut v).unwrap();
    ram[..PAGE_SIZE].copy_from_slice(&again);
    end_session(&mut v);
    let (r, d) = feed_destination(v);
    r.expect("valid session");
    let got = d.ram.lock().unwrap();
    let stale = (got[0], got[PAGE_SIZE - 1]);
    if seam {
        assert_eq!(
            stale,
            (0x11, 0x12),
            "the seam did not leave the old stretches"
        );
        assert_eq!(got[2000], 0x22);
        return;
    }
    assert_eq!(stale, (0, 0), "page 0 kept its first stretches");
    let diff = got
        .chunks_exact(PAGE_SIZE)
        .zip(ram.chunks_exact(PAGE_SIZE))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(diff, 0, "{diff} pages differ");

    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_sparse_page_sent_again_lands_whole",
            "--test-threads=1",
        ])
        .env(TEST_SPARSE_NEVER_CLEARED_ENV, "1")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&child.stdout);
    assert!(
        child.status.success() && out.contains("1 passed"),
        "the seam run: {}\n{out}\n{}",
        child.status,
        String::from_utf8_lossy(&child.stderr)
    );
}

/// A destination of an older build (no page chunks; no sparse chunks either) gets what
/// it takes, and nothing is lost.
#[test]
fn older_destinations_get_the_encodings_they_take() {
    use vm_migration::protocol::features;
    for offered in [
        features::ALL & !features::PAGE_CHUNKS,
        features::ALL & !features::PAGE_CHUNKS & !features::SPARSE_PAGES,
    ] {
        let src = FakeSource::new(false);
        let stop = Arc::new(AtomicBool::new(false));
        let guest = src.run_guest(Duration::from_micros(100), stop.clone());
        let (a, b) = UnixStream::pair().unwrap();
        let dest = thread::spawn(move || {
            let mut dest = FakeDestination::default();
            let opts = ReceiveOptions {
                features: offered,
                ..receive_opts()
            };
            let r = receive_migration(&mut dest, b, &opts, &MigrationProgress::new());
            (r, dest)
        });
        let opts = fast_opts(
            Duration::from_millis(500),
            Duration::from_secs(30),
            TimeoutStrategy::Cancel,
        );
        send_migration(&*src, a, &opts, &MigrationProgress::new()).expect("migration");
        stop.store(true, Ordering::Relaxed);
        guest.join().unwrap();
        let (dr, d) = dest.join().unwrap();
        dr.expect("destination");
        assert_migrated(&src, &d);
    }
}

/// A destination that does the handshake, then misbehaves.
fn half_destination(
    stream: UnixStream,
    then: impl FnOnce(&mut MessageReader<UnixStream>) + Send + 'static,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut conn = MessageReader::new(stream);
        assert!(matches!(conn.read_message(), Ok(Message::Hello(_))));
        let hello = frame(&Message::Hello(Hello {
            version: 1,
            features: 0,
            build: "half",
        }));
        conn.get_mut().write_all(&hello).unwrap();
        assert!(matches!(conn.read_message(), Ok(Message::Config(_))));
        conn.get_mut()
            .write_all(&frame(&Message::ConfigAccepted))
            .unwrap();
        then(&mut conn);
    })
}

fn expect_bounded_failure(then: fn(&mut MessageReader<UnixStream>), paused_on_the_way: bool) {
    let src = FakeSource::new(false);
    let (a, b) = UnixStream::pair().unwrap();
    let peer = half_destination(b, then);
    let opts = fast_opts(
        Duration::from_millis(50),
        Duration::from_secs(30),
        TimeoutStrategy::Cancel,
    );
    let start = Instant::now();
    let e = send_migration(&*src, a, &opts, &MigrationProgress::new()).unwrap_err();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}: {e}");
    assert!(!src.is_paused(), "{e}");
    assert_eq!(
        src.resumes.load(Ordering::SeqCst),
        u32::from(paused_on_the_way),
        "{e}"
    );
    peer.join().unwrap();
}

#[test]
fn destination_vanishing_mid_way() {
    expect_bounded_failure(
        |conn| {
            let _ = conn.read_message();
            conn.get_ref().shutdown(std::net::Shutdown::Both).unwrap();
        },
        false,
    );
}

#[test]
fn silent_destination_times_out() {
    // Never reads again: the source's writes stall, as on a cut link.
    expect_bounded_failure(|_| thread::sleep(Duration::from_secs(2)), false);
}

#[test]
fn destination_that_never_confirms() {
    expect_bounded_failure(
        |conn| {
            while let Ok(msg) = conn.read_message() {
                if matches!(msg, Message::Complete(_)) {
                    break;
                }
            }
            thread::sleep(Duration::from_secs(1));
        },
        true,
    );
}

#[test]
fn cancel_while_a_write_is_blocked() {
    // The destination stops reading, so the source's flush blocks with a frame half
    // written; the cancel lands then. The source must give up at once (not retry its
    // cancelled writes forever), and still leave the stream at a frame boundary so that
    // the destination reads the `Abort`.
    let src = FakeSource::new(true);
    let (a, b) = UnixStream::pair().unwrap();
    let progress = MigrationProgress::new();
    let api = progress.clone();
    let peer = half_destination(b, move |conn| {
        // Once a flush of 1 MiB is due (far more than the socket buffer holds), cancel,
        // and read again only after the source noticed.
        while api.snapshot().ram.transferred < 1 << 20 {
            thread::sleep(Duration::from_millis(5));
        }
        api.cancel();
        thread::sleep(Duration::from_millis(150));
        loop {
            match conn.read_message() {
                Ok(Message::Abort { reason }) => {
                    assert!(reason.contains("cancelled"), "{reason}");
                    return;
                }
                Ok(_) => {}
                Err(e) => panic!("no Abort before the end of the stream: {e}"),
            }
        }
    });
    // Only the cancel may end the blocked write, however slow the machine.
    let opts = SendOptions {
        io_timeout: Duration::from_secs(10),
        ..fast_opts(
            Duration::from_nanos(1),
            Duration::from_secs(60),
            TimeoutStrategy::Cancel,
        )
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let source = src.clone();
    let engine_progress = progress.clone();
    thread::spawn(move || {
        let _ = tx.send(send_migration(&*source, a, &opts, &engine_progress));
    });
    let e = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(r) => r.unwrap_err(),
        Err(_) => panic!("send_migration still running 20 s after the cancel"),
    };
    assert!(matches!(e, SendError::Cancelled), "{e}");
    assert_eq!(progress.status(), MigrationStatus::Cancelled);
    assert!(!src.is_paused());
    assert!(!src.ram.lock().unwrap().logging, "dirty log stopped");
    peer.join().unwrap();
}

#[test]
fn header_is_twelve_bytes() {
    assert_eq!(frame(&Message::ConfigAccepted).len(), HEADER_LEN);
}

/// A UNIX listener on a fresh path, and an `accept` for the destination's extra connections.
fn unix_listener(tag: &str) -> (std::os::unix::net::UnixListener, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("ferry-engine-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    (std::os::unix::net::UnixListener::bind(&path).unwrap(), path)
}

type Boxed = Box<dyn MigrationStream>;

/// Runs a destination that takes extra connections from `listener`.
fn spawn_parallel_destination(
    listener: std::os::unix::net::UnixListener,
) -> thread::JoinHandle<DestinationOutcome> {
    spawn_parallel_destination_with(listener, receive_opts())
}

fn spawn_parallel_destination_with(
    listener: std::os::unix::net::UnixListener,
    opts: ReceiveOptions,
) -> thread::JoinHandle<DestinationOutcome> {
    thread::spawn(move || {
        let (main, _) = listener.accept().unwrap();
        let mut accept = |_: Duration| -> io::Result<Boxed> {
            let (s, _) = listener.accept()?;
            Ok(Box::new(s))
        };
        let mut dest = FakeDestination::default();
        let r = receive_migration_from(
            &mut dest,
            Box::new(main) as Boxed,
            Some(&mut accept),
            &opts,
            &MigrationProgress::new(),
        );
        (r, dest)
    })
}

/// Sends `src` over `main` and `extras` with a `downtime_ms` target.
fn send_parallel(
    src: &FakeSource,
    main: UnixStream,
    extras: Vec<Boxed>,
    downtime_ms: u64,
) -> Result<MigrationInfo, SendError> {
    let opts = fast_opts(
        Duration::from_millis(downtime_ms),
        Duration::from_secs(30),
        TimeoutStrategy::Cancel,
    );
    send_migration_parallel(
        src,
        Box::new(main) as Boxed,
        extras,
        &opts,
        &MigrationProgress::new(),
    )
}

/// The main connection and `extra` more to `path`, in that order.
fn connect_all(path: &std::path::Path, extra: usize) -> (UnixStream, Vec<UnixStream>) {
    let main = UnixStream::connect(path).unwrap();
    let extras = (0..extra)
        .map(|_| UnixStream::connect(path).unwrap())
        .collect();
    (main, extras)
}

#[test]
fn parallel_connections_lose_nothing_under_a_busy_guest() {
    let (listener, path) = unix_listener("par");
    let dest = spawn_parallel_destination(listener);
    let src = FakeSource::new(false);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = src.run_guest(Duration::ZERO, stop.clone());
    let (main, extras) = connect_all(&path, 3);
    let extras: Vec<Boxed> = extras.into_iter().map(|s| Box::new(s) as Boxed).collect();
    let info = send_parallel(&src, main, extras, 200).expect("migration");
    stop.store(true, Ordering::Relaxed);
    guest.join().unwrap();
    let (dr, d) = dest.join().unwrap();
    let dinfo = dr.expect("destination");
    assert_migrated(&src, &d);
    assert!(info.iterations.len() >= 2, "{info:?}");
    // The destination summed the four connections' shares of every pass.
    assert_eq!(dinfo.iterations.len(), info.iterations.len());
    let sent: u64 = info.iterations.iter().map(|i| i.pages).sum();
    assert!(sent >= 1024, "{sent} pages sent");
    let _ = std::fs::remove_file(path);
}

/// A connection that counts the bytes written through it, and says when it was closed.
struct Counting {
    inner: UnixStream,
    written: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
}

impl Counting {
    fn new(inner: UnixStream) -> Self {
        Counting {
            inner,
            written: Arc::default(),
            closed: Arc::default(),
        }
    }
}

impl Read for Counting {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl MigrationStream for Counting {
    fn set_io_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.inner.set_io_timeouts(t)
    }

    fn shutdown_both(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.inner.shutdown_both()
    }
}

/// A guest whose data all sits in the lower half of its RAM (the upper half zero, as a
/// guest that never touched it) still has its data carried by both connections: they
/// take the pass's runs as they are ready for them, not half of the RAM each, which
/// sent all of it over one.
#[test]
fn both_connections_carry_data_that_sits_in_one_half_of_ram() {
    let (listener, path) = unix_listener("parhalf");
    let dest = spawn_parallel_destination(listener);
    let src = FakeSource::new(false);
    {
        let mut ram = src.ram.lock().unwrap();
        let half = ram.bytes.len() / 2;
        ram.bytes[half..].fill(0);
    }
    // 300 us a page: a 64-page run takes 19 ms to read and the data's 8 runs ~80 ms, so
    // neither thread can take every run before the other is ready.
    *src.read_delay.lock().unwrap() = Duration::from_micros(300);
    let (main, extras) = connect_all(&path, 1);
    let main = Counting::new(main);
    let extra = Counting::new(extras.into_iter().next().unwrap());
    let counters = [main.written.clone(), extra.written.clone()];
    let opts = fast_opts(
        Duration::from_millis(200),
        Duration::from_secs(30),
        TimeoutStrategy::Cancel,
    );
    let info = send_migration_parallel(
        &*src,
        Box::new(main) as Boxed,
        vec![Box::new(extra) as Boxed],
        &opts,
        &MigrationProgress::new(),
    )
    .expect("migration");
    let (dr, d) = dest.join().unwrap();
    let dinfo = dr.expect("destination");
    assert_migrated(&src, &d);
    // No guest runs: pass 0 sent every page once, no run twice.
    assert_eq!(info.iterations[0].pages, 1024, "{info:?}");
    assert_eq!(dinfo.iterations[0].pages, 1024, "{dinfo:?}");
    let bytes = counters.map(|c| c.load(Ordering::Relaxed));
    let total = bytes[0] + bytes[1];
    let data = info.ram.normal_bytes;
    assert!(data > 1 << 20, "{data} bytes of page data");
    // Each carried at least a tenth of everything (one run of data is 12 %); split by
    // address, the extra connection carried only the zero half's page kinds (a KiB).
    assert!(
        bytes.iter().all(|&b| b * 10 >= total),
        "bytes per connection (main, extra): {bytes:?} of {total}, {data} of them page data"
    );
    let _ = std::fs::remove_file(path);
}

/// With a final pass this small, the extra connections close before the guest pauses
/// (the destination retires them between passes), so that the pass's end waits for none
/// of their threads; the migration loses nothing. Before, they closed after the final
/// pass, inside the pause, as they still do for a destination without `LANES_RETIRE`.
#[test]
fn extra_connections_close_before_a_small_final_pass() {
    for agreed in [true, false] {
        extra_connections_close_before_the_pause(agreed);
    }
}

fn extra_connections_close_before_the_pause(agreed: bool) {
    let (listener, path) = unix_listener(if agreed { "parretire" } else { "parnoretire" });
    let mut opts = receive_opts();
    if !agreed {
        opts.features &= !vm_migration::protocol::features::LANES_RETIRE;
    }
    let dest = spawn_parallel_destination_with(listener, opts);
    let src = FakeSource::new(false);
    let (main, extras) = connect_all(&path, 2);
    let extras: Vec<Counting> = extras.into_iter().map(Counting::new).collect();
    let closed: Vec<Arc<AtomicBool>> = extras.iter().map(|c| c.closed.clone()).collect();
    let written: Vec<Arc<AtomicU64>> = extras.iter().map(|c| c.written.clone()).collect();
    // At the pause: which extra connections were closed, and what they had carried.
    let seen = Arc::new(Mutex::new(None));
    let at_pause = seen.clone();
    *src.on_pause.lock().unwrap() = Some(Box::new(move || {
        let c: Vec<bool> = closed.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        let w: Vec<u64> = written.iter().map(|w| w.load(Ordering::SeqCst)).collect();
        *at_pause.lock().unwrap() = Some((c, w));
    }));
    let written: Vec<Arc<AtomicU64>> = extras.iter().map(|c| c.written.clone()).collect();
    let extras: Vec<Boxed> = extras.into_iter().map(|c| Box::new(c) as Boxed).collect();
    let info = send_parallel(&src, main, extras, 200).expect("migration");
    let (dr, d) = dest.join().unwrap();
    dr.expect("destination");
    assert_migrated(&src, &d);
    let (closed, before) = seen.lock().unwrap().take().expect("the guest was paused");
    assert_eq!(
        closed,
        [agreed, agreed],
        "extra connections closed at the pause (retiring agreed: {agreed}): {info:?}"
    );
    // Retired, nothing went over them after the pause (not even the final pass's end).
    let after: Vec<u64> = written.iter().map(|w| w.load(Ordering::SeqCst)).collect();
    if agreed {
        assert_eq!(
            before, after,
            "bytes on the extra connections at the pause and at the end"
        );
    } else {
        assert!(
            after.iter().zip(&before).all(|(a, b)| a > b),
            "the final pass's end on each extra connection: {before:?} -> {after:?}"
        );
    }
    let _ = std::fs::remove_file(path);
}

#[test]
fn corrupted_chunk_on_an_extra_connection_is_refused_and_the_source_keeps_running() {
    let (listener, path) = unix_listener("parbad");
    let dest = spawn_parallel_destination(listener);
    let src = FakeSource::new(false);
    // Connections take runs as they are ready, and pass 0 is the damaging connection's
    // only chance (later passes are small and go on the main one): slow reads (1 ms a
    // page, 64 ms a run, ~340 ms for the pass) leave it time to start even under load.
    *src.read_delay.lock().unwrap() = Duration::from_millis(1);
    let (main, extras) = connect_all(&path, 2);
    let extras: Vec<Boxed> = extras
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            Box::new(Damaging {
                inner: s,
                // The second extra connection damages a byte of its first chunk.
                at: if i == 1 { 5_000 } else { usize::MAX },
                written: 0,
                cut: false,
            }) as Boxed
        })
        .collect();
    let e = send_parallel(&src, main, extras, 50).unwrap_err();
    let (dr, d) = dest.join().unwrap();
    let de = dr.unwrap_err();
    assert!(
        matches!(&de, ReceiveError::Channel { index: 2, reason } if reason.contains("checksum mismatch")),
        "{de}"
    );
    assert!(!d.resumed);
    assert!(e.to_string().contains("checksum mismatch"), "source: {e}");
    assert!(!src.is_paused());
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_destination_without_extra_connections_gets_everything_over_one() {
    let (listener, path) = unix_listener("par1");
    let dest = thread::spawn(move || {
        let (main, _) = listener.accept().unwrap();
        let mut d = FakeDestination::default();
        let r = receive_migration(
            &mut d,
            Box::new(main) as Boxed,
            &receive_opts(),
            &MigrationProgress::new(),
        );
        (r, d, listener)
    });
    let src = FakeSource::new(false);
    let (main, extras) = connect_all(&path, 2);
    let extras: Vec<Boxed> = extras.into_iter().map(|s| Box::new(s) as Boxed).collect();
    send_parallel(&src, main, extras, 100).expect("migration");
    let (dr, d, _listener) = dest.join().unwrap();
    dr.expect("destination");
    assert_migrated(&src, &d);
    let _ = std::fs::remove_file(path);
}

/// A source whose RAM is one file, handed over as is (`MemFDs`).
struct FileSource {
    file: std::fs::File,
    layout: Vec<RamRange>,
    paused: AtomicBool,
}

impl SourceVm for FileSource {
    fn config(&self) -> HookResult<Vec<u8>> {
        Ok(b"{}".to_vec())
    }
    fn ram_layout(&self) -> Vec<RamRange> {
        self.layout.clone()
    }
    fn read_pages(&self, _: u64, _: &mut [u8]) -> HookResult<()> {
        panic!("a MemFDs migration copies no page");
    }
    fn start_dirty_log(&self) -> HookResult<()> {
        panic!("a MemFDs migration needs no dirty log");
    }
    fn collect_dirty(&self, _: bool) -> HookResult<Vec<(u64, u64)>> {
        panic!("a MemFDs migration needs no dirty log");
    }
    fn stop_dirty_log(&self) {}
    fn pause(&self) -> HookResult<()> {
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&self) -> HookResult<()> {
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn save_state(&self) -> HookResult<(Vec<u8>, Vec<u8>)> {
        Ok((b"cpu".to_vec(), b"dev".to_vec()))
    }
    fn memory_files(
        &self,
    ) -> HookResult<
        Vec<(
            vm_migration::protocol::MemoryFd,
            std::os::fd::BorrowedFd<'_>,
        )>,
    > {
        let mut off = 0;
        Ok(self
            .layout
            .iter()
            .map(|r| {
                let f = vm_migration::protocol::MemoryFd {
                    gpa: r.gpa,
                    size: r.size,
                    file_offset: off,
                };
                off += r.size;
                (f, std::os::fd::AsFd::as_fd(&self.file))
            })
            .collect())
    }
}

/// A destination that maps nothing: it keeps the files it was given.
#[derive(Default)]
struct FileDestination {
    files: Vec<(vm_migration::protocol::MemoryFd, std::os::fd::OwnedFd)>,
    state: Option<(Vec<u8>, Vec<u8>)>,
    resumed: bool,
}

impl DestinationVm for FileDestination {
    fn adopt_memory(
        &mut self,
        files: Vec<(vm_migration::protocol::MemoryFd, std::os::fd::OwnedFd)>,
    ) -> HookResult<()> {
        self.files = files;
        Ok(())
    }
    fn check_config(&mut self, _: &[u8], ram: &[RamRange]) -> HookResult<Vec<RamRange>> {
        assert!(
            !self.files.is_empty(),
            "the files come before the configuration"
        );
        Ok(ram.to_vec())
    }
    fn write_pages(&self, _: u64, _: &[u8]) -> HookResult<()> {
        panic!("no page is written when RAM came as files");
    }
    fn zero_pages(&self, _: u64, _: u64) -> HookResult<()> {
        panic!("no page is written when RAM came as files");
    }
    fn restore_state(&mut self, vcpus: &[u8], devices: &[u8]) -> HookResult<()> {
        self.state = Some((vcpus.to_vec(), devices.to_vec()));
        Ok(())
    }
    fn resume(&mut self) -> HookResult<()> {
        self.resumed = true;
        Ok(())
    }
}

fn file_source() -> FileSource {
    let path = std::env::temp_dir().join(format!("ferry-engine-ram-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    let layout = layout();
    let bytes: Vec<u8> = (0..ram_size(&layout))
        .map(|i| (i / PAGE_SIZE) as u8)
        .collect();
    file.write_all(&bytes).unwrap();
    FileSource {
        file,
        layout,
        paused: AtomicBool::new(false),
    }
}

#[test]
fn memfds_hand_the_ram_files_over_and_copy_no_page() {
    use std::os::unix::fs::FileExt;
    let src = file_source();
    let (a, b) = UnixStream::pair().unwrap();
    let dest = thread::spawn(move || {
        let mut d = FileDestination::default();
        let r = receive_migration(
            &mut d,
            FdUnixStream::new(b),
            &receive_opts(),
            &MigrationProgress::new(),
        );
        (r, d)
    });
    let opts = SendOptions {
        local_memory: true,
        ..fast_opts(
            Duration::from_millis(100),
            Duration::from_secs(30),
            TimeoutStrategy::Cancel,
        )
    };
    let info = send_migration(&src, FdUnixStream::new(a), &opts, &MigrationProgress::new())
        .expect("migration");
    let (dr, d) = dest.join().unwrap();
    let dinfo = dr.expect("destination");
    assert!(d.resumed && src.paused.load(Ordering::SeqCst));
    assert_eq!(d.state, Some((b"cpu".to_vec(), b"dev".to_vec())));
    assert_eq!(d.files.len(), 2);
    // The files are the source's RAM itself: a byte changed through one shows in the other.
    let (second, fd) = &d.files[1];
    assert_eq!(
        (second.gpa, second.size, second.file_offset),
        (1 << 20, 3584 << 10, 512 << 10)
    );
    let theirs = std::fs::File::from(fd.try_clone().unwrap());
    let mut b = [0u8; 1];
    theirs
        .read_exact_at(&mut b, (512 << 10) + 5 * PAGE)
        .unwrap();
    assert_eq!(b[0], (128 + 5) as u8);
    src.file
        .write_all_at(&[0xee], (512 << 10) + 5 * PAGE)
        .unwrap();
    theirs
        .read_exact_at(&mut b, (512 << 10) + 5 * PAGE)
        .unwrap();
    assert_eq!(b[0], 0xee);
    assert!(
        info.ram.transferred < 4096,
        "only the state moved: {}",
        info.ram.transferred
    );
    assert!(dinfo.downtime.is_some());
}

#[test]
fn memfds_over_a_connection_that_cannot_pass_files_is_refused_and_the_source_keeps_running() {
    let src = file_source();
    let (a, b) = UnixStream::pair().unwrap();
    let dest = thread::spawn(move || {
        let mut d = FileDestination::default();
        receive_migration(&mut d, b, &receive_opts(), &MigrationProgress::new()).map(|_| ())
    });
    let opts = SendOptions {
        local_memory: true,
        ..fast_opts(
            Duration::from_millis(100),
            Duration::from_secs(30),
            TimeoutStrategy::Cancel,
        )
    };
    let e = send_migration(&src, a, &opts, &MigrationProgress::new()).unwrap_err();
    assert!(matches!(e, SendError::NoLocalMemory), "{e}");
    assert!(e.to_string().contains("MemFDs"), "{e}");
    assert!(!src.paused.load(Ordering::SeqCst));
    assert!(dest.join().unwrap().is_err());
}

/// A source of all-zero RAM that is slow to read (a large, untouched guest on a busy
/// host): a pass of zero pages sends almost no bytes for a long time.
struct SlowZeroSource {
    paused: AtomicBool,
}

impl SourceVm for SlowZeroSource {
    fn config(&self) -> HookResult<Vec<u8>> {
        Ok(b"{}".to_vec())
    }
    fn ram_layout(&self) -> Vec<RamRange> {
        vec![RamRange {
            gpa: 0,
            size: 16 << 20,
        }]
    }
    fn read_pages(&self, _: u64, buf: &mut [u8]) -> HookResult<()> {
        thread::sleep(Duration::from_millis(12));
        buf.fill(0);
        Ok(())
    }
    fn start_dirty_log(&self) -> HookResult<()> {
        Ok(())
    }
    fn collect_dirty(&self, _: bool) -> HookResult<Vec<(u64, u64)>> {
        Ok(Vec::new())
    }
    fn stop_dirty_log(&self) {}
    fn pause(&self) -> HookResult<()> {
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&self) -> HookResult<()> {
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn save_state(&self) -> HookResult<(Vec<u8>, Vec<u8>)> {
        Ok((b"cpu".to_vec(), Vec::new()))
    }
}

#[test]
fn a_long_pass_of_zero_pages_keeps_the_destination_from_timing_out() {
    // 256 chunks of zero pages, 12 ms each to read: about 3 s with only a few KiB to send,
    // past the destination's 2 s idle limit unless the source writes them out as it goes.
    let src = SlowZeroSource {
        paused: AtomicBool::new(false),
    };
    let (a, b) = UnixStream::pair().unwrap();
    let dest = spawn_destination(b, FakeDestination::default());
    let opts = SendOptions {
        chunk_pages: 16,
        ..fast_opts(
            Duration::from_millis(100),
            Duration::from_secs(30),
            TimeoutStrategy::Cancel,
        )
    };
    let info = send_migration(&src, a, &opts, &MigrationProgress::new()).expect("migration");
    assert_eq!(info.ram.duplicate, 4096);
    let (dr, d) = dest.join().unwrap();
    dr.expect("destination");
    assert!(d.resumed);
}

/// Pages of the source's RAM that are not all zeros.
fn data_pages(src: &FakeSource) -> u64 {
    let ram = src.ram.lock().unwrap();
    ram.bytes
        .chunks_exact(PAGE_SIZE)
        .filter(|p| p.iter().any(|&b| b != 0))
        .count() as u64
}

#[test]
fn the_source_pauses_only_once_the_destination_holds_the_pass() {
    // A destination that takes 1 ms per page write falls behind what the socket buffers
    // hold; the guest is idle, so the source pauses right after pass 0.
    let src = FakeSource::new(false);
    let expected = data_pages(&src);
    let dest = FakeDestination {
        write_delay: Some((Duration::from_millis(1), Arc::new(AtomicBool::new(true)))),
        ..FakeDestination::default()
    };
    let writes = dest.page_writes.clone();
    let at_pause = Arc::new(AtomicU64::new(u64::MAX));
    let seen = at_pause.clone();
    *src.on_pause.lock().unwrap() = Some(Box::new(move || {
        seen.store(writes.load(Ordering::SeqCst), Ordering::SeqCst)
    }));
    let (a, b) = UnixStream::pair().unwrap();
    let dest = spawn_destination(b, dest);
    let opts = fast_opts(
        Duration::from_millis(100),
        Duration::from_secs(30),
        TimeoutStrategy::Cancel,
    );
    send_migration(&*src, a, &opts, &MigrationProgress::new()).expect("migration");
    let (dr, d) = dest.join().unwrap();
    dr.expect("destination");
    assert_migrated(&src, &d);
    assert_eq!(
        at_pause.load(Ordering::SeqCst),
        expected,
        "pages the destination had written when the source paused"
    );
}

#[test]
fn downtime_runs_from_the_pause_to_resumed_on_the_source_clock() {
    // Once the source pauses, every page write at the destination takes 300 ms: the
    // final pass sits in the socket while the source has long written `Complete`. The
    // pause lasts at least that long, and both sides must say so.
    let src = FakeSource::new(false);
    let slow = Arc::new(AtomicBool::new(false));
    let dest = FakeDestination {
        write_delay: Some((Duration::from_millis(300), slow.clone())),
        ..FakeDestination::default()
    };
    *src.on_pause.lock().unwrap() = Some(Box::new(move || slow.store(true, Ordering::SeqCst)));
    let (a, b) = UnixStream::pair().unwrap();
    let dest = spawn_destination(b, dest);
    let opts = SendOptions {
        confirm_timeout: Duration::from_secs(3),
        ..fast_opts(
            Duration::from_millis(100),
            Duration::from_secs(30),
            TimeoutStrategy::Cancel,
        )
    };
    let info = send_migration(&*src, a, &opts, &MigrationProgress::new()).expect("migration");
    let (dr, d) = dest.join().unwrap();
    let dinfo = dr.expect("destination");
    assert_migrated(&src, &d);
    let downtime = info.downtime.unwrap();
    assert!(downtime >= 300, "source downtime {downtime} ms");
    assert_eq!(
        dinfo.downtime,
        Some(downtime),
        "the destination reports the source's"
    );
    assert_eq!(dinfo.downtime_us, info.downtime_us);
    let (total, dtotal) = (info.total_time.unwrap(), dinfo.total_time.unwrap());
    assert!(
        dtotal >= 300 && dtotal <= total,
        "{dtotal} ms, source {total} ms"
    );
}

/// [`valid_session`] from a source that offers `features`, followed by `tail`.
fn session_offering(features: u64, tail: &[u8]) -> Vec<u8> {
    let mut v = valid_session(None);
    let hello = frame(&Message::Hello(Hello {
        version: 1,
        features,
        build: "test",
    }));
    v[..hello.len()].copy_from_slice(&hello);
    v.extend_from_slice(tail);
    v
}

#[test]
fn the_destination_reports_the_downtime_the_source_measured() {
    let measured = frame(&Message::Measured {
        // Rounded up to whole ms: 42, where rounding to the nearest would say 41.
        downtime_us: 41_001,
        total_us: 987_000,
    });
    let (r, d) = feed_destination(session_offering(
        vm_migration::protocol::features::SOURCE_MEASURES,
        &measured,
    ));
    let info = r.expect("valid session");
    assert!(d.resumed);
    assert_eq!(info.downtime, Some(42));
    assert_eq!(info.downtime_us, Some(41_001));
    assert_eq!(info.total_time, Some(987));
}

#[test]
fn a_source_that_gives_up_after_the_resume_makes_the_destination_stop() {
    // `Resumed` came too late for the source: it resumed its own copy and says so.
    let abort = frame(&Message::Abort {
        reason: "no Resumed within 8 s",
    });
    let (r, d) = feed_destination(session_offering(
        vm_migration::protocol::features::SOURCE_MEASURES,
        &abort,
    ));
    let e = r.unwrap_err();
    assert!(matches!(e, ReceiveError::SourceResumed(_)), "{e}");
    assert!(e.to_string().contains("no Resumed within 8 s"), "{e}");
    assert!(d.resumed, "it had resumed: the vmm stops it on this error");
}

/// A busy guest on a slow source: passes last long enough for the engine to read the dirty
/// log mid-pass and leave pages written again to the next pass. Nothing may be lost.
fn redirtied_pages_wait_for_the_next_pass(extra_connections: usize) {
    let src = FakeSource::new(false);
    // Slower per page with more connections: every pass lasts about as long.
    *src.read_delay.lock().unwrap() = Duration::from_micros(100) * (extra_connections as u32 + 1);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = src.run_guest(Duration::from_micros(200), stop.clone());
    let (listener, path) = unix_listener(&format!("redirty{extra_connections}"));
    let dest = spawn_parallel_destination(listener);
    let (main, extras) = connect_all(&path, extra_connections);
    let extras: Vec<Boxed> = extras.into_iter().map(|s| Box::new(s) as Boxed).collect();
    let opts = SendOptions {
        chunk_pages: 16,
        ..fast_opts(
            Duration::from_millis(200),
            Duration::from_secs(30),
            TimeoutStrategy::Cancel,
        )
    };
    let progress = MigrationProgress::new();
    let info = send_migration_parallel(&*src, Box::new(main) as Boxed, extras, &opts, &progress);
    let info = info.unwrap_or_else(|e| panic!("{e}: {:?}", progress.snapshot().iterations));
    stop.store(true, Ordering::Relaxed);
    guest.join().unwrap();
    let (dr, d) = dest.join().unwrap();
    dr.expect("destination");
    assert_migrated(&src, &d);
    // 1024 pages at 100 us (over all connections) make pass 0 last past the 50 ms
    // interval: the log was read in it, and pages the guest wrote before their turn were
    // left out of it.
    // One collection after each precopy pass (every pass but the final one), more within.
    let precopy_passes = info.iterations.len() as u32 - 1;
    let collects = src.running_collects.load(Ordering::SeqCst);
    assert!(
        collects > precopy_passes,
        "{collects} collections in {precopy_passes} precopy passes"
    );
    let first = info.iterations[0].pages;
    assert!(first < 1024, "pass 0 sent {first} of 1024 pages");
    // The destination was told, once and after pass 0, exactly which pages pass 0 left
    // out: in address order, inside RAM, as many as it did not send.
    let expected = d.expected.lock().unwrap().clone();
    assert_eq!(expected.len(), 1, "{expected:?}");
    let runs = &expected[0];
    assert!(
        runs.windows(2)
            .all(|w| w[0].0 + u64::from(w[0].1) * PAGE < w[1].0),
        "{runs:?}"
    );
    assert!(runs
        .iter()
        .all(|&(g, n)| offset(&d.layout, g, n as usize * PAGE_SIZE).is_ok()));
    let hinted: u64 = runs.iter().map(|r| u64::from(r.1)).sum();
    assert_eq!(hinted, 1024 - first, "{runs:?}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn redirtied_pages_wait_for_the_next_pass_on_one_connection() {
    redirtied_pages_wait_for_the_next_pass(0);
}

#[test]
fn redirtied_pages_wait_for_the_next_pass_on_three_connections() {
    redirtied_pages_wait_for_the_next_pass(2);
}

/// An extra connection finished pass 0 and waits at the pass barrier; the main connection
/// never ends that pass (here it falls silent, as over a cut link; a source that goes on
/// to `Complete` without its `IterationDone` does the same). The main connection's
/// failure must also release the waiting connection: the destination fails within its
/// idle timeout instead of waiting for that thread forever.
#[test]
fn main_connection_failing_mid_pass_releases_the_extra_connections() {
    let (mut src_main, dest_main) = UnixStream::pair().unwrap();
    let (mut src_lane, dest_lane) = UnixStream::pair().unwrap();
    let token = 0x5eed;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut lanes = vec![dest_lane];
        let mut accept = |_: Duration| -> io::Result<UnixStream> {
            lanes.pop().ok_or_else(|| io::ErrorKind::TimedOut.into())
        };
        let mut dest = FakeDestination::default();
        let opts = ReceiveOptions {
            idle_timeout: Duration::from_millis(300),
            ..ReceiveOptions::default()
        };
        let r = receive_migration_from(
            &mut dest,
            dest_main,
            Some(&mut accept),
            &opts,
            &MigrationProgress::new(),
        );
        let _ = done_tx.send((r, dest.resumed));
    });
    let mut main = hello_and_config();
    main.extend(frame(&Message::Channels { count: 1, token }));
    src_main.write_all(&main).unwrap();
    let mut lane = frame(&Message::ChannelHello { index: 1, token });
    lane.extend(frame(&Message::IterationDone {
        iteration: 0,
        pages: 0,
        bytes: 0,
    }));
    src_lane.write_all(&lane).unwrap();
    // Both connections stay open; the main one says nothing more.
    let (r, resumed) = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the destination still waits for its extra connection");
    let e = r.expect_err("main connection fell silent");
    assert!(e.to_string().contains("no data from the peer"), "{e}");
    assert!(!resumed);
    drop((src_main, src_lane));
}

// ---- Postcopy ----

/// Guest RAM on a fake postcopy destination: which pages are present, how often each was
/// placed, and a scripted "guest" that touches some missing pages.
struct FakePostcopyRam {
    layout: Vec<RamRange>,
    bytes: Mutex<Vec<u8>>,
    present: Mutex<Vec<bool>>,
    /// Placements that filled a missing page, per page.
    placed: Mutex<Vec<u32>>,
    /// Every placement, per page, whether or not the page was already there.
    place_calls: Mutex<Vec<u32>>,
    /// Pages in the order they were filled.
    order: Mutex<Vec<usize>>,
    armed: AtomicBool,
    /// Pages the guest touches, in order (reported while missing).
    touches: Mutex<Vec<u64>>,
    /// Gpas reported as faults.
    faulted: Mutex<Vec<u64>>,
    /// Placing this page fails (as a `UFFDIO_COPY` the kernel refuses).
    fail_place_at: Option<u64>,
}

impl FakePostcopyRam {
    fn page(&self, gpa: u64) -> usize {
        offset(&self.layout, gpa, PAGE_SIZE).unwrap() / PAGE_SIZE
    }
}

impl vm_migration::PostcopyRam for FakePostcopyRam {
    fn discard(&self, gpa: u64, pages: u64) -> HookResult<()> {
        assert!(!self.armed.load(Ordering::SeqCst), "discard after arm");
        for i in 0..pages {
            let p = self.page(gpa + i * PAGE);
            self.present.lock().unwrap()[p] = false;
            self.bytes.lock().unwrap()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(0xee);
        }
        Ok(())
    }

    fn arm(&self) -> HookResult<()> {
        self.armed.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn next_fault(&self, timeout: Duration) -> HookResult<Option<u64>> {
        let next = {
            let mut t = self.touches.lock().unwrap();
            let present = self.present.lock().unwrap();
            t.retain(|&g| !present[offset(&self.layout, g, PAGE_SIZE).unwrap() / PAGE_SIZE]);
            t.first().copied()
        };
        match next {
            Some(g) => {
                self.faulted.lock().unwrap().push(g);
                thread::sleep(Duration::from_millis(2));
                Ok(Some(g))
            }
            None => {
                thread::sleep(timeout.min(Duration::from_millis(10)));
                Ok(None)
            }
        }
    }

    fn place(&self, gpa: u64, data: &[u8]) -> HookResult<()> {
        assert!(self.armed.load(Ordering::SeqCst), "placed before arm");
        if let Some(bad) = self.fail_place_at {
            if (gpa..gpa + data.len() as u64).contains(&bad) {
                return Err(format!("test: placing {bad:#x} fails"));
            }
        }
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let p = self.page(gpa + i as u64 * PAGE);
            self.place_calls.lock().unwrap()[p] += 1;
            let mut present = self.present.lock().unwrap();
            // A page already there stays as it is (userfaultfd's EEXIST): a fault
            // reported twice may be answered after the page came.
            if !present[p] {
                self.placed.lock().unwrap()[p] += 1;
                self.order.lock().unwrap().push(p);
                present[p] = true;
                self.bytes.lock().unwrap()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
                    .copy_from_slice(page);
            }
        }
        Ok(())
    }

    fn place_zero(&self, gpa: u64, pages: u64) -> HookResult<()> {
        let zero = vec![0u8; (pages * PAGE) as usize];
        self.place(gpa, &zero)
    }

    fn disarm(&self) -> HookResult<()> {
        self.armed.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// A [`FakeDestination`] that can run before all its RAM is there.
struct PostcopyDestination {
    inner: FakeDestination,
    ram: Option<Arc<FakePostcopyRam>>,
    touches: Vec<u64>,
    /// `pause_postcopy` was called (the vCPUs stopped after postcopy broke off).
    postcopy_paused: bool,
    /// See [`FakePostcopyRam::fail_place_at`].
    fail_place_at: Option<u64>,
}

impl DestinationVm for PostcopyDestination {
    fn check_config(&mut self, vm_config: &[u8], ram: &[RamRange]) -> HookResult<Vec<RamRange>> {
        self.inner.check_config(vm_config, ram)
    }

    fn write_pages(&self, gpa: u64, data: &[u8]) -> HookResult<()> {
        self.inner.write_pages(gpa, data)
    }

    fn zero_pages(&self, gpa: u64, pages: u64) -> HookResult<()> {
        self.inner.zero_pages(gpa, pages)
    }

    fn restore_state(&mut self, vcpus: &[u8], devices: &[u8]) -> HookResult<()> {
        self.inner.restore_state(vcpus, devices)
    }

    fn resume(&mut self) -> HookResult<()> {
        self.inner.resume()
    }

    fn supports_postcopy(&self) -> bool {
        true
    }

    fn pause_postcopy(&mut self) -> HookResult<()> {
        self.postcopy_paused = true;
        Ok(())
    }

    fn postcopy_ram(&mut self) -> HookResult<Arc<dyn vm_migration::PostcopyRam>> {
        let bytes = self.inner.ram.lock().unwrap().clone();
        let pages = bytes.len() / PAGE_SIZE;
        let ram = Arc::new(FakePostcopyRam {
            layout: self.inner.layout.clone(),
            bytes: Mutex::new(bytes),
            present: Mutex::new(vec![true; pages]),
            placed: Mutex::new(vec![0; pages]),
            place_calls: Mutex::new(vec![0; pages]),
            order: Mutex::new(Vec::new()),
            armed: AtomicBool::new(false),
            touches: Mutex::new(self.touches.clone()),
            faulted: Mutex::new(Vec::new()),
            fail_place_at: self.fail_place_at,
        });
        self.ram = Some(ram.clone());
        Ok(ram)
    }
}

/// A guest that never converges (every collection says all RAM is dirty) switches to
/// postcopy after one pass: the destination runs with every page missing, the pages its
/// guest touches are asked for, and in the end its RAM is the source's at the pause, each
/// page placed exactly once; the source never resumes.
#[test]
fn postcopy_moves_a_guest_that_never_converges_with_every_page_placed_once() {
    postcopy_after(1);
}

/// Postcopy from the start: no precopy pass, every page fetched or streamed once.
#[test]
fn postcopy_from_the_start_sends_every_page_once() {
    postcopy_after(0);
}

fn postcopy_after(passes: u32) {
    let src = FakeSource::new(true);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = src.run_guest(Duration::from_micros(200), stop.clone());
    // Once paused, the source reads slowly (1 ms a page): the stream alone would take
    // a second, so the guest's touches must be answered ahead of it.
    *src.on_pause.lock().unwrap() = Some(Box::new({
        let src = src.clone();
        move || *src.read_delay.lock().unwrap() = Duration::from_millis(1)
    }));
    let (a, b) = UnixStream::pair().unwrap();
    let layout = layout();
    // The guest touches pages near the end first: they must come before the stream.
    let touches: Vec<u64> = (0..8)
        .map(|i| gpa_of_page(&layout, 1000 - i * 37))
        .collect();
    let dest = thread::spawn({
        let touches = touches.clone();
        move || {
            let mut d = PostcopyDestination {
                inner: FakeDestination::default(),
                ram: None,
                touches,
                postcopy_paused: false,
                fail_place_at: None,
            };
            let progress = MigrationProgress::new();
            let r = receive_migration(&mut d, b, &receive_opts(), &progress);
            (r, d, progress.snapshot())
        }
    });
    let progress = MigrationProgress::new();
    let opts = SendOptions {
        postcopy_after_passes: Some(passes),
        // Not 1 ms: a pass of the whole 4 MiB in 1 ms (it happened, in a full test run)
        // would fit it, and the source would stop and copy instead.
        ..fast_opts(
            Duration::from_micros(1),
            Duration::from_secs(30),
            TimeoutStrategy::Cancel,
        )
    };
    let info = send_migration(&*src, a, &opts, &progress).expect("migration");
    assert_eq!(info.iterations.len(), passes as usize, "{info:?}");
    stop.store(true, Ordering::Relaxed);
    guest.join().unwrap();
    let (dr, d, dinfo) = dest.join().unwrap();
    dr.expect("destination");
    assert_eq!(info.status, MigrationStatus::Completed);
    assert_eq!(dinfo.status, MigrationStatus::Completed, "{dinfo:?}");
    // The pause until the VM ran on the destination, measured by the source and reported
    // by both, exact and in whole ms rounded up.
    let us = info.downtime_us.expect("downtime-us");
    assert_eq!(info.downtime, Some(us.div_ceil(1000)), "{info:?}");
    assert_eq!(dinfo.downtime_us, Some(us), "{dinfo:?}");
    assert_eq!(src.resumes.load(Ordering::SeqCst), 0);
    assert!(src.is_paused());
    let ram = d.ram.expect("postcopy was used");
    let at_pause = src.at_pause.lock().unwrap().clone().unwrap();
    let bytes = ram.bytes.lock().unwrap();
    let diff = at_pause
        .chunks_exact(PAGE_SIZE)
        .zip(bytes.chunks_exact(PAGE_SIZE))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        diff, 0,
        "{diff} pages differ from the source's at its pause"
    );
    // Every page was missing (all dirty): each placed exactly once.
    let placed = ram.placed.lock().unwrap();
    assert!(placed.iter().all(|&n| n == 1), "placements: {:?}", {
        let mut odd: Vec<_> = placed.iter().enumerate().filter(|(_, &n)| n != 1).collect();
        odd.truncate(10);
        odd
    });
    assert!(
        !ram.faulted.lock().unwrap().is_empty(),
        "the guest touched no missing page"
    );
    assert!(dinfo.ram.postcopy_requests > 0, "{dinfo:?}");
    // Asked-for pages came ahead of the address-ordered stream (which would fill page p
    // about p-th), by more than the chunk the source was reading when asked.
    let order = ram.order.lock().unwrap();
    for g in &touches {
        let p = offset(&layout, *g, PAGE_SIZE).unwrap() / PAGE_SIZE;
        let at = order.iter().position(|&q| q == p).unwrap();
        assert!(
            at + 64 < p,
            "touched page {p} was filled {at}th of {}",
            order.len()
        );
    }
    assert_eq!(d.inner.state.as_ref(), Some(&src.state));
}

/// A hand-made postcopy session: every page but the first two of RAM (0x5a), the state,
/// `PostcopyRun`, then what `tail` adds to the page stream.
fn postcopy_session(tail: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut v = frame(&Message::Hello(Hello {
        version: 1,
        features: vm_migration::protocol::features::POSTCOPY,
        build: "test",
    }));
    v.extend(frame(&Message::Config(Config {
        ram: layout(),
        vm_config: b"{}",
    })));
    let page = vec![0x5au8; PAGE_SIZE];
    for r in layout() {
        for p in 0..r.pages() {
            let gpa = r.gpa + p * PAGE;
            if gpa >= 2 * PAGE {
                encode_memory_chunk(gpa, &page, &mut v).unwrap();
            }
        }
    }
    v.extend(frame(&Message::State {
        vcpus: b"v",
        devices: b"d",
    }));
    v.extend(frame(&Message::PostcopyRun { paused_us: 1 }));
    tail(&mut v);
    v
}

/// Feeds `bytes` to a postcopy-capable fake destination (no listener: a broken postcopy
/// cannot be taken up again, the receive returns).
fn feed_postcopy_destination(
    bytes: Vec<u8>,
    fail_place_at: Option<u64>,
) -> (Result<MigrationInfo, ReceiveError>, PostcopyDestination) {
    feed(bytes, move |b| {
        thread::spawn(move || {
            let mut d = PostcopyDestination {
                inner: FakeDestination::default(),
                ram: None,
                touches: Vec::new(),
                postcopy_paused: false,
                fail_place_at,
            };
            let progress = MigrationProgress::new();
            let r = receive_migration(&mut d, b, &receive_opts(), &progress);
            (r, d)
        })
    })
}

/// During postcopy the VM already runs here: a source that sends a page a second time
/// (it would overwrite what the guest wrote since) or a page outside RAM is refused, the
/// vCPUs are stopped, and the error says which page; no page is placed twice. The same
/// session with the two missing pages sent once each completes (the check that the
/// hand-made session is otherwise valid).
#[test]
fn postcopy_destination_refuses_a_page_twice_or_outside_ram() {
    let page = |b: u8| vec![b; PAGE_SIZE];
    let done = |v: &mut Vec<u8>| {
        v.extend(frame(&Message::PostcopyDone {
            source_info: b"not json",
        }))
    };
    let valid = postcopy_session(|v| {
        encode_memory_chunk(0, &page(1), v).unwrap();
        encode_memory_chunk(PAGE, &page(2), v).unwrap();
        done(v);
    });
    let (r, d) = feed_postcopy_destination(valid.clone(), None);
    r.expect("the valid postcopy session");
    assert!(d.inner.resumed && !d.postcopy_paused);
    let ram = d.ram.expect("postcopy was used");
    assert_eq!(ram.placed.lock().unwrap()[..2], [1, 1]);
    assert_eq!(ram.bytes.lock().unwrap()[PAGE_SIZE], 2);

    let twice = postcopy_session(|v| {
        encode_memory_chunk(0, &page(1), v).unwrap();
        encode_memory_chunk(PAGE, &page(2), v).unwrap();
        encode_memory_chunk(PAGE, &page(3), v).unwrap();
        done(v);
    });
    let outside = postcopy_session(|v| {
        encode_memory_chunk(0, &page(1), v).unwrap();
        encode_memory_chunk(512 << 10, &page(3), v).unwrap();
        done(v);
    });
    for (name, bytes, needle) in [
        ("page twice", twice, "the page at 0x1000 a second time"),
        ("outside RAM", outside, "0x80000"),
    ] {
        let (r, d) = feed_postcopy_destination(bytes, None);
        let e = r.expect_err(name).to_string();
        assert!(e.contains(needle), "{name}: {e}");
        assert!(e.contains("the VM is paused here"), "{name}: {e}");
        assert!(d.inner.resumed, "{name}: the VM ran under postcopy");
        assert!(d.postcopy_paused, "{name}: the vCPUs were not stopped");
        let ram = d.ram.expect("postcopy was used");
        // Refused on arrival: no page was handed to a placer a second time.
        let calls = ram.place_calls.lock().unwrap();
        assert!(calls.iter().all(|&n| n <= 1), "{name}: a page placed twice");
    }

    // A page the destination cannot place: the placer's own error is reported (not the
    // pages it left missing), and the vCPUs are stopped.
    let (r, d) = feed_postcopy_destination(valid, Some(PAGE));
    let e = r.expect_err("a failed placement").to_string();
    assert!(e.contains("test: placing 0x1000 fails"), "{e}");
    assert!(e.contains("the VM is paused here"), "{e}");
    assert!(d.postcopy_paused);
}

/// A source told to switch to postcopy after some passes, by a destination that cannot
/// take it, fails at the handshake, before any pass (a guest that converged first would
/// otherwise make the choice hold on one run and not the next), and its VM keeps running.
#[test]
fn postcopy_against_a_destination_without_it_fails_and_the_source_runs_on() {
    // A guest that converges at once: a refusal left to the switch would never come.
    let src = FakeSource::new(false);
    let (a, b) = UnixStream::pair().unwrap();
    let dest = spawn_destination(b, FakeDestination::default());
    let progress = MigrationProgress::new();
    let opts = SendOptions {
        postcopy_after_passes: Some(1),
        ..fast_opts(
            Duration::from_millis(1),
            Duration::from_secs(30),
            TimeoutStrategy::Cancel,
        )
    };
    let e = send_migration(&*src, a, &opts, &progress)
        .map(|info| info.iterations)
        .expect_err("a destination without postcopy was accepted; passes");
    assert!(matches!(e, SendError::NoPostcopy(_)), "{e}");
    assert!(!src.is_paused());
    let info = progress.snapshot();
    assert!(info.iterations.is_empty(), "{:?}", info.iterations);
    assert_eq!(src.running_collects.load(Ordering::SeqCst), 0);
    let (dr, d) = dest.join().unwrap();
    assert!(dr.is_err());
    assert!(!d.resumed);
}
