//! A running test guest moved from one machine to another inside one process: pause and
//! save the state, copy RAM, restore into a freshly built machine, and the guest's own
//! verifier must go on without a mismatch.

mod common;

use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::config::{parse_serial, VmConfig};
use vmm::vm::Machine;

use common::wait_serial;

#[test]
fn saved_state_and_ram_continue_in_a_new_machine() {
    let serial = std::env::temp_dir().join(format!("ferry-state-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&serial);
    let mut config = VmConfig::default();
    config.cpus = vmm::config::parse_cpus("boot=2").unwrap();
    config.memory.size = 256 << 20;
    config.payload.kernel = Some(common::guest_elf());
    config.payload.cmdline = Some("workload=verify start=1M size=8M passes=400".into());
    config.serial = parse_serial(&format!("file={}", serial.display())).unwrap();

    let a = Machine::boot(config.clone()).unwrap();
    let pos = wait_serial(&serial, "guest: verified 1 1", 0, Duration::from_secs(120));
    let state = a.save_state().unwrap();
    assert_eq!(state.vcpus.len(), 2);
    // Plain data across the wire, in both encodings: each reads back to the same state.
    use vmm::vm::{MachineState, StateEncoding};
    let json = state.encode(StateEncoding::Json).unwrap();
    let binary = state.encode(StateEncoding::Binary).unwrap();
    assert!(
        binary.len() * 2 < json.len(),
        "the binary state ({} bytes) is not half the JSON one ({})",
        binary.len(),
        json.len()
    );
    let from_binary = MachineState::decode(&binary).unwrap();
    let e = MachineState::decode(&[&binary[..], &[0xc0]].concat()).expect_err("trailing bytes");
    assert!(e.contains("1 bytes after the state"), "{e}");
    assert_eq!(from_binary.encode(StateEncoding::Json).unwrap(), json);
    let state = MachineState::decode(&json).unwrap();
    assert_eq!(state.encode(StateEncoding::Binary).unwrap(), binary);
    let state = from_binary;

    let b = Machine::incoming(config).unwrap();
    for r in a.memory().iter() {
        // SAFETY: A is paused; the region is a live mapping of r.len() bytes.
        let data = unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) };
        b.memory()
            .write_slice(data, GuestAddress(r.start_addr().0))
            .unwrap();
    }
    drop(a);
    // The destination's rehearsals of the load (its own fresh state, loaded after each
    // pass) leave nothing behind once the real state is loaded.
    let fresh = b.fresh_state().unwrap();
    for _ in 0..2 {
        b.rehearse_load(&fresh).unwrap();
    }
    let b = b.start(state, false).unwrap();
    // New passes happen on B, and the guest's verifier finds every page as it left it.
    let end = wait_serial(&serial, "guest: PASS", pos, Duration::from_secs(300));
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(!text.contains("MISMATCH"), "{text}");
    assert!(text[pos..end].contains("guest: verified"), "{text}");
    drop(b);
    let _ = std::fs::remove_file(&serial);
}
