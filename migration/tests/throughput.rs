//! Page throughput of one migration stream (not a pass/fail test: run with
//! `cargo test --release -p vm-migration --test throughput -- --ignored --nocapture`).

use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use vm_migration::{
    receive_migration, send_migration, DestinationVm, HookResult, MigrationProgress, RamRange,
    ReceiveOptions, SendOptions, SourceVm, TimeoutStrategy,
};

const RAM: u64 = 1 << 30;

struct Source(Vec<u8>);

impl SourceVm for Source {
    fn config(&self) -> HookResult<Vec<u8>> {
        Ok(b"{}".to_vec())
    }
    fn ram_layout(&self) -> Vec<RamRange> {
        vec![RamRange { gpa: 0, size: RAM }]
    }
    fn read_pages(&self, gpa: u64, buf: &mut [u8]) -> HookResult<()> {
        buf.copy_from_slice(&self.0[gpa as usize..gpa as usize + buf.len()]);
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
        Ok(())
    }
    fn resume(&self) -> HookResult<()> {
        Ok(())
    }
    fn save_state(&self) -> HookResult<(Vec<u8>, Vec<u8>)> {
        Ok((Vec::new(), Vec::new()))
    }
}

struct Destination(std::sync::Mutex<Vec<u8>>);

impl DestinationVm for Destination {
    fn check_config(&mut self, _: &[u8], ram: &[RamRange]) -> HookResult<Vec<RamRange>> {
        let mut mem = self.0.lock().unwrap();
        if mem.is_empty() {
            *mem = vec![0; RAM as usize];
        }
        Ok(ram.to_vec())
    }
    fn write_pages(&self, gpa: u64, data: &[u8]) -> HookResult<()> {
        self.0.lock().unwrap()[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn fill_pages(&self, gpa: u64, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> HookResult<()> {
        fill(&mut self.0.lock().unwrap()[gpa as usize..gpa as usize + len]);
        Ok(())
    }
    fn zero_pages(&self, _: u64, _: u64) -> HookResult<()> {
        Ok(())
    }
    fn restore_state(&mut self, _: &[u8], _: &[u8]) -> HookResult<()> {
        Ok(())
    }
    fn resume(&mut self) -> HookResult<()> {
        Ok(())
    }
}

/// CPU time this thread has run, from the scheduler (`/proc/thread-self/schedstat`).
fn thread_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns = s.split_whitespace().next().and_then(|v| v.parse().ok());
    Duration::from_nanos(ns.unwrap_or(0))
}

/// One migration of 1 GiB of data pages with the destination offering `features`:
/// (time, source thread CPU, destination thread CPU, wire bytes).
fn migrate_once(src: &Source, features: u64) -> (Duration, Duration, Duration, u64) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Touched beforehand: page faults on fresh memory (slow in this nested VM) are not
    // the protocol's cost.
    let mut d = Destination(std::sync::Mutex::new(vec![1; RAM as usize]));
    let dest = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let cpu = thread_cpu();
        let opts = ReceiveOptions {
            features,
            ..ReceiveOptions::default()
        };
        receive_migration(&mut d, s, &opts, &MigrationProgress::new()).unwrap();
        (d.0, thread_cpu() - cpu)
    });
    let opts = SendOptions::new(300, 60, TimeoutStrategy::Cancel);
    let start = Instant::now();
    let cpu = thread_cpu();
    let info = send_migration(
        src,
        TcpStream::connect(addr).unwrap(),
        &opts,
        &MigrationProgress::new(),
    )
    .unwrap();
    let src_cpu = thread_cpu() - cpu;
    let took = start.elapsed();
    let (got, dst_cpu) = dest.join().unwrap();
    assert!(*got.lock().unwrap() == src.0);
    (took, src_cpu, dst_cpu, info.ram.transferred)
}

/// Also the engine's CPU per GiB on each end, with page chunks (this build's default)
/// and with the sparse chunks an older destination takes, alternately.
#[test]
#[ignore = "benchmark"]
fn one_gib_of_data_pages_over_tcp_loopback() {
    use vm_migration::protocol::features;
    let mut ram = vec![0u8; RAM as usize];
    for (i, w) in ram.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(i as u64 | 1).to_le_bytes());
    }
    let src = Source(ram);
    for round in 0..3 {
        for (name, f) in [
            ("page chunks", features::ALL),
            ("sparse chunks", features::ALL & !features::PAGE_CHUNKS),
        ] {
            let (took, src_cpu, dst_cpu, wire) = migrate_once(&src, f);
            let gib = wire as f64 / (1u64 << 30) as f64;
            let gbit = RAM as f64 * 8.0 / took.as_secs_f64() / 1e9;
            println!(
                "{round} {name:>13}: 1 GiB of data pages in {took:?}: {gbit:.1} Gbit/s of page \
                 data, {wire} wire bytes; CPU s/GiB: source {:.3}, destination {:.3}",
                src_cpu.as_secs_f64() / gib,
                dst_cpu.as_secs_f64() / gib
            );
            assert!(took < Duration::from_secs(60));
        }
    }
}

#[test]
#[ignore = "benchmark"]
fn codec_speed() {
    use vm_migration::protocol::{encode_memory_chunk, MessageReader};
    let mut pages = vec![0u8; 1 << 20];
    for (i, w) in pages.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(i as u64 | 1).to_le_bytes());
    }
    let t = Instant::now();
    let mut c = 0u32;
    for _ in 0..1024 {
        c ^= crc32c::crc32c(&pages);
    }
    println!(
        "crc32c (crate): {:.1} GB/s ({c})",
        1.0 / t.elapsed().as_secs_f64() * 1.07
    );
    let t = Instant::now();
    for _ in 0..1024 {
        c ^= vm_migration::crc::crc32c(&pages);
    }
    println!(
        "crc32c (vm_migration::crc): {:.1} GB/s ({c})",
        1.0 / t.elapsed().as_secs_f64() * 1.07
    );
    let mut out = Vec::with_capacity(2 << 20);
    let t = Instant::now();
    for _ in 0..1024 {
        out.clear();
        encode_memory_chunk(0, &pages, &mut out).unwrap();
    }
    println!("encode: {:.1} GB/s", 1.0 / t.elapsed().as_secs_f64() * 1.07);
    let mut stream = Vec::new();
    for _ in 0..256 {
        encode_memory_chunk(0, &pages, &mut stream).unwrap();
    }
    let t = Instant::now();
    for _ in 0..4 {
        let mut r = MessageReader::new(&stream[..]);
        while r.read_message().is_ok() {}
    }
    println!("decode: {:.1} GB/s", 1.0 / t.elapsed().as_secs_f64() * 1.07);
}

#[test]
#[ignore = "benchmark"]
fn raw_tcp_loopback() {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let rx = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break total;
            }
            total += n;
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let buf = vec![1u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..1024 {
        s.write_all(&buf).unwrap();
    }
    drop(s);
    let total = rx.join().unwrap();
    println!(
        "raw tcp: {:.1} Gbit/s",
        total as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9
    );
}
