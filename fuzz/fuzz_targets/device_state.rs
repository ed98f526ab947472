//! A migration's device state as the destination receives it (JSON from the source,
//! untrusted: whoever connects first), restored into real device models and then used.
//! Byte 0 picks the model: a virtio-pci function (virtio-rng, virtio-blk over a temporary
//! disk, virtio-iommu; `VirtioPciState`) or the vIOMMU's table (`ViommuState`); then the
//! state's JSON; the bytes after it are, for a function, guest operations (config space
//! and BAR accesses, notifications, interrupts) and guest RAM, for the table, operations
//! in the `viommu_requests` format (requests, DMA through the endpoints, resets, a
//! migration's tracking). Oracles: no panic anywhere (a bad state is refused, not
//! accepted to fail later); the restored device gives back what it took and its state
//! restores again to itself; its state after use survives JSON and restores into a new
//! device; every page a device wrote is in the dirty log; used rings count right; the
//! vIOMMU's invariants and DMA model hold (see `devices::viommu::fuzzing`).
#![no_main]

use devices::viommu::ViommuState;
use devices::virtio::fuzzing::pci_state;
use devices::virtio::VirtioPciState;
use libfuzzer_sys::fuzz_target;

/// The `$t` at the start of `$data` and the bytes after it (invalid JSON: None).
macro_rules! value {
    ($t:ty, $data:expr) => {{
        let data: &[u8] = $data;
        let mut it = serde_json::Deserializer::from_slice(data).into_iter::<$t>();
        match it.next() {
            Some(Ok(v)) => Some((v, &data[it.byte_offset()..])),
            _ => None,
        }
    }};
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let kinds = pci_state::KINDS.len() as u8;
    if sel % (kinds + 1) < kinds {
        let Some((state, tail)) = value!(VirtioPciState, rest) else {
            return;
        };
        let out = pci_state::pci_state(sel % (kinds + 1), &state, tail);
        let last = out.last.expect("a state at the end");
        let json = serde_json::to_vec(&last).expect("a function's state serialises");
        let back: VirtioPciState = serde_json::from_slice(&json).expect("and reads back");
        assert_eq!(
            serde_json::to_vec(&back).expect("again"),
            json,
            "JSON round trip"
        );
    } else {
        let Some((state, tail)) = value!(ViommuState, rest) else {
            return;
        };
        if let Some((_, end)) = devices::viommu::fuzzing::restored_requests(&state, tail) {
            let json = serde_json::to_vec(&end).expect("a table's state serialises");
            let back: ViommuState = serde_json::from_slice(&json).expect("and reads back");
            assert_eq!(back, end, "JSON round trip");
        }
    }
});
