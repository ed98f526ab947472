// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! What needs real device nodes skips, in one line, where they are missing.

use std::path::Path;

fn missing(nodes: &[&str]) -> Option<String> {
    let gone: Vec<&str> = nodes
        .iter()
        .copied()
        .filter(|n| !Path::new(n).exists())
        .collect();
    (!gone.is_empty()).then(|| gone.join(", "))
}

/// The iommufd device node opens read-write. (The ioctl backends are not written yet.)
#[test]
fn iommufd_node_opens() {
    if let Some(m) = missing(&["/dev/iommu"]) {
        eprintln!("skipped: {m} missing (no iommufd on this host)");
        return;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/iommu")
        .expect("open /dev/iommu");
}

/// The VFIO container node opens read-write.
#[test]
fn vfio_container_opens() {
    if let Some(m) = missing(&["/dev/vfio/vfio"]) {
        eprintln!("skipped: {m} missing (no VFIO on this host)");
        return;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vfio/vfio")
        .expect("open /dev/vfio/vfio");
}
