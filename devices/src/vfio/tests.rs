//! [`VfioPciFunction`] against a fake device: a 64-bit prefetchable BAR 0, a 32-bit BAR 2
//! holding the MSI-X table and PBA, and MSI, MSI-X and power-management capabilities.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use super::*;
use crate::pci::{MsiMessage, PciDevice};

const BAR0_SIZE: u64 = 0x4000;
const BAR2_SIZE: u64 = 0x1000;
const VECTORS: u16 = 4;
const MSI_AT: usize = 0x40;
const MSIX_AT: usize = 0x50;
const PM_AT: usize = 0x60;
const PBA_OFFSET: u32 = 0x800;

#[derive(Default)]
struct FakeState {
    config: Vec<u8>,
    bar0: Vec<u8>,
    /// (region, offset, bytes) of every write.
    writes: Vec<(u32, u64, Vec<u8>)>,
    /// (index, start, fds) of every SET_IRQS with eventfds.
    set_irqs: Vec<(u32, u32, Vec<RawFd>)>,
    disabled: Vec<u32>,
    calls: usize,
    fail: bool,
}

#[derive(Default)]
struct FakeDevice(Mutex<FakeState>);

impl FakeDevice {
    fn new() -> Arc<FakeDevice> {
        let mut c = vec![0u8; 256];
        c[0..2].copy_from_slice(&0x8086u16.to_le_bytes());
        c[2..4].copy_from_slice(&0x1234u16.to_le_bytes());
        c[8] = 3; // revision
        c[9..12].copy_from_slice(&[0x00, 0x00, 0x02]); // ethernet controller
        c[0x2c..0x2e].copy_from_slice(&0x8086u16.to_le_bytes());
        c[0x2e..0x30].copy_from_slice(&0x0001u16.to_le_bytes());
        // BAR 0: 64-bit prefetchable; BAR 2: 32-bit.
        c[0x10] = 0x0c;
        c[0x18] = 0x00;
        c[0x06] = 0x10; // capability list
        c[0x34] = MSI_AT as u8;
        // MSI, 64-bit, then MSI-X, then PM.
        c[MSI_AT] = MSI_CAP_ID;
        c[MSI_AT + 1] = MSIX_AT as u8;
        c[MSI_AT + 2] = 0x80;
        c[MSIX_AT] = 0x11;
        c[MSIX_AT + 1] = PM_AT as u8;
        c[MSIX_AT + 2..MSIX_AT + 4].copy_from_slice(&(VECTORS - 1).to_le_bytes());
        c[MSIX_AT + 4..MSIX_AT + 8].copy_from_slice(&2u32.to_le_bytes()); // BAR 2, offset 0
        c[MSIX_AT + 8..MSIX_AT + 12].copy_from_slice(&(PBA_OFFSET | 2).to_le_bytes());
        c[PM_AT] = 0x01;
        c[PM_AT + 1] = 0;
        c[PM_AT + 2] = 0x03;
        Arc::new(FakeDevice(Mutex::new(FakeState {
            config: c,
            bar0: vec![0u8; BAR0_SIZE as usize],
            ..Default::default()
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().unwrap()
    }

    fn op(&self) -> Result<std::sync::MutexGuard<'_, FakeState>, VfioOpsError> {
        let mut s = self.state();
        s.calls += 1;
        if s.fail {
            return Err(VfioOpsError::Kernel {
                op: "fake",
                errno: libc::EIO,
            });
        }
        Ok(s)
    }
}

impl VfioOps for FakeDevice {
    fn region_info(&self, index: u32) -> Result<RegionInfo, VfioOpsError> {
        drop(self.op()?);
        let size = match index {
            0 => BAR0_SIZE,
            2 => BAR2_SIZE,
            CONFIG_REGION => 256,
            _ => 0,
        };
        Ok(RegionInfo {
            index,
            flags: REGION_READ | REGION_WRITE,
            size,
            offset: u64::from(index) << 40,
        })
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo, VfioOpsError> {
        drop(self.op()?);
        Ok(IrqInfo {
            index,
            flags: IRQ_EVENTFD,
            count: if index == MSIX_IRQ { VECTORS.into() } else { 0 },
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioOpsError> {
        let s = self.op()?;
        let src = match index {
            CONFIG_REGION => &s.config,
            0 => &s.bar0,
            _ => {
                data.fill(0);
                return Ok(());
            }
        };
        let at = offset as usize;
        data.copy_from_slice(&src[at..at + data.len()]);
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioOpsError> {
        let mut s = self.op()?;
        s.writes.push((index, offset, data.to_vec()));
        let at = offset as usize;
        match index {
            CONFIG_REGION => s.config[at..at + data.len()].copy_from_slice(data),
            0 => s.bar0[at..at + data.len()].copy_from_slice(data),
            _ => {}
        }
        Ok(())
    }

    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[RawFd]) -> Result<(), VfioOpsError> {
        self.op()?.set_irqs.push((index, start, fds.to_vec()));
        Ok(())
    }

    fn disable_irqs(&self, index: u32) -> Result<(), VfioOpsError> {
        self.op()?.disabled.push(index);
        Ok(())
    }

    fn reset(&self) -> Result<(), VfioOpsError> {
        drop(self.op()?);
        Ok(())
    }
}

/// Delivering eventfd of vector v: 100 + v; parking: 200 + v.
#[derive(Default)]
struct FakeIrqs {
    routes: Mutex<Vec<(u16, MsiMessage)>>,
    unparked: Mutex<Vec<u16>>,
}

impl VfioInterrupts for FakeIrqs {
    fn eventfd(&self, vector: u16, deliver: bool) -> RawFd {
        if deliver {
            100 + RawFd::from(vector)
        } else {
            200 + RawFd::from(vector)
        }
    }

    fn route(&self, vector: u16, message: MsiMessage) {
        self.routes.lock().unwrap().push((vector, message));
    }

    fn unparked(&self, vector: u16) {
        self.unparked.lock().unwrap().push(vector);
    }
}

fn function() -> (VfioPciFunction, Arc<FakeDevice>, Arc<FakeIrqs>) {
    let dev = FakeDevice::new();
    let mut f = VfioPciFunction::new("fake".into(), dev.clone()).unwrap();
    let irqs = Arc::new(FakeIrqs::default());
    f.set_interrupts(irqs.clone());
    (f, dev, irqs)
}

fn r32(f: &VfioPciFunction, at: usize) -> u32 {
    let mut b = [0u8; 4];
    f.read_config(at, &mut b);
    u32::from_le_bytes(b)
}

fn w32(f: &mut VfioPciFunction, at: usize, v: u32) {
    f.write_config(at, &v.to_le_bytes());
}

#[test]
fn header_shows_the_device_ids_and_sizes_its_bars() {
    let (mut f, _, _) = function();
    assert_eq!(r32(&f, 0), 0x1234_8086);
    assert_eq!(r32(&f, 8), 0x0200_0003);
    assert_eq!(r32(&f, 0x2c), 0x0001_8086);
    assert_eq!(f.bars(), &[(0, BAR0_SIZE), (2, BAR2_SIZE)]);
    // No INTx offered.
    assert_eq!(r32(&f, 0x3c) >> 8 & 0xff, 0);
    // Sizing: all ones reads back the size mask with the BAR's flags.
    w32(&mut f, 0x10, 0xffff_ffff);
    w32(&mut f, 0x14, 0xffff_ffff);
    assert_eq!(r32(&f, 0x10), !(BAR0_SIZE as u32 - 1) | 0x0c);
    assert_eq!(r32(&f, 0x14), 0xffff_ffff);
    w32(&mut f, 0x18, 0xffff_ffff);
    assert_eq!(r32(&f, 0x18), !(BAR2_SIZE as u32 - 1));
    // Relocation by the VMM, then by the guest: the addresses are Ferry's.
    f.config_mut().set_bar_address(0, 0x1_0000_0000).unwrap();
    assert_eq!(f.config().bars().next().unwrap().address, 0x1_0000_0000);
    w32(&mut f, 0x10, 0xe000_0000);
    w32(&mut f, 0x14, 0x2);
    assert_eq!(f.config().bars().next().unwrap().address, 0x2_e000_0000);
    // No ROM BAR, no extended config space.
    assert_eq!(r32(&f, 0x30), 0);
    assert_eq!(r32(&f, 0x100), 0);
}

#[test]
fn msi_is_hidden_and_the_chain_goes_around_it() {
    let (f, _, _) = function();
    assert_eq!(r32(&f, 0x34) & 0xff, MSIX_AT as u32);
    assert_eq!(r32(&f, 4) >> 16 & 0x10, 0x10, "capability list bit");
    let mut b = [0u8; 2];
    f.read_config(MSIX_AT, &mut b);
    assert_eq!(b, [0x11, PM_AT as u8]);
    f.read_config(PM_AT, &mut b);
    assert_eq!(b, [0x01, 0]);
    // The MSI-X capability announces the device's table size and locations.
    assert_eq!(r32(&f, MSIX_AT) >> 16, u32::from(VECTORS - 1));
    assert_eq!(r32(&f, MSIX_AT + 4), 2);
    assert_eq!(r32(&f, MSIX_AT + 8), PBA_OFFSET | 2);
}

#[test]
fn bar_accesses_are_forwarded_and_the_msix_table_is_ferrys() {
    let (mut f, dev, irqs) = function();
    f.write_bar(0, 0x100, &0xdead_beefu32.to_le_bytes());
    let mut b = [0u8; 4];
    f.read_bar(0, 0x100, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
    assert!(dev
        .state()
        .writes
        .contains(&(0, 0x100, 0xdead_beefu32.to_le_bytes().to_vec())));

    // Vector 1's message goes to the model (and a route), not to the device.
    let writes_before = dev.state().writes.len();
    f.write_bar(2, 16, &0xfee0_1000u64.to_le_bytes());
    f.write_bar(2, 24, &0x41u32.to_le_bytes());
    assert_eq!(dev.state().writes.len(), writes_before);
    let mut q = [0u8; 8];
    f.read_bar(2, 16, &mut q);
    assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
    assert_eq!(
        irqs.routes.lock().unwrap().last(),
        Some(&(
            1,
            MsiMessage {
                address: 0xfee0_1000,
                data: 0x41
            }
        ))
    );
    // Vectors come out of reset masked: vector 0's control reads 1; the PBA is empty.
    f.read_bar(2, 12, &mut b);
    assert_eq!(u32::from_le_bytes(b), 1);
    f.read_bar(2, u64::from(PBA_OFFSET), &mut q);
    assert_eq!(q, [0; 8]);
}

#[test]
fn enabling_msix_sets_one_eventfd_per_vector_and_masks_follow() {
    let (mut f, dev, irqs) = function();
    assert_eq!(f.msix_vectors(), VECTORS);
    // Enable (message control's high byte bit 7), through a dword write of the header.
    w32(&mut f, MSIX_AT, 0x8000 << 16);
    {
        let s = dev.state();
        assert_eq!(s.set_irqs.len(), 1);
        let (index, start, fds) = &s.set_irqs[0];
        assert_eq!((*index, *start), (MSIX_IRQ, 0));
        // All masked: every vector parks.
        assert_eq!(fds, &vec![200, 201, 202, 203]);
        // The enable never reached the device's own capability.
        assert!(s.writes.iter().all(|(r, at, _)| !(*r == CONFIG_REGION
            && (MSIX_AT as u64..MSIX_AT as u64 + 12).contains(at))));
    }
    assert_eq!(r32(&f, MSIX_AT) >> 16, 0x8000 | u32::from(VECTORS - 1));
    // Unmask vector 2: its eventfd becomes the delivering one, what was parked goes.
    f.write_bar(2, 2 * 16 + 12, &0u32.to_le_bytes());
    assert_eq!(dev.state().set_irqs.last(), Some(&(MSIX_IRQ, 2, vec![102])));
    assert_eq!(*irqs.unparked.lock().unwrap(), vec![2]);
    // Function mask parks it again.
    w32(&mut f, MSIX_AT, 0xc000 << 16);
    assert_eq!(dev.state().set_irqs.last(), Some(&(MSIX_IRQ, 2, vec![202])));
    // Disable.
    w32(&mut f, MSIX_AT, 0);
    assert_eq!(dev.state().disabled, vec![MSIX_IRQ]);
}

#[test]
fn config_writes_reach_the_device_except_what_ferry_owns() {
    let (mut f, dev, _) = function();
    dev.state().writes.clear();
    // The command register: kept and forwarded.
    f.write_config(4, &0x0006u16.to_le_bytes());
    assert_eq!(f.config().command(), 0x0006);
    // BARs, the interrupt line: Ferry's only.
    w32(&mut f, 0x10, 0xffff_ffff);
    f.write_config(0x3c, &[11]);
    // MSI (hidden) and MSI-X: not forwarded.
    w32(&mut f, MSI_AT, 0x0001_0000);
    w32(&mut f, MSIX_AT + 4, 0x1234_5678);
    // PM control/status: forwarded as written.
    w32(&mut f, PM_AT + 4, 0x0000_0003);
    let writes = dev.state().writes.clone();
    assert_eq!(
        writes,
        vec![
            (CONFIG_REGION, 4, vec![0x06, 0x00]),
            (CONFIG_REGION, (PM_AT + 4) as u64, vec![3, 0, 0, 0]),
        ]
    );
    // A dword write over the PM id/next: the chain bytes stay, the rest goes.
    dev.state().writes.clear();
    w32(&mut f, PM_AT, 0xaabb_ccdd);
    assert_eq!(
        dev.state().writes,
        vec![
            (CONFIG_REGION, PM_AT as u64, vec![0xdd]),
            (CONFIG_REGION, (PM_AT + 2) as u64, vec![0xbb, 0xaa]),
        ]
    );
}

#[test]
fn a_failing_device_does_not_panic_and_makes_the_function_dead() {
    let (mut f, dev, _) = function();
    dev.state().fail = true;
    let mut b = [0u8; 4];
    f.read_bar(0, 0, &mut b);
    assert_eq!(b, [0xff; 4]);
    assert!(f.is_broken());
    let calls = dev.state().calls;
    // From now on nothing reaches the device (so nothing more is logged).
    f.read_bar(0, 4, &mut b);
    f.write_bar(0, 4, &b);
    f.write_config(4, &[6, 0]);
    w32(&mut f, MSIX_AT, 0x8000 << 16);
    assert_eq!(r32(&f, PM_AT + 4), 0xffff_ffff);
    assert_eq!(dev.state().calls, calls);
    // The header is Ferry's and still answers.
    assert_eq!(r32(&f, 0), 0x1234_8086);
}

#[test]
fn construction_errors_name_the_problem() {
    let dev = FakeDevice::new();
    dev.state().fail = true;
    let e = VfioPciFunction::new("dead".into(), dev)
        .err()
        .expect("a failing device is an error");
    assert!(e.to_string().contains("dead"), "{e}");

    let dev = FakeDevice::new();
    dev.state().config[0x10] = 0x01; // BAR 0 an I/O BAR
    let e = VfioPciFunction::new("io".into(), dev).err().unwrap();
    assert_eq!(
        e.to_string(),
        "io: BAR 0 of 0x4000 bytes: I/O BARs are not supported"
    );

    let dev = FakeDevice::new();
    dev.state().config[PM_AT + 1] = MSI_AT as u8; // a loop
    let e = VfioPciFunction::new("loop".into(), dev).err().unwrap();
    assert!(e.to_string().contains("loops at 0x40"), "{e}");
}

#[test]
fn state_round_trip_reenables_vectors() {
    let (mut f, _, _) = function();
    f.config_mut().set_bar_address(0, 0x1_0000_0000).unwrap();
    f.write_bar(2, 0, &0xfee0_0000u64.to_le_bytes());
    f.write_bar(2, 12, &0u32.to_le_bytes());
    w32(&mut f, MSIX_AT, 0x8000 << 16);
    let s = f.state();

    let (mut g, dev, irqs) = function();
    g.restore(&s).unwrap();
    assert_eq!(g.config().bars().next().unwrap().address, 0x1_0000_0000);
    assert_eq!(
        dev.state().set_irqs.last(),
        Some(&(MSIX_IRQ, 0, vec![100, 201, 202, 203]))
    );
    assert_eq!(irqs.routes.lock().unwrap().len(), usize::from(VECTORS));
}
