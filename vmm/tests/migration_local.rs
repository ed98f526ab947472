//! Live migration inside one process, machine to machine over real sockets: the engine,
//! the VMM glue and the dirty tracking together, checked by the guest's own verifier.

mod common;

use std::sync::Arc;
use std::time::Duration;

use vm_migration::{
    receive_migration, send_migration, MigrationProgress, ReceiveOptions, SendOptions,
    TimeoutStrategy,
};
use vmm::config::{parse_cpus, parse_dirty_ring, parse_serial, VmConfig};
use vmm::migration::transport::{Listener, MigrationUrl, Stream};
use vmm::migration::{MachineDestination, MachineSource};
use vmm::vm::Machine;

use common::wait_serial;

/// One migration of `a` to a machine built in this process, over `url`; the migration's
/// figures and the machine now running the guest.
fn hop(a: &Arc<Machine>, url: &str) -> (vm_migration::MigrationInfo, Machine) {
    let url: MigrationUrl = url.parse().unwrap();
    let listener = Listener::bind(&url).unwrap();
    let url = match (&url, listener.port()) {
        (MigrationUrl::Tcp { host, .. }, Some(port)) => MigrationUrl::Tcp {
            host: host.clone(),
            port,
        },
        _ => url,
    };
    let receiver = std::thread::spawn(move || {
        let stream = listener.accept().unwrap();
        let mut dest = MachineDestination::default();
        let info = receive_migration(
            &mut dest,
            stream,
            &ReceiveOptions::default(),
            &MigrationProgress::new(),
        );
        (info, dest.take_started().ok())
    });
    let stream = Stream::connect(&url, Duration::from_secs(5)).unwrap();
    let opts = SendOptions::new(300, 120, TimeoutStrategy::Ignore);
    let info = send_migration(
        &MachineSource::new(a.clone()),
        stream,
        &opts,
        &MigrationProgress::new(),
    )
    .expect("the migration completes");
    let (dinfo, b) = receiver.join().unwrap();
    dinfo.expect("the destination received the VM");
    (info, b.expect("the destination runs the VM"))
}

fn migrate(workload: &str, ring: &str, url: &str, tag: &str) {
    let serial = std::env::temp_dir().join(format!("ferry-mig-{tag}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&serial);
    let mut c = VmConfig {
        cpus: parse_cpus("boot=2").unwrap(),
        ..Default::default()
    };
    c.memory.size = 512 << 20;
    c.payload.kernel = Some(common::guest_elf());
    c.payload.cmdline = Some(workload.into());
    c.serial = parse_serial(&format!("file={}", serial.display())).unwrap();
    c.dirty_tracking = parse_dirty_ring(ring).unwrap();
    let a = Arc::new(Machine::boot(c).unwrap());
    let pos = wait_serial(&serial, "guest: verified 1 1", 0, Duration::from_secs(60));

    let (info, b) = hop(&a, url);
    drop(a);
    eprintln!("{tag}: {}", serde_json::to_string(&info).unwrap());
    // The guest goes on on B and its verifier finds every page as it left it.
    let after = wait_serial(&serial, "guest: verified", pos, Duration::from_secs(60));
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(!text.contains("MISMATCH"), "{text}");
    wait_serial(&serial, "guest: verified", after, Duration::from_secs(60));
    drop(b);
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(
        !text.contains("MISMATCH") && !text.contains("FAIL"),
        "{text}"
    );
    let _ = std::fs::remove_file(&serial);
}

#[test]
fn verify_guest_migrates_over_tcp_with_rings() {
    migrate(
        "workload=verify start=1M size=256M",
        "entries=65536",
        "tcp:127.0.0.1:0",
        "ring",
    );
}

#[test]
fn verify_guest_migrates_over_unix_with_the_bitmap() {
    let path = std::env::temp_dir().join(format!("ferry-mig-{}.sock", std::process::id()));
    migrate(
        "workload=verify start=1M size=256M",
        "off",
        &format!("unix:{}", path.display()),
        "bitmap",
    );
}

/// A→B→A… twenty times under `verify`: every hop must carry every page.
#[test]
fn ping_pong_twenty_times_loses_nothing() {
    let serial = std::env::temp_dir().join(format!("ferry-pingpong-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&serial);
    let mut c = VmConfig {
        cpus: parse_cpus("boot=2").unwrap(),
        ..Default::default()
    };
    c.memory.size = 256 << 20;
    c.payload.kernel = Some(common::guest_elf());
    c.payload.cmdline = Some("workload=verify start=1M size=64M".into());
    c.serial = parse_serial(&format!("file={}", serial.display())).unwrap();
    let mut m = Arc::new(Machine::boot(c).unwrap());
    let mut pos = wait_serial(&serial, "guest: verified 1 1", 0, Duration::from_secs(60));
    for i in 0..20 {
        let (info, next) = hop(&m, "tcp:127.0.0.1:0");
        assert_eq!(
            info.status,
            vm_migration::MigrationStatus::Completed,
            "hop {i}"
        );
        drop(m);
        m = Arc::new(next);
        // The guest made progress on this side before the next hop.
        pos = wait_serial(&serial, "guest: verified", pos, Duration::from_secs(30));
        let text = std::fs::read_to_string(&serial).unwrap();
        assert!(!text.contains("MISMATCH"), "after hop {i}:\n{text}");
    }
    drop(m);
    let _ = std::fs::remove_file(&serial);
}
