//! vCPU and VM state saved in one VM and restored into another continues the guest.

mod common;

use common::writer::*;
use hypervisor::*;

/// 32-bit code: `out 0xf4, al; inc ebx; out 0xf4, al; hlt`.
const CODE: [u8; 6] = [0xe6, 0xf4, 0x43, 0xe6, 0xf4, 0xf4];

/// A guest about to run `CODE` (at 0x2000) with `rbx` in ebx.
fn at_code(rbx: u64) -> Guest {
    let mut g = guest(Mode::Ring(4096), 16 << 20);
    // SAFETY: 0x2000 + 6 is inside the 16 MiB mapping.
    unsafe { std::ptr::copy_nonoverlapping(CODE.as_ptr(), g.mem.add(0x2000), CODE.len()) };
    let mut regs = g.vcpus[0].fd().get_regs().unwrap();
    regs.rip = 0x2000;
    regs.rflags = 2;
    regs.rbx = rbx;
    g.vcpus[0].fd().set_regs(&regs).unwrap();
    g
}

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
    let mut a = at_code(41);
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

/// 32-bit code: `in al, 0xf5; out 0xf4, al; hlt`.
const READ_CODE: [u8; 5] = [0xe4, 0xf5, 0xe6, 0xf4, 0xf4];

/// A guest stopped at an `IN`: runs `READ_CODE` until its read of port 0xf5, answers
/// 0x77, and returns the guest with that exit handled but not re-entered.
fn stopped_at_in() -> Guest {
    let mut g = guest(Mode::Ring(4096), 16 << 20);
    // SAFETY: 0x2000 + 5 is inside the 16 MiB mapping.
    unsafe { std::ptr::copy_nonoverlapping(READ_CODE.as_ptr(), g.mem.add(0x2000), 5) };
    let mut regs = g.vcpus[0].fd().get_regs().unwrap();
    regs.rip = 0x2000;
    regs.rflags = 2;
    regs.rax = 0;
    g.vcpus[0].fd().set_regs(&regs).unwrap();
    loop {
        match g.vcpus[0].run().unwrap() {
            VcpuExit::IoIn(0xf5, data) => {
                data[0] = 0x77;
                return g;
            }
            VcpuExit::Interrupted => {}
            e => panic!("unexpected exit {e:?}"),
        }
    }
}

/// KVM finishes an `IN` (its value into `al`, the instruction skipped) only on the next
/// KVM_RUN. State saved right after the exit replays the read wherever it is restored;
/// with `request_immediate_exit` that KVM_RUN finishes the read and returns at once, and
/// the saved state holds the value, past the instruction.
#[test]
fn an_in_is_finished_before_the_state_is_saved() {
    // Saved at once: still at the `IN`, without its value (what the VMM must avoid).
    let a = stopped_at_in();
    let early = a.vcpus[0].save_state().unwrap();
    assert_eq!(early.regs.rip, 0x2000, "the IN is not finished yet");
    assert_ne!(early.regs.rax & 0xff, 0x77);

    // Finished first, as the vCPU threads do before they park.
    let mut a = stopped_at_in();
    a.vcpus[0].request_immediate_exit();
    match a.vcpus[0].run().unwrap() {
        VcpuExit::Interrupted => {}
        e => panic!("the finishing KVM_RUN ran the guest on: {e:?}"),
    }
    // Where KVM can, the save below reads the registers it copied out at that return.
    assert_eq!(a.vcpus[0].regs_copied_out(), copies_registers_out());
    let state = a.vcpus[0].save_state().unwrap();
    assert_eq!(state.regs.rip, 0x2002, "past the IN, and no further");
    assert_eq!(state.regs.rax & 0xff, 0x77, "the value read is in al");
    let vm_state = a.vm.save_state().unwrap();

    // Restored elsewhere, it goes on with the `OUT` of the value: no second read.
    let mut b = guest(Mode::Ring(4096), 16 << 20);
    // SAFETY: both mappings are 16 MiB; copy the guest's RAM as migration would.
    unsafe { std::ptr::copy_nonoverlapping(a.mem, b.mem, 16 << 20) };
    b.vm.restore_state(&vm_state).unwrap();
    b.vcpus[0].restore_state(&state).unwrap();
    loop {
        match b.vcpus[0].run().unwrap() {
            VcpuExit::IoOut(0xf4, d) => {
                assert_eq!(d, [0x77]);
                break;
            }
            VcpuExit::Interrupted => {}
            e => panic!("unexpected exit after the restore: {e:?}"),
        }
    }
}

/// A save reads the general and special registers where KVM copied them out at the exit
/// (KVM_CAP_SYNC_REGS): the same as the ioctls read, and never once anything was set on
/// the vCPU since (through its fd, or a restore).
#[test]
fn registers_copied_out_at_an_exit_are_the_vcpus_own() {
    let mut g = at_code(7);
    assert!(!g.vcpus[0].regs_copied_out(), "not before a KVM_RUN");
    run_to_out(&mut g);
    if !copies_registers_out() {
        eprintln!("skipped: this KVM does not copy registers out at exits (KVM_CAP_SYNC_REGS)");
        return;
    }
    assert!(
        g.vcpus[0].regs_copied_out(),
        "KVM can: asked to at every exit"
    );
    let saved = g.vcpus[0].save_state().unwrap();
    assert_eq!((saved.regs.rip, saved.regs.rbx), (0x2002, 7));
    // Through an ioctl: the same, to the byte.
    let fd = g.vcpus[0].fd();
    let (regs, sregs) = (fd.get_regs().unwrap(), fd.get_sregs().unwrap());
    assert_eq!(format!("{:?}", saved.regs), format!("{regs:?}"));
    assert_eq!(format!("{:?}", saved.sregs), format!("{sregs:?}"));

    // Set through the fd after the exit: the save sees the new value.
    rerun_from_the_start(&mut g);
    assert!(g.vcpus[0].regs_copied_out());
    let mut regs = g.vcpus[0].fd().get_regs().unwrap();
    regs.rbx = 1234;
    g.vcpus[0].fd().set_regs(&regs).unwrap();
    assert!(!g.vcpus[0].regs_copied_out());
    assert_eq!(g.vcpus[0].save_state().unwrap().regs.rbx, 1234);

    // Restored after an exit: the save returns what was restored, not the exit's copy.
    rerun_from_the_start(&mut g);
    assert!(g.vcpus[0].regs_copied_out());
    let mut other = g.vcpus[0].save_state().unwrap();
    other.regs.rip = 0x3000;
    other.regs.rbx = 99;
    g.vcpus[0].restore_state(&other).unwrap();
    let back = g.vcpus[0].save_state().unwrap();
    assert_eq!((back.regs.rip, back.regs.rbx), (0x3000, 99));

    // Used once: a second save reads the registers by ioctl.
    rerun_from_the_start(&mut g);
    g.vcpus[0].save_state().unwrap();
    assert!(!g.vcpus[0].regs_copied_out());
}

/// KVM_CAP_SYNC_REGS covers the general and special registers here.
fn copies_registers_out() -> bool {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let mask = kvm.check_extension_int(kvm_ioctls::Cap::SyncRegs);
    let wanted = (kvm_bindings::KVM_SYNC_X86_REGS | kvm_bindings::KVM_SYNC_X86_SREGS) as i32;
    mask & wanted == wanted
}

/// Runs `CODE` again from its start to its first `OUT`.
fn rerun_from_the_start(g: &mut Guest) {
    let mut regs = g.vcpus[0].fd().get_regs().unwrap();
    regs.rip = 0x2000;
    g.vcpus[0].fd().set_regs(&regs).unwrap();
    run_to_out(g);
}
