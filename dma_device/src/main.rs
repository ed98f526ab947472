// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! ferry-dma-device: serves one vfio-user client at a time on `--socket`; jobs run
//! synchronously unless `--async-jobs` (with `--page-delay-us N`, default 20).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use dma_device::device::{JobMode, DEFAULT_PAGE_DELAY};
use dma_device::{listen, Device};
use log::{error, info, warn};

/// Ferry's vfio-user DMA test device.
#[derive(Parser, Debug)]
#[command(name = "ferry-dma-device", version)]
struct Args {
    /// The UNIX socket to listen on (a stale socket there is replaced; anything else is
    /// refused).
    #[arg(long)]
    socket: PathBuf,
    /// Log filter (env_logger syntax: error, warn, info, debug, trace, or per module).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Run jobs asynchronously: the doorbell write returns at once with STATUS BUSY and a
    /// worker thread writes the pages (the guest polls STATUS until it is not BUSY).
    #[arg(long)]
    async_jobs: bool,
    /// With --async-jobs: microseconds between two pages of a job (default 20).
    #[arg(long, requires = "async_jobs", value_name = "N")]
    page_delay_us: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::new()
        .parse_filters(&args.log_level)
        .init();
    let garbage = match listen::garbage_from_env() {
        Ok(g) => g,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(n) = garbage {
        warn!(
            "test seam {}: garbage instead of reply {n}",
            listen::GARBAGE_ENV
        );
    }
    let listener = match listen::bind(&args.socket) {
        Ok(l) => l,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    info!("listening on {}", args.socket.display());
    let mode = if args.async_jobs {
        let page_delay = args
            .page_delay_us
            .map_or(DEFAULT_PAGE_DELAY, Duration::from_micros);
        info!("asynchronous jobs, {page_delay:?} between pages");
        JobMode::Async { page_delay }
    } else {
        JobMode::Sync
    };
    let mut dev = Device::with_mode(mode);
    let e = listen::run(&listener, &mut dev, garbage);
    error!("socket {}: {e}", args.socket.display());
    ExitCode::FAILURE
}
