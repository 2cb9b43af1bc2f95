//! The GSI routing table, kept here and committed whole with KVM_SET_GSI_ROUTING.

use std::collections::BTreeMap;

use kvm_bindings::{KVM_IRQ_ROUTING_MSI, KvmIrqRouting, kvm_irq_routing_entry};

/// One MSI route: the message a GSI sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiRoute {
    pub address: u64,
    pub data: u32,
}

/// GSI → MSI message, sorted by GSI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingTable {
    routes: BTreeMap<u32, MsiRoute>,
}

impl RoutingTable {
    /// Sets a route and returns the one it replaced.
    pub fn set(&mut self, gsi: u32, route: MsiRoute) -> Option<MsiRoute> {
        self.routes.insert(gsi, route)
    }

    pub fn remove(&mut self, gsi: u32) -> Option<MsiRoute> {
        self.routes.remove(&gsi)
    }

    /// Restores a GSI to what it was before a change that KVM refused.
    pub fn restore(&mut self, gsi: u32, previous: Option<MsiRoute>) {
        match previous {
            Some(route) => self.routes.insert(gsi, route),
            None => self.routes.remove(&gsi),
        };
    }

    pub fn clear(&mut self) {
        self.routes.clear();
    }

    pub fn get(&self, gsi: u32) -> Option<MsiRoute> {
        self.routes.get(&gsi).copied()
    }

    /// The table as KVM_SET_GSI_ROUTING takes it; Err when it has too many entries.
    pub fn to_kvm(&self) -> Result<KvmIrqRouting, vmm_sys_util::fam::Error> {
        let entries: Vec<kvm_irq_routing_entry> = self
            .routes
            .iter()
            .map(|(&gsi, route)| {
                let mut entry = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                entry.u.msi.address_lo = route.address as u32;
                entry.u.msi.address_hi = (route.address >> 32) as u32;
                entry.u.msi.data = route.data;
                entry
            })
            .collect();
        KvmIrqRouting::from_entries(&entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_table_holds_every_route_in_gsi_order() {
        let mut table = RoutingTable::default();
        table.set(
            5,
            MsiRoute {
                address: 0x1_fee0_0000,
                data: 0x8031,
            },
        );
        table.set(
            2,
            MsiRoute {
                address: 0xfee0_0000,
                data: 0x30,
            },
        );
        let kvm = table.to_kvm().unwrap();
        let entries = kvm.as_slice();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].gsi, 2);
        assert_eq!(entries[1].gsi, 5);
        assert_eq!(entries[1].type_, KVM_IRQ_ROUTING_MSI);
        // SAFETY: the test wrote the msi member.
        let msi = unsafe { entries[1].u.msi };
        assert_eq!(
            (msi.address_lo, msi.address_hi, msi.data),
            (0xfee0_0000, 1, 0x8031)
        );
    }

    #[test]
    fn restore_undoes_set_and_remove() {
        let mut table = RoutingTable::default();
        let route = MsiRoute {
            address: 0xfee0_0000,
            data: 0x41,
        };
        let before = table.clone();
        let previous = table.set(7, route);
        table.restore(7, previous);
        assert_eq!(table, before);
        table.set(7, route);
        let removed = table.remove(7);
        table.restore(7, removed);
        assert_eq!(table.get(7), Some(route));
    }
}
