//! Auto-converge: holding a VM's vCPUs back for a share of their time, so that a guest
//! that dirties memory faster than the link carries it lets a migration converge.
//!
//! Every [`PERIOD`] a timer thread has each vCPU sleep `percent`% of it outside KVM_RUN
//! (kicked out, it naps once, then runs on). A vCPU stays independent of the others: no
//! global pause, so a throttled guest keeps its timing roughly even.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::vcpu::VcpuControl;

/// One throttle cycle: each vCPU naps `percent`% of it.
pub const PERIOD: Duration = Duration::from_millis(20);
/// The most a vCPU may be held back.
pub const MAX_PERCENT: u8 = 99;

/// The throttle of one machine; its timer thread starts with the first non-zero setting
/// and ends with the machine.
pub struct VcpuThrottle {
    control: Arc<VcpuControl>,
    percent: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl VcpuThrottle {
    pub fn new(control: Arc<VcpuControl>) -> Self {
        VcpuThrottle {
            control,
            percent: Arc::new(AtomicU8::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            thread: Mutex::new(None),
        }
    }

    /// Holds every vCPU back for `percent`% of its time (capped at [`MAX_PERCENT`]);
    /// 0 lets them run freely.
    pub fn set(&self, percent: u8) -> std::io::Result<()> {
        let percent = percent.min(MAX_PERCENT);
        self.percent.store(percent, Ordering::SeqCst);
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if percent > 0 && thread.is_none() {
            let (control, pct, stop) = (
                self.control.clone(),
                self.percent.clone(),
                self.stop.clone(),
            );
            *thread = Some(std::thread::Builder::new().name("throttle".into()).spawn(
                move || {
                    ferry_seccomp::install_or_exit(ferry_seccomp::ThreadKind::Throttle);
                    run(&control, &pct, &stop)
                },
            )?);
        }
        Ok(())
    }

    pub fn percent(&self) -> u8 {
        self.percent.load(Ordering::SeqCst)
    }
}

fn run(control: &VcpuControl, percent: &AtomicU8, stop: &AtomicBool) {
    let mut on = false;
    while !stop.load(Ordering::SeqCst) {
        let p = percent.load(Ordering::SeqCst);
        if p == 0 {
            if on {
                control.throttle_off();
                on = false;
            }
        } else {
            control.throttle_tick(PERIOD * u32::from(p) / 100);
            on = true;
        }
        std::thread::sleep(PERIOD);
    }
    if on {
        control.throttle_off();
    }
}

impl Drop for VcpuThrottle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}
