//! vCPU and VM state saved in one VM and restored into another continues the guest.

mod common;

use common::writer::*;
use hypervisor::*;

/// 32-bit code: `out 0xf4, al; inc ebx; out 0xf4, al; hlt`.
const CODE: [u8; 6] = [0xe6, 0xf4, 0x43, 0xe6, 0xf4, 0xf4];

fn run_to_out(g: &mut Guest) {
    loop {
        match g.vcpus[0].run().unwrap() {
            VcpuExit::IoOut(0xf4, _) => return,
            VcpuExit::Interrupted => {}
            e => panic!("unexpected exit {e:?}"),
        }
    }
}

#[test]
fn restored_vcpu_continues_where_the_saved_one_stopped() {
    let mut a = guest(Mode::Ring(4096), 16 << 20);
    // SAFETY: 0x2000 + 6 is inside the 16 MiB mapping.
    unsafe { std::ptr::copy_nonoverlapping(CODE.as_ptr(), a.mem.add(0x2000), CODE.len()) };
    let mut regs = a.vcpus[0].fd().get_regs().unwrap();
    regs.rip = 0x2000;
    regs.rflags = 2;
    regs.rbx = 41;
    a.vcpus[0].fd().set_regs(&regs).unwrap();
    run_to_out(&mut a);
    let vcpu_state = a.vcpus[0].save_state().unwrap();
    let vm_state = a.vm.save_state().unwrap();
    assert_eq!(vcpu_state.regs.rip, 0x2002);
    assert!(
        vcpu_state.msrs.iter().any(|m| m.index == 0x10),
        "the TSC is among the saved MSRs"
    );

    // Plain data: it survives serialisation (as it must cross the wire).
    let wire = serde_json::to_vec(&(&vcpu_state, &vm_state)).unwrap();
    let (vcpu_state, vm_state): (VcpuState, VmState) = serde_json::from_slice(&wire).unwrap();

    let mut b = guest(Mode::Ring(4096), 16 << 20);
    // SAFETY: both mappings are 16 MiB; copy the guest's RAM as migration would.
    unsafe { std::ptr::copy_nonoverlapping(a.mem, b.mem, 16 << 20) };
    b.vm.restore_state(&vm_state).unwrap();
    b.vcpus[0].restore_state(&vcpu_state).unwrap();
    run_to_out(&mut b);
    let r = b.vcpus[0].fd().get_regs().unwrap();
    assert_eq!(
        r.rbx, 42,
        "the restored vCPU ran `inc ebx` after the saved point"
    );
    assert_eq!(r.rip, 0x2005);
    let tsc_a = vcpu_state
        .msrs
        .iter()
        .find(|m| m.index == 0x10)
        .unwrap()
        .data;
    let tsc_b = b.vcpus[0]
        .save_state()
        .unwrap()
        .msrs
        .iter()
        .find(|m| m.index == 0x10)
        .unwrap()
        .data;
    assert!(
        tsc_b >= tsc_a,
        "guest time does not go backwards: {tsc_a} -> {tsc_b}"
    );
}
