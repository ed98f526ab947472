//! A ferry on one of two namespace hosts serving its API, and the serial log both hosts
//! append to, for the DMA tests that move a `dma-verify` guest (dma_devices.rs,
//! user_devices.rs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm::api::client::Client;

/// A ferry process on one of the two hosts, serving its API.
pub struct Host {
    ferry: Option<super::Ferry>,
    pub api: Client,
}

impl Host {
    pub fn start(ns: &str, dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Host {
        let (ferry, api) = super::spawn_with_api_env(Some(ns), dir, name, args, env);
        Host {
            ferry: Some(ferry),
            api,
        }
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, String) {
        self.ferry.take().unwrap().wait(timeout)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(f) = self.ferry.take() {
            let (_, out) = f.wait(Duration::ZERO);
            if std::thread::panicking() {
                eprintln!("--- {}\n{out}", self.api.path().display());
            }
        }
    }
}

/// The serial log both hosts append to (the same file: shared storage).
pub struct Serial(pub PathBuf);

impl Serial {
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap_or_default()
    }

    /// The highest pass `cpu` reported with `guest: dma-verified <cpu> <n>` after byte
    /// `from`.
    pub fn dma_pass(&self, cpu: u32, from: usize) -> Option<u64> {
        let prefix = format!("guest: dma-verified {cpu} ");
        self.text()
            .get(from..)?
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
            .max()
    }

    /// Waits until every vCPU reported pass `n` or later after byte `from`.
    pub fn wait_dma_pass(&self, cpus: u32, n: u64, from: usize, timeout: Duration) {
        let end = Instant::now() + timeout;
        loop {
            let t = self.text();
            if t.contains("MISMATCH") || t.contains("FAIL") {
                panic!("the guest failed:\n{t}");
            }
            if (0..cpus).all(|c| self.dma_pass(c, from).is_some_and(|p| p >= n)) {
                return;
            }
            assert!(
                Instant::now() < end,
                "not every vCPU reached dma-verified pass {n} within {timeout:?}:\n{t}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
