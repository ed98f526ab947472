//! Ferry's test guest: a PVH ELF that starts every vCPU and runs a memory workload whose
//! result proves that no dirty page was lost (see test_guest/README.md).
//!
//! Boot path: `boot` (assembly entry, long mode) -> [`bsp_main`]: serial, start info
//! (`pvh`), identity map (`paging`), command line (`guest_pattern::cmdline`), TSC (`timer`),
//! CPUs (`acpi`, `apic`, `smp`) -> `guest: ready ...` -> [`dma-verify`, `dma-bench`: the
//! DMA device (`virtio`, `user_device`, `dma_verify`, `dma_bench`)] -> `workload` on every
//! vCPU.
#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]

#[macro_use]
mod serial;

mod acpi;
mod apic;
mod arch;
mod boot;
mod dma_bench;
mod dma_iommu;
mod dma_verify;
mod irq;
mod mem;
mod paging;
mod pci;
mod power_button;
mod pvh;
mod smp;
mod sys;
mod timer;
mod user_device;
mod virtio;
mod workload;

use core::fmt;
use core::ops::Range;
use core::sync::atomic::Ordering;

use guest_pattern::cmdline::{self, Config, RegionError, Workload};
use guest_pattern::dma::DriverMemory;

use crate::arch::halt_forever;

/// Port of the debug-exit device (QEMU's isa-debug-exit, Ferry's debug-exit).
const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Ends the run: writes `code` (0 = success, 1 = failure) to the debug-exit port. Halts if
/// that returns (no such device).
pub fn exit(code: u8) -> ! {
    workload::STOP.store(true, Ordering::Relaxed);
    if sys::user_mode() {
        sys::call(sys::EXIT, u64::from(code), 0);
    }
    arch::outb(DEBUG_EXIT_PORT, code);
    serial::print_line_forced(format_args!(
        "exit status {code}: no debug-exit device at port {DEBUG_EXIT_PORT:#x}, halting"
    ));
    halt_forever()
}

/// Prints `guest: FAIL <why>` and exits with failure.
pub(crate) fn fail(why: fmt::Arguments) -> ! {
    say!("FAIL {why}");
    exit(1)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    workload::STOP.store(true, Ordering::Relaxed);
    match info.location() {
        Some(l) => serial::print_line_forced(format_args!(
            "FAIL panic at {}:{}: {}",
            l.file(),
            l.line(),
            info.message()
        )),
        None => serial::print_line_forced(format_args!("FAIL panic: {}", info.message())),
    }
    exit(1)
}

/// `guest: bad argument <key>=<value> (<what> <start>-<end>: <why>)` for a refused
/// workload region (`what` = `region`) or driver memory. `unmapped`: the mapped limit,
/// when RAM goes on above it and the region does too.
fn bad_region(
    line: &[u8],
    cfg: &Config,
    e: &RegionError,
    what: &str,
    region: Range<u64>,
    unmapped: Option<u64>,
) -> ! {
    struct Value<'a>(Option<&'a [u8]>, u64);
    impl fmt::Display for Value<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self.0 {
                Some(raw) => cmdline::write_lossy(f, raw),
                None => write!(f, "{:#x} (default)", self.1),
            }
        }
    }
    let value = Value(cmdline::raw_value(line, e.key), cfg.region_value(e.key));
    struct Unmapped(Option<u64>);
    impl fmt::Display for Unmapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self.0 {
                Some(limit) => write!(f, "; RAM above {limit:#x} is not mapped"),
                None => Ok(()),
            }
        }
    }
    say!(
        "bad argument {}={value} ({what} {:#x}-{:#x}: {e}{})",
        e.key,
        region.start,
        region.end,
        Unmapped(unmapped)
    );
    exit(1)
}

/// The boot vCPU, in long mode on its stack; `start_info` is what the VMM put in `ebx`.
pub extern "C" fn bsp_main(start_info: u32) -> ! {
    serial::init();
    boot::load_idt();
    let info = pvh::parse(start_info).unwrap_or_else(|e| fail(format_args!("{e}")));
    let ram_top = info.ram_top();
    let (high_map, limit) = paging::map_ram(ram_top);

    let line = pvh::cmdline(info.cmdline_paddr);
    let cfg = cmdline::parse(line).unwrap_or_else(|bad| {
        say!("{bad}");
        exit(1)
    });
    let mut ram: [Range<u64>; pvh::MAX_RAM_RANGES] = core::array::from_fn(|_| 0..0);
    for (r, i) in ram.iter_mut().zip(info.ram()) {
        *r = i.start.min(limit)..i.end.min(limit);
    }
    let image = boot::image_range();
    let ram = &ram[..info.ram_count];
    let unmapped = |end: u64| (limit < ram_top && end > limit).then_some(limit);
    let region = cfg.start..cfg.start.saturating_add(cfg.size);
    if let Err(e) = cmdline::check_region(cfg.start, cfg.size, ram, core::slice::from_ref(&image)) {
        bad_region(
            line,
            &cfg,
            &e,
            "region",
            region.clone(),
            unmapped(region.end),
        );
    }
    if let Err(e) = cmdline::check_verify_region(&cfg, ram, core::slice::from_ref(&image)) {
        let v = cfg.verify_region().unwrap_or(0..0);
        bad_region(line, &cfg, &e, "region", v.clone(), unmapped(v.end));
    }

    let tsc = timer::calibrate();
    let (apic_base, x2apic) = apic::init();
    let bsp_id = apic::id();
    let madt = acpi::find_cpus(info.rsdp_paddr);
    let started = match &madt {
        Ok(m) => smp::start_aps(m.ids(), bsp_id),
        Err(_) => smp::start_aps(&[], bsp_id),
    };
    // dma-verify, dma-bench: the driver's memory follows the regions (it depends on the
    // vCPU count).
    let dma_workload = matches!(cfg.workload, Workload::DmaVerify | Workload::DmaBench);
    let driver_memory = dma_workload.then(|| {
        let mem = DriverMemory::for_config(&cfg, started.cpus);
        let r = mem.range();
        if let Err(mut e) =
            cmdline::check_region(r.start, r.end - r.start, ram, core::slice::from_ref(&image))
        {
            // Blame the region it follows.
            e.key = match cfg.verify_region() {
                Some(v) if v.end > region.end => "vsize",
                _ => "size",
            };
            bad_region(
                line,
                &cfg,
                &e,
                "driver memory after the workload regions,",
                r.clone(),
                unmapped(r.end),
            );
        }
        mem
    });
    workload::publish(&cfg, started.cpus);

    struct Count(Option<u64>, &'static str);
    impl fmt::Display for Count {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self.0 {
                Some(n) => write!(f, "{n}"),
                None => f.write_str(self.1),
            }
        }
    }
    struct DmaKeys<'a>(&'a Config);
    impl fmt::Display for DmaKeys<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            if let Some(d) = self.0.dma {
                write!(f, " dma={}", d.name())?;
            }
            if let Some(v) = self.0.verify_region() {
                write!(f, " vstart={:#x} vsize={:#x}", v.start, v.end - v.start)?;
            }
            if self.0.workload == Workload::DmaBench {
                write!(f, " bs={}", self.0.bench_bs())?;
                if let Some(s) = self.0.bench_secs() {
                    write!(f, " secs={s}")?;
                }
            }
            if self.0.irq != cmdline::Irq::Off {
                write!(f, " irq={}", self.0.irq.name())?;
            }
            if self.0.iommu {
                write!(f, " iommu=on")?;
                for (on, key) in [
                    (self.0.remap, "remap"),
                    (self.0.detach, "detach"),
                    (self.0.nested_dirty, "nested-dirty"),
                    (self.0.fault, "fault"),
                ] {
                    if on {
                        write!(f, " {key}=on")?;
                    }
                }
            }
            Ok(())
        }
    }
    say!(
        "ready cpus={} workload={} start={:#x} size={:#x} passes={} rate={}{}",
        started.cpus,
        cfg.workload.name(),
        cfg.start,
        cfg.size,
        Count(cfg.passes, "forever"),
        Count(cfg.rate, "max"),
        DmaKeys(&cfg),
    );
    say!(
        "info tsc_khz={} ({}) ram_top={ram_top:#x} high_ram={} image={:#x}-{:#x} apic={apic_base:#x}{}",
        timer::hz() / 1000,
        tsc.name(),
        match high_map {
            paging::HighMap::None => "none",
            paging::HighMap::Gib1 => "1G-pages",
            paging::HighMap::Mib2 => "2M-pages",
        },
        image.start,
        image.end,
        if x2apic { " x2apic" } else { "" },
    );
    if let Err(e) = &madt {
        say!("note: {e}: running on the boot CPU only");
    }
    if started.failed_count > 0 {
        let f = &started.failed[..started.failed_count.min(started.failed.len())];
        say!(
            "note: {} CPU(s) did not start, APIC ids {:?}",
            started.failed_count,
            f
        );
    }
    if started.skipped > 0 {
        say!(
            "note: {} CPU(s) not started (more than {} or unreachable APIC id)",
            started.skipped,
            boot::MAX_CPUS
        );
    }
    if let Ok(m) = &madt {
        if m.dropped > 0 {
            say!(
                "note: {} CPU(s) beyond the first {} of the MADT ignored",
                m.dropped,
                acpi::MAX_MADT_CPUS
            );
        }
    }
    if limit < ram_top {
        say!("note: RAM above {limit:#x} is not mapped and cannot hold the region");
    }
    if info.ram_dropped > 0 {
        say!("note: {} memory map entries ignored", info.ram_dropped);
    }
    if cfg.pci_scan {
        pci::scan(info.rsdp_paddr);
    }
    if let Some(mem) = &driver_memory {
        if cfg.irq != cmdline::Irq::Off {
            irq::setup(cfg.irq, madt.as_ref().ok().and_then(|m| m.ioapic));
        }
        if cfg.workload == Workload::DmaBench {
            dma_bench::setup(&cfg, mem);
        } else {
            dma_verify::setup(&cfg, mem);
        }
    }
    if cfg.power_button {
        // `irq=` set the interrupt machinery up already; otherwise it is set up here.
        if driver_memory.is_none() || cfg.irq == cmdline::Irq::Off {
            irq::setup(
                cmdline::Irq::Off,
                madt.as_ref().ok().and_then(|m| m.ioapic),
            );
        }
        if let Err(e) = power_button::setup(info.rsdp_paddr, bsp_id) {
            fail(format_args!("power-button=on: {e}"));
        }
    }
    smp::GO.store(true, Ordering::Release);
    boot::enter_user(0, workload::run)
}
