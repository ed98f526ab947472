//! Writes the `device_state` seeds into the directory given as the only argument
//! (`fuzz/seeds/device_state` in the repository):
//!
//! ```text
//! cd fuzz && cargo run --example gen_device_state_seeds -- seeds/device_state
//! ```
//!
//! Every state is saved from a device a driver really set up
//! (`devices::virtio::fuzzing::pci_state::seeds`, `devices::viommu::fuzzing::state_seeds`):
//! a virtio-pci function with features negotiated, queues in RAM, MSI-X vectors programmed
//! (or INTx) and a request served, paused as for a migration; a vIOMMU table with
//! domains, attached endpoints, mappings, dirty tracking, pending faults. A seed is the
//! target's input: the model byte, the state's JSON, the rest. Each is checked to restore
//! before it is written.
//!
//! Not a fuzz target: `cargo fuzz build` builds only the `[[bin]]`s.

use std::path::PathBuf;

use devices::virtio::fuzzing::pci_state;

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: gen_device_state_seeds DIR"),
    );
    std::fs::create_dir_all(&dir).expect("seed directory");
    let write = |name: &str, bytes: Vec<u8>| {
        let path = dir.join(name);
        std::fs::write(&path, &bytes).expect("seed file");
        println!("{} ({} bytes)", path.display(), bytes.len());
    };
    for s in pci_state::seeds() {
        let out = pci_state::pci_state(s.kind, &s.state, &s.tail);
        assert!(out.restored, "{}: restores", s.name);
        println!(
            "{}: restored, {} queue(s) running, status {:#x}",
            s.name, out.running, s.state.common.status
        );
        let mut bytes = vec![s.kind];
        bytes.extend(serde_json::to_vec(&s.state).expect("serialises"));
        bytes.extend(&s.tail);
        write(s.name, bytes);
    }
    let viommu = pci_state::KINDS.len() as u8;
    for (name, state, ops) in devices::viommu::fuzzing::state_seeds() {
        let run = devices::viommu::fuzzing::restored_requests(&state, &ops);
        let (run, _) = run.unwrap_or_else(|| panic!("{name}: restores"));
        println!(
            "{name}: restored, {} domain(s), {} mapping(s), {} tracking, {} pending fault(s); then {} ops, {} DMA ok, {} faults",
            state.domains.len(),
            state.domains.iter().map(|d| d.mappings.len()).sum::<usize>(),
            state.domains.iter().filter(|d| d.dirty.is_some()).count(),
            state.pending_faults.len(),
            run.ops,
            run.dma_ok,
            run.dma_faults
        );
        let mut bytes = vec![viommu];
        bytes.extend(serde_json::to_vec(&state).expect("serialises"));
        bytes.extend(&ops);
        write(name, bytes);
    }
}
