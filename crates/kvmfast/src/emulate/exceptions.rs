//! The exceptions a completed instruction can raise (delivered by `delivery`).

/// An exception with what SDM Vol. 3A 6.15 says it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// #DE, vector 0.
    DivideError,
    /// #UD, vector 6.
    InvalidOpcode,
    /// #NM, vector 7.
    DeviceNotAvailable,
    /// #TS, vector 10, with a selector error code.
    InvalidTss(u32),
    /// #NP, vector 11.
    SegmentNotPresent(u32),
    /// #SS, vector 12.
    StackFault(u32),
    /// #GP, vector 13.
    GeneralProtection(u32),
    /// #PF, vector 14: the linear address (CR2) and the error code.
    PageFault { address: u64, error_code: u32 },
    /// #MF, vector 16.
    FloatingPoint,
    /// #AC, vector 17 (error code 0).
    AlignmentCheck,
    /// #XM, vector 19.
    SimdFloatingPoint,
}

/// #PF error-code bits (SDM Vol. 3A 4.7).
pub const PF_PRESENT: u32 = 1 << 0;
pub const PF_WRITE: u32 = 1 << 1;
pub const PF_USER: u32 = 1 << 2;
pub const PF_RESERVED: u32 = 1 << 3;
pub const PF_FETCH: u32 = 1 << 4;

impl Fault {
    pub fn vector(self) -> u8 {
        match self {
            Self::DivideError => 0,
            Self::InvalidOpcode => 6,
            Self::DeviceNotAvailable => 7,
            Self::InvalidTss(_) => 10,
            Self::SegmentNotPresent(_) => 11,
            Self::StackFault(_) => 12,
            Self::GeneralProtection(_) => 13,
            Self::PageFault { .. } => 14,
            Self::FloatingPoint => 16,
            Self::AlignmentCheck => 17,
            Self::SimdFloatingPoint => 19,
        }
    }

    pub fn error_code(self) -> Option<u32> {
        match self {
            Self::InvalidTss(code)
            | Self::SegmentNotPresent(code)
            | Self::StackFault(code)
            | Self::GeneralProtection(code) => Some(code),
            Self::PageFault { error_code, .. } => Some(error_code),
            Self::AlignmentCheck => Some(0),
            _ => None,
        }
    }

    /// The mnemonic under which injections are counted: "#GP", "#PF", ...
    pub fn name(self) -> &'static str {
        match self {
            Self::DivideError => "#DE",
            Self::InvalidOpcode => "#UD",
            Self::DeviceNotAvailable => "#NM",
            Self::InvalidTss(_) => "#TS",
            Self::SegmentNotPresent(_) => "#NP",
            Self::StackFault(_) => "#SS",
            Self::GeneralProtection(_) => "#GP",
            Self::PageFault { .. } => "#PF",
            Self::FloatingPoint => "#MF",
            Self::AlignmentCheck => "#AC",
            Self::SimdFloatingPoint => "#XM",
        }
    }
}
