//! What the virtio-iommu costs on the host: MAP and UNMAP requests per second as the
//! request queue serves them (`requests::serve`, the table's write lock included), and a
//! device's 4 KiB DMA write through a domain against the same write with no vIOMMU.
//! Run: `cargo bench -p devices --bench viommu_requests` (part of
//! `scripts/dev_cli.sh bench viommu`). Prints a table; nothing is asserted.

use std::sync::Arc;

use devices::guest_ram::{GuestMemoryMmap, GuestRam};
use devices::viommu::{
    serve, IommuEndpoint, IommuTable, F_DIRTY_TRACKING, MAP_F_READ, MAP_F_WRITE, T_ATTACH, T_MAP,
    T_UNMAP,
};
use vm_memory::GuestAddress;

const DOMAIN: u32 = 1;
const ENDPOINT: u32 = 8;
const IOVA: u64 = 1 << 40;

fn req(kind: u8, words: &[(usize, &[u8])], len: usize) -> Vec<u8> {
    let mut r = vec![0u8; len];
    r[0] = kind;
    for (at, b) in words {
        r[*at..*at + b.len()].copy_from_slice(b);
    }
    r
}

fn map(i: u64) -> Vec<u8> {
    let flags = MAP_F_READ | MAP_F_WRITE;
    req(
        T_MAP,
        &[
            (4, &DOMAIN.to_le_bytes()),
            (8, &(IOVA + i * 4096).to_le_bytes()),
            (16, &(IOVA + i * 4096 + 4095).to_le_bytes()),
            (24, &((i % 4096) * 4096).to_le_bytes()),
            (32, &flags.to_le_bytes()),
        ],
        36,
    )
}

fn unmap(i: u64) -> Vec<u8> {
    req(
        T_UNMAP,
        &[
            (4, &DOMAIN.to_le_bytes()),
            (8, &(IOVA + i * 4096).to_le_bytes()),
            (16, &(IOVA + i * 4096 + 4095).to_le_bytes()),
        ],
        28,
    )
}

#[path = "support/timing.rs"]
mod timing;
use timing::ns_per;

fn main() {
    let features = 1u64 << F_DIRTY_TRACKING;
    let table = Arc::new(IommuTable::new());
    table.add_endpoint(ENDPOINT, true);
    let attach = req(
        T_ATTACH,
        &[(4, &DOMAIN.to_le_bytes()), (8, &ENDPOINT.to_le_bytes())],
        20,
    );
    assert_eq!(serve(&table, &attach, 4, features).unwrap().status, 0);
    // MAP then UNMAP of one page, over a domain that keeps 10000 other mappings.
    for i in 0..10_000 {
        serve(&table, &map(1_000_000 + i), 4, features);
    }
    let (maps, unmaps): (Vec<_>, Vec<_>) = (0..100_000u64).map(|i| (map(i), unmap(i))).unzip();
    let pair = ns_per(100_000, |i| {
        let i = i as usize;
        assert_eq!(serve(&table, &maps[i], 4, features).unwrap().status, 0);
        assert_eq!(serve(&table, &unmaps[i], 4, features).unwrap().status, 0);
    });

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let direct = GuestRam::new(mem);
    let behind = direct.with_own_log().behind_iommu(IommuEndpoint {
        id: ENDPOINT,
        table: table.clone(),
    });
    for i in 0..4096 {
        serve(&table, &map(i), 4, features);
    }
    let page = [0x5au8; 4096];
    let plain = ns_per(200_000, |i| direct.write((i % 4096) * 4096, &page).unwrap());
    let translated = ns_per(200_000, |i| {
        behind.write(IOVA + (i % 4096) * 4096, &page).unwrap()
    });

    println!("| what | ns | per second |");
    println!("|---|---|---|");
    println!(
        "| MAP + UNMAP of a page (domain of 10000 mappings) | {pair:.0} | {:.0} pairs |",
        1e9 / pair
    );
    println!(
        "| 4 KiB device write, no vIOMMU | {plain:.0} | {:.0} MiB/s |",
        4096.0 * 1e9 / plain / 1048576.0
    );
    println!(
        "| 4 KiB device write through a domain of 14096 mappings | {translated:.0} | {:.0} MiB/s |",
        4096.0 * 1e9 / translated / 1048576.0
    );
    println!(
        "| translation's cost per write | {:.0} | |",
        translated - plain
    );
}
