//! KVM's GSI routing table as Ferry keeps it. `KVM_SET_GSI_ROUTING` replaces the whole
//! table, so the irqchip pins KVM set up by default (GSIs 0-15 to the PIC and the IOAPIC,
//! 16-23 to the IOAPIC) are written again with every MSI route, or the legacy devices
//! (COM1) would go silent the first time a guest programs an MSI-X vector.

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};

/// GSIs the IOAPIC pins use; MSI routes take the numbers from here on.
pub const FIRST_MSI_GSI: u32 = 24;
/// KVM's limit on routes (KVM_MAX_IRQ_ROUTES).
const MAX_ROUTES: usize = 4096;

/// The routes beyond KVM's defaults, by GSI.
#[derive(Debug, Default)]
pub struct IrqRoutes {
    msi: BTreeMap<u32, (u64, u32)>,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl IrqRoutes {
    /// Routes `gsi` to the MSI message (`address`, `data`).
    pub fn set_msi(&mut self, gsi: u32, address: u64, data: u32) -> Result<(), String> {
        if gsi < FIRST_MSI_GSI {
            return Err(format!(
                "GSI {gsi} is an irqchip pin (MSI routes start at {FIRST_MSI_GSI})"
            ));
        }
        if !self.msi.contains_key(&gsi) && self.msi.len() + 40 >= MAX_ROUTES {
            return Err(format!("no room for another MSI route (GSI {gsi})"));
        }
        self.msi.insert(gsi, (address, data));
        Ok(())
    }

    /// The whole table: KVM's irqchip defaults, then the MSI routes.
    pub fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        let mut out = Vec::with_capacity(40 + self.msi.len());
        for gsi in 0..24u32 {
            if gsi < 16 {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                out.push(irqchip(gsi, chip, gsi % 8));
            }
            out.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (&gsi, &(address, data)) in &self.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = address as u32;
            e.u.msi.address_hi = (address >> 32) as u32;
            e.u.msi.data = data;
            out.push(e);
        }
        out
    }

    pub fn table(&self) -> Result<KvmIrqRouting, String> {
        let entries = self.entries();
        KvmIrqRouting::from_entries(&entries).map_err(|e| {
            format!(
                "building a routing table of {} entries: {e:?}",
                entries.len()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_stay_and_msi_routes_follow() {
        let mut r = IrqRoutes::default();
        assert_eq!(r.entries().len(), 16 * 2 + 8);
        assert!(r.set_msi(4, 0xfee0_0000, 0x31).is_err());
        r.set_msi(30, 0xfee0_0000, 0x31).unwrap();
        r.set_msi(24, 0x1_fee0_1000, 0x41).unwrap();
        r.set_msi(30, 0xfee0_0000, 0x32).unwrap();
        let e = r.entries();
        assert_eq!(e.len(), 40 + 2);
        // COM1 (GSI 4) still reaches both chips.
        let com1: Vec<_> = e.iter().filter(|x| x.gsi == 4).collect();
        assert_eq!(com1.len(), 2);
        // SAFETY (test): the entries were built as irqchip and MSI routes above.
        unsafe {
            assert_eq!(com1[0].u.irqchip.irqchip, KVM_IRQCHIP_PIC_MASTER);
            assert_eq!(com1[1].u.irqchip.pin, 4);
            assert_eq!(e[40].gsi, 24);
            assert_eq!(e[40].u.msi.address_hi, 1);
            assert_eq!(e[40].u.msi.address_lo, 0xfee0_1000);
            assert_eq!(e[41].u.msi.data, 0x32, "the last message written wins");
        }
        assert_eq!(r.table().unwrap().as_slice().len(), 42);
    }
}
