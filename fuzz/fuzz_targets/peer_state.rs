//! What a migration's source sends the destination (untrusted: whoever connects first):
//! the VM's configuration as JSON, which the destination validates before building
//! anything, and the machine state (JSON or binary) it turns into KVM registers and
//! device state. Any
//! bytes must give a value or an error, never a panic; a configuration that validates
//! must validate again after a round trip through JSON (nothing reinterpreted).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::config::VmConfig;
use vmm::vm::MachineState;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut cfg) = serde_json::from_slice::<VmConfig>(data) {
        if cfg.validate().is_ok() {
            let again = serde_json::to_vec(&cfg).expect("a config serialises");
            let mut back: VmConfig = serde_json::from_slice(&again).expect("and reads back");
            assert!(back.validate().is_ok());
        }
    }
    let _ = MachineState::decode(data);
    let _ = MachineState::decode(&[&vmm::vm::BINARY_STATE_MAGIC[..], data].concat());
});
