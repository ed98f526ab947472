// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! vfio-user: a PCI device in another process, reached over a UNIX socket, that does DMA
//! into guest RAM shared with it by file descriptor. Ferry sees none of those writes, so
//! the device logs them itself and reports them on request (DMA logging through
//! DEVICE_FEATURE), and its state moves with MIG_DATA_READ/WRITE.
//!
//! - [`wire`]: the messages as bytes, both directions, every length checked.
//! - [`conn`]: one message on the socket, with the descriptors passed alongside.
//! - [`client`]: Ferry's side: one request at a time, each answer checked, bounded in time.
//! - [`server`]: the device's side: a loop over a [`server::UserDevice`].
//! - [`log`]: the device's DMA log as a [`crate::DirtyBackend`], so the same
//!   [`crate::DmaTracker`] rules apply as to hardware.

pub mod client;
pub mod conn;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod log;
pub mod server;
pub mod wire;
