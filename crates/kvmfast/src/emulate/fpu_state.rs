//! The guest's x87/SSE/AVX state through KVM_GET_XSAVE / KVM_SET_XSAVE (the standard,
//! uncompacted XSAVE layout of SDM Vol. 1 13.4) and XCR0 through KVM_GET/SET_XCRS.

use kvm_bindings::{kvm_xcrs, kvm_xsave};
use kvm_ioctls::VcpuFd;

use super::cpu::{CR0_EM, CR0_TS, Cpu};
use super::exceptions::Fault;
use super::stop::Stop;

pub const AREA_SIZE: usize = 4096;
pub const LEGACY_SIZE: usize = 512;
pub const HEADER_OFFSET: usize = 512;
pub const HEADER_SIZE: usize = 64;
pub const MXCSR_OFFSET: usize = 24;
pub const XMM_OFFSET: usize = 160;
pub const MXCSR_INIT: u32 = 0x1f80;
pub const FCW_INIT: u16 = 0x037f;
pub const FEATURE_X87: u64 = 1 << 0;
pub const FEATURE_SSE: u64 = 1 << 1;
pub const FEATURE_AVX: u64 = 1 << 2;

/// The vCPU's XSAVE area as bytes.
#[derive(Clone)]
pub struct XsaveArea {
    pub bytes: Vec<u8>,
}

impl XsaveArea {
    pub fn load(fd: &VcpuFd) -> Result<Self, Stop> {
        let xsave = fd
            .get_xsave()
            .map_err(|e| Stop::ioctl("KVM_GET_XSAVE", e))?;
        let bytes = xsave
            .region
            .iter()
            .flat_map(|word| word.to_le_bytes())
            .collect();
        Ok(Self { bytes })
    }

    pub fn store(&self, fd: &VcpuFd) -> Result<(), Stop> {
        let mut xsave = kvm_xsave::default();
        for (word, chunk) in xsave.region.iter_mut().zip(self.bytes.chunks_exact(4)) {
            *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        // SAFETY: a whole kvm_xsave of KVM_GET_XSAVE's size; the kernel reads only it.
        unsafe { fd.set_xsave(&xsave) }.map_err(|e| Stop::ioctl("KVM_SET_XSAVE", e))
    }

    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    pub fn u32_at(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.bytes[offset..offset + 4].try_into().unwrap_or([0; 4]))
    }

    pub fn u64_at(&self, offset: usize) -> u64 {
        u64::from_le_bytes(self.bytes[offset..offset + 8].try_into().unwrap_or([0; 8]))
    }

    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    pub fn set_u64(&mut self, offset: usize, value: u64) {
        self.bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
    }

    pub fn fcw(&self) -> u16 {
        self.u16_at(0)
    }

    pub fn fsw(&self) -> u16 {
        self.u16_at(2)
    }

    pub fn mxcsr(&self) -> u32 {
        self.u32_at(MXCSR_OFFSET)
    }

    pub fn set_mxcsr(&mut self, value: u32) {
        self.set_u32(MXCSR_OFFSET, value);
    }

    /// XSTATE_BV: which components hold non-initial state (KVM's view of XINUSE).
    pub fn xstate_bv(&self) -> u64 {
        self.u64_at(HEADER_OFFSET)
    }

    pub fn set_xstate_bv(&mut self, value: u64) {
        self.set_u64(HEADER_OFFSET, value);
    }

    /// XMM register n (16 bytes).
    pub fn xmm(&self, n: usize) -> [u8; 16] {
        let at = XMM_OFFSET + 16 * n;
        self.bytes[at..at + 16].try_into().unwrap_or([0; 16])
    }

    pub fn set_xmm(&mut self, n: usize, value: &[u8; 16]) {
        let at = XMM_OFFSET + 16 * n;
        self.bytes[at..at + 16].copy_from_slice(value);
    }
}

/// XCR0 (KVM_GET_XCRS).
pub fn xcr0(fd: &VcpuFd) -> Result<u64, Stop> {
    let xcrs = fd.get_xcrs().map_err(|e| Stop::ioctl("KVM_GET_XCRS", e))?;
    Ok(xcrs.xcrs[..(xcrs.nr_xcrs as usize).min(xcrs.xcrs.len())]
        .iter()
        .find(|xcr| xcr.xcr == 0)
        .map_or(FEATURE_X87, |xcr| xcr.value))
}

/// XSETBV through KVM_SET_XCRS; false when KVM refuses the value.
pub fn set_xcr0(fd: &VcpuFd, value: u64) -> bool {
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = value;
    fd.set_xcrs(&xcrs).is_ok()
}

/// #UD when CR0.EM, #NM when CR0.TS: the checks of every x87/SSE state instruction.
pub fn check_device_available(cpu: &Cpu<'_>) -> Result<(), Stop> {
    if cpu.sregs.cr0 & CR0_EM != 0 {
        return Err(Stop::Fault(Fault::InvalidOpcode));
    }
    if cpu.sregs.cr0 & CR0_TS != 0 {
        return Err(Stop::Fault(Fault::DeviceNotAvailable));
    }
    Ok(())
}

/// The host's MXCSR_MASK (bytes 28..31 of an FXSAVE image; 0 there means 0xFFBF, SDM
/// Vol. 1 11.6.6): the guest runs on this processor, so its reserved MXCSR bits are
/// the host's.
pub fn host_mxcsr_mask() -> u32 {
    #[repr(C, align(16))]
    struct Image([u8; 512]);
    let mut image = Image([0; 512]);
    // SAFETY: FXSAVE writes exactly 512 bytes into a 16-byte aligned buffer we own.
    unsafe {
        std::arch::asm!("fxsave64 [{}]", in(reg) image.0.as_mut_ptr(), options(nostack));
    }
    let mask = u32::from_le_bytes([image.0[28], image.0[29], image.0[30], image.0[31]]);
    if mask == 0 { 0xffbf } else { mask }
}
