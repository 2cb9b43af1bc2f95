//! The failing instruction: its bytes (from the exit when KVM gives them, else fetched
//! at CS:RIP) and its decoding by iced-x86.

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction};

use super::cpu::Cpu;
use super::linear::{GuestView, Intent, linear_address};
use super::paging::Access;
use super::stop::Stop;

const MAX_LENGTH: usize = 15;

/// A decoded instruction with the bytes it was decoded from and its prefixes.
pub struct Decoded {
    pub instruction: Instruction,
    pub bytes: Vec<u8>,
    /// Address size in bytes (2, 4 or 8), after any 0x67 prefix.
    pub address_size: u32,
}

impl Decoded {
    /// RIP of the next instruction.
    pub fn next_rip(&self) -> u64 {
        self.instruction.next_ip()
    }
}

/// Why no instruction could be decoded.
pub enum DecodeFailure {
    /// The bytes are not an instruction iced-x86 knows.
    Invalid(Vec<u8>),
    /// Fetching them faulted.
    Stop(Stop),
}

/// Decodes the instruction at RIP: KVM's bytes first (they are the 15 bytes at RIP, so
/// the instruction's own length is what the decoder says), then guest memory for the
/// rest when KVM gave fewer than it needs.
pub fn decode(
    cpu: &Cpu<'_>,
    memory: &GuestView<'_>,
    exit_bytes: &[u8],
) -> Result<Decoded, DecodeFailure> {
    let bitness = cpu.bitness();
    let rip = cpu.regs.rip;
    if !exit_bytes.is_empty() {
        if let Some(decoded) = try_decode(bitness, rip, exit_bytes) {
            return Ok(decoded);
        }
        if exit_bytes.len() >= MAX_LENGTH {
            return Err(DecodeFailure::Invalid(exit_bytes.to_vec()));
        }
    }
    let bytes = fetch(cpu, memory).map_err(DecodeFailure::Stop)?;
    try_decode(bitness, rip, &bytes).ok_or(DecodeFailure::Invalid(bytes))
}

fn try_decode(bitness: u32, rip: u64, bytes: &[u8]) -> Option<Decoded> {
    let mut decoder = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let instruction = decoder.decode();
    if instruction.is_invalid() || decoder.last_error() != DecoderError::None {
        return None;
    }
    let length = instruction.len();
    let bytes = bytes[..length].to_vec();
    let address_size = address_size(bitness, &bytes);
    Some(Decoded {
        instruction,
        bytes,
        address_size,
    })
}

/// Up to 15 bytes at CS:RIP. A fetch that would cross into a page that faults stops at
/// the page end; the decoder then asks for more only if the instruction really goes on,
/// and that fetch raises the fault the CPU would.
fn fetch(cpu: &Cpu<'_>, memory: &GuestView<'_>) -> Result<Vec<u8>, Stop> {
    let rip = cpu.regs.rip;
    let linear =
        linear_address(cpu, iced_x86::Register::CS, rip, 1, Intent::Read).map_err(Stop::Fault)?;
    let access = Access {
        fetch: true,
        user: cpu.cpl() == 3,
        ..Access::default()
    };
    let in_page = (4096 - (linear & 4095)) as usize;
    let mut bytes = vec![0u8; in_page.min(MAX_LENGTH)];
    memory.read(linear, &mut bytes, access)?;
    if bytes.len() < MAX_LENGTH && try_decode(cpu.bitness(), rip, &bytes).is_none() {
        let mut rest = vec![0u8; MAX_LENGTH - bytes.len()];
        memory.read(linear.wrapping_add(bytes.len() as u64), &mut rest, access)?;
        bytes.extend_from_slice(&rest);
    }
    Ok(bytes)
}

/// Legacy prefixes come first; a 0x67 among them toggles the address size.
fn address_size(bitness: u32, bytes: &[u8]) -> u32 {
    let toggled = bytes
        .iter()
        .take_while(|b| {
            matches!(
                b,
                0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3
            )
        })
        .any(|&b| b == 0x67);
    match (bitness, toggled) {
        (64, false) => 8,
        (64, true) | (32, false) | (16, true) => 4,
        _ => 2,
    }
}

/// Whether the instruction carries an operand-size (0x66) legacy prefix.
pub fn has_prefix(bytes: &[u8], prefix: u8) -> bool {
    bytes
        .iter()
        .take_while(|b| {
            matches!(
                b,
                0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3
            )
        })
        .any(|&b| b == prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_comes_from_the_decoder_not_the_exit() {
        // CLAC followed by the rest of KVM's 15 bytes.
        let bytes = [
            0x0f, 0x01, 0xca, 0x90, 0x90, 0xcc, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let decoded = try_decode(64, 0x1000, &bytes).unwrap();
        assert_eq!(decoded.bytes, vec![0x0f, 0x01, 0xca]);
        assert_eq!(decoded.next_rip(), 0x1003);
        assert_eq!(decoded.instruction.mnemonic(), iced_x86::Mnemonic::Clac);
    }

    #[test]
    fn truncated_bytes_do_not_decode() {
        assert!(try_decode(64, 0, &[0xf3, 0x48, 0x0f]).is_none());
    }

    #[test]
    fn address_size_prefix() {
        assert_eq!(address_size(64, &[0x67, 0xf3, 0x0f, 0xb8, 0x03]), 4);
        assert_eq!(address_size(64, &[0xf3, 0x0f, 0xb8, 0x03]), 8);
        assert_eq!(address_size(32, &[0x0f, 0xae, 0x00]), 4);
        assert_eq!(address_size(16, &[0x67, 0x0f, 0xae, 0x00]), 4);
    }
}
