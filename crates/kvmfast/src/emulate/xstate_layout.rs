//! The processor's XSAVE layout, CPUID leaf 0DH (SDM Vol. 1 13.2), read once per
//! process: where the host is itself a guest (as on the machines HOST-KVM.md
//! describes), every CPUID is an exit to the hypervisor below, and a completion that
//! asked for each component's offset paid dozens of them.

use std::sync::OnceLock;

/// One state component: its offset in the standard format, its size, and whether the
/// compacted format aligns it to 64 bytes (ECX bit 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Component {
    pub offset: usize,
    pub size: usize,
    pub aligned: bool,
}

struct Layout {
    components: [Component; 64],
    /// CPUID.(EAX=0DH,ECX=1):EAX, the XSAVEOPT/XSAVEC/XGETBV1/XSAVES flags.
    subleaf1_eax: u32,
}

fn layout() -> &'static Layout {
    static LAYOUT: OnceLock<Layout> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let mut components = [Component::default(); 64];
        // Components 0 and 1 (x87, SSE) live in the legacy region: CPUID reports
        // nothing for them.
        for (index, component) in components.iter_mut().enumerate().skip(2) {
            let leaf = std::arch::x86_64::__cpuid_count(0xd, index as u32);
            *component = Component {
                offset: leaf.ebx as usize,
                size: leaf.eax as usize,
                aligned: leaf.ecx & 2 != 0,
            };
        }
        Layout {
            components,
            subleaf1_eax: std::arch::x86_64::__cpuid_count(0xd, 1).eax,
        }
    })
}

/// Where component `index` (2..63) lives.
pub fn component(index: u32) -> Component {
    layout().components[(index as usize).min(63)]
}

/// Its offset in the standard format.
pub fn offset(index: u32) -> usize {
    component(index).offset
}

/// XGETBV with ECX = 1 (XINUSE) exists.
pub fn has_xgetbv1() -> bool {
    layout().subleaf1_eax & 4 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_cpuid_for_every_component() {
        for index in 2..63 {
            let leaf = std::arch::x86_64::__cpuid_count(0xd, index);
            assert_eq!(offset(index), leaf.ebx as usize, "component {index}");
            assert_eq!(
                component(index).size,
                leaf.eax as usize,
                "component {index}"
            );
        }
    }
}
