//! Starting the application processors: INIT, STARTUP, STARTUP to each, one at a time.
//!
//! Before waking an AP the boot CPU puts the AP's CPU index in `boot::AP_TICKET`; the
//! AP's entry code swaps it for 0 and runs on that index's stack, then [`ap_main`] reports
//! in through [`ALIVE`]. If an AP has not claimed its ticket within a second, the boot CPU
//! takes the ticket back and moves on, so a late AP finds 0 and halts.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::boot::{AP_TICKET, MAX_CPUS, TRAMPOLINE_ADDR};
use crate::{apic, boot, timer, workload};

/// CPU index of the last AP that reported in.
static ALIVE: AtomicU32 = AtomicU32::new(0);
/// Set by the boot CPU once the plan is published: APs start their workload.
pub static GO: AtomicBool = AtomicBool::new(false);

const IPI_INIT: u32 = 0x4500;
const IPI_STARTUP: u32 = 0x4600;

/// What happened to the CPUs of the MADT.
pub struct Started {
    /// CPUs running, the boot CPU included.
    pub cpus: u32,
    /// APIC IDs that never came up (the first few).
    pub failed: [u32; 4],
    pub failed_count: usize,
    /// CPUs not started: beyond `MAX_CPUS`, or x2APIC IDs an xAPIC cannot address.
    pub skipped: usize,
}

/// Starts every AP in `apic_ids` (the boot CPU's own ID is skipped).
pub fn start_aps(apic_ids: &[u32], bsp_id: u32) -> Started {
    let mut s = Started {
        cpus: 1,
        failed: [0; 4],
        failed_count: 0,
        skipped: 0,
    };
    let vector = (TRAMPOLINE_ADDR >> 12) as u32;
    for &id in apic_ids.iter().filter(|&&id| id != bsp_id) {
        if s.cpus as usize == MAX_CPUS || !apic::reachable(id) {
            s.skipped += 1;
            continue;
        }
        let index = s.cpus;
        ALIVE.store(0, Ordering::Relaxed);
        AP_TICKET.store(index, Ordering::SeqCst);
        apic::send_ipi(id, IPI_INIT);
        timer::delay_us(10_000);
        apic::send_ipi(id, IPI_STARTUP | vector);
        timer::delay_us(200);
        if AP_TICKET.load(Ordering::SeqCst) == index {
            apic::send_ipi(id, IPI_STARTUP | vector);
        }
        let deadline = timer::now() + timer::hz();
        let mut up = wait_alive(index, deadline);
        if !up && AP_TICKET.swap(0, Ordering::SeqCst) == 0 {
            // It took the ticket just now: it is on its way.
            up = wait_alive(index, u64::MAX);
        }
        if up {
            s.cpus += 1;
        } else {
            if s.failed_count < s.failed.len() {
                s.failed[s.failed_count] = id;
            }
            s.failed_count += 1;
        }
    }
    s
}

fn wait_alive(index: u32, deadline: u64) -> bool {
    while ALIVE.load(Ordering::Acquire) != index {
        if timer::now() > deadline {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Where an AP arrives in long mode, on its own stack, as CPU `cpu`.
pub extern "C" fn ap_main(cpu: u32) -> ! {
    boot::load_idt();
    ALIVE.store(cpu, Ordering::Release);
    while !GO.load(Ordering::Acquire) {
        if workload::STOP.load(Ordering::Relaxed) {
            crate::arch::halt_forever();
        }
        core::hint::spin_loop();
    }
    // The boot CPU may have changed the page tables since this CPU started (BARs made
    // uncached for dma-verify): drop stale translations.
    crate::arch::flush_tlb();
    boot::enter_user(cpu, workload::run)
}
