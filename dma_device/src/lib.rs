// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! ferry-dma-device: Ferry's in-tree vfio-user device server, a DMA engine for tests.
//!
//! The guest programs a job in BAR 0 (the contract is
//! [`guest_pattern::user_device`]) and rings the doorbell; the device writes
//! [`guest_pattern::fill_page`] into every page of the job, straight into the client's
//! memory (mapped from the files passed with DMA_MAP), and marks them in its DMA log:
//! before the write returns ([`device::JobMode::Sync`], the default), or page by page in
//! a worker thread while STATUS reads BUSY ([`device::JobMode::Async`], `--async-jobs`).
//! A job in flight ends before the device leaves RUNNING, unmaps or resets. Its registers
//! migrate (STOP_COPY / RESUMING, [`state`]).
//!
//! - [`device`]: the [`vfio_dirty::vfio_user::server::UserDevice`], and the job worker.
//! - [`dma`]: mappings, the one function that writes client memory, the DMA log.
//! - [`config`]: PCI configuration space.
//! - [`state`]: the migrated state blob.
//! - [`listen`]: the socket and the serve loop (with the test-only garbage seam).
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod config;
pub mod device;
pub mod dma;
pub mod listen;
pub mod state;

pub use device::Device;
