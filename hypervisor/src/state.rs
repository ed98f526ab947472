//! vCPU and VM state as plain data, saved while the vCPUs are parked and restored into a
//! freshly built VM before its vCPUs first run (migration's stop-and-copy).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::{HypervisorError, Result};

/// Everything KVM keeps for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u32,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: Box<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub lapic: kvm_lapic_state,
    /// Includes the TSC (MSR 0x10), so guest time goes on where it stopped.
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
    pub mp_state: kvm_mp_state,
}

/// VM-wide KVM state: the in-kernel irqchip, the PIT and the kvmclock base.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The MSRs saved with every vCPU: those KVM lists as saveable that it can also read
/// back on this host (some listed ones fail on some CPUs).
pub(crate) fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(HypervisorError::ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    let mut ok = Vec::new();
    for &index in list.as_slice() {
        let probe = [kvm_msr_entry {
            index,
            ..Default::default()
        }];
        let mut msrs = Msrs::from_entries(&probe).expect("one entry fits");
        if matches!(vcpu.get_msrs(&mut msrs), Ok(1)) {
            ok.push(index);
        }
    }
    Ok(ok)
}

/// `(regs, sregs)`: the general and special registers, read by the caller (`Vcpu::regs`:
/// where KVM copied them out at the exit, or by ioctl); the rest is read here.
pub(crate) fn save_vcpu(
    fd: &VcpuFd,
    index: u32,
    msr_indices: &[u32],
    (regs, sregs): (kvm_regs, kvm_sregs),
) -> Result<VcpuState> {
    let e = HypervisorError::ioctl;
    let xsave = Box::new(fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?);
    let entries: Vec<kvm_msr_entry> = msr_indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| HypervisorError::Ioctl {
        what: "KVM_GET_MSRS (too many MSRs)",
        source: vmm_sys_util::errno::Error::new(libc::E2BIG),
    })?;
    let n = fd.get_msrs(&mut msrs).map_err(e("KVM_GET_MSRS"))?;
    if n != entries.len() {
        return Err(HypervisorError::Ioctl {
            what: "KVM_GET_MSRS (an MSR could not be read)",
            source: vmm_sys_util::errno::Error::new(libc::EINVAL),
        });
    }
    Ok(VcpuState {
        index,
        regs,
        sregs,
        xsave,
        xcrs: fd.get_xcrs().ok(),
        lapic: fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?,
        msrs: msrs.as_slice().to_vec(),
        events: fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?,
        debugregs: fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?,
        mp_state: fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?,
    })
}

/// Restores in the order KVM needs: special registers (they hold the APIC base) before
/// the LAPIC, MSRs before events, and the MP state last.
pub(crate) fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<()> {
    let e = HypervisorError::ioctl;
    fd.set_sregs(&s.sregs).map_err(e("KVM_SET_SREGS"))?;
    fd.set_regs(&s.regs).map_err(e("KVM_SET_REGS"))?;
    // SAFETY: the area is a full kvm_xsave as KVM_GET_XSAVE returned it (4 KiB, no
    // XSAVE2 extension), so KVM reads only inside it; KVM validates its contents.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
    if let Some(x) = &s.xcrs {
        fd.set_xcrs(x).map_err(e("KVM_SET_XCRS"))?;
    }
    fd.set_lapic(&s.lapic).map_err(e("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| HypervisorError::Ioctl {
        what: "KVM_SET_MSRS (too many MSRs)",
        source: vmm_sys_util::errno::Error::new(libc::E2BIG),
    })?;
    let n = fd.set_msrs(&msrs).map_err(e("KVM_SET_MSRS"))?;
    if n != s.msrs.len() {
        let bad = s.msrs.get(n).map_or(0, |m| m.index);
        return Err(HypervisorError::RestoreMsr {
            index: bad,
            vcpu: s.index,
        });
    }
    fd.set_vcpu_events(&s.events)
        .map_err(e("KVM_SET_VCPU_EVENTS"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(e("KVM_SET_DEBUGREGS"))?;
    fd.set_mp_state(s.mp_state).map_err(e("KVM_SET_MP_STATE"))?;
    Ok(())
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut c)
        .map_err(HypervisorError::ioctl("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

pub(crate) fn save_vm(fd: &VmFd) -> Result<VmState> {
    Ok(VmState {
        pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: fd
            .get_pit2()
            .map_err(HypervisorError::ioctl("KVM_GET_PIT2"))?,
        clock: fd
            .get_clock()
            .map_err(HypervisorError::ioctl("KVM_GET_CLOCK"))?,
    })
}

pub(crate) fn restore_vm(fd: &VmFd, s: &VmState) -> Result<()> {
    let e = HypervisorError::ioctl;
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        fd.set_irqchip(c).map_err(e("KVM_SET_IRQCHIP"))?;
    }
    fd.set_pit2(&s.pit).map_err(e("KVM_SET_PIT2"))?;
    // Only the clock value: the flags KVM returns (e.g. TSC_STABLE) are not settable.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(e("KVM_SET_CLOCK"))?;
    Ok(())
}
