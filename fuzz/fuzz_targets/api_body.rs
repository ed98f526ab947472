//! The JSON bodies the API accepts (vm.create, vm.send-migration, vm.receive-migration,
//! vm.coredump) on arbitrary bytes: never a panic; what is accepted is within the
//! documented ranges.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::migration::{self, MemoryMode, MigrationUrl, MAX_CONNECTIONS};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = vmm::api::parse_vm_config(data) {
        assert!(c.payload.kernel.is_some());
        assert!(c.cpus.boot_vcpus >= 1 && c.cpus.max_vcpus >= c.cpus.boot_vcpus);
        // What was accepted reads back the same.
        let json = serde_json::to_vec(&c).unwrap();
        assert_eq!(vmm::api::parse_vm_config(&json).unwrap(), c);
    }
    if let Ok(s) = migration::parse_send_migration(data) {
        assert!((1..=MAX_CONNECTIONS).contains(&s.connections));
        assert!(s.downtime_ms >= 1 && s.timeout_s >= 1);
        if s.memory_mode == MemoryMode::MemFDs {
            assert!(matches!(s.destination, MigrationUrl::Unix(_)));
        }
        if s.connections > 1 {
            assert!(matches!(s.destination, MigrationUrl::Tcp { .. }));
        }
    }
    if let Ok(r) = migration::parse_receive_migration(data) {
        assert_eq!(r.receiver_url.parse::<MigrationUrl>().unwrap(), r.receiver);
    }
    if let Ok(path) = vmm::api::parse_coredump(data) {
        assert!(path.is_absolute() && path.file_name().is_some(), "{path:?}");
    }
});
