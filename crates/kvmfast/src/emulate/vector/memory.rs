//! Which bytes of a vector memory operand the instruction really touches.
//!
//! A masked load reads only its selected elements and an expand load only as many
//! leading elements as the mask selects (SDM Vol. 1 15.6.2, "memory fault
//! suppression": masked-off elements are never accessed). A store-only operand is
//! never read, and a masked or compressing store writes only its selected elements,
//! so that a device sees no read and another vCPU's write to a masked-off byte is
//! kept. Which bytes a store writes is found by running it twice over bounce buffers
//! of opposite contents: a byte it writes comes out the same from both, a byte it
//! leaves keeps the buffer's own value.

use std::ops::Range;

use iced_x86::{Instruction, Mnemonic, Register};

/// The first bounce contents of the two store runs; the second is its complement.
pub const FIRST_FILL: u8 = 0x00;
pub const SECOND_FILL: u8 = 0xff;

/// The bytes a store wrote, from the bounce buffers of the two runs.
pub fn written_bytes(first: &[u8], second: &[u8]) -> Vec<bool> {
    first.iter().zip(second).map(|(a, b)| a == b).collect()
}

/// The bytes a load of `size` bytes reads, given the value of its opmask (ignored
/// when the instruction has none).
pub fn read_bytes(
    instruction: &Instruction,
    size: usize,
    element_size: usize,
    k: u64,
) -> Vec<bool> {
    if instruction.op_mask() == Register::None
        || instruction.is_broadcast()
        || element_size == 0
        || size % element_size != 0
    {
        return vec![true; size];
    }
    let elements = size / element_size;
    let in_range = if elements >= 64 {
        u64::MAX
    } else {
        (1u64 << elements) - 1
    };
    let selected = k & in_range;
    let mut bytes = vec![false; size];
    if is_expand(instruction.mnemonic()) {
        let count = selected.count_ones() as usize;
        bytes[..count * element_size].fill(true);
    } else {
        for element in 0..elements {
            if selected >> element & 1 != 0 {
                bytes[element * element_size..(element + 1) * element_size].fill(true);
            }
        }
    }
    bytes
}

fn is_expand(mnemonic: Mnemonic) -> bool {
    matches!(
        mnemonic,
        Mnemonic::Vpexpandb
            | Mnemonic::Vpexpandw
            | Mnemonic::Vpexpandd
            | Mnemonic::Vpexpandq
            | Mnemonic::Vexpandps
            | Mnemonic::Vexpandpd
    )
}

/// The selected bytes as contiguous ranges, in order: the accesses to make.
pub fn runs(selected: &[bool]) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut start = None;
    for (index, &byte) in selected.iter().enumerate() {
        match (byte, start) {
            (true, None) => start = Some(index),
            (false, Some(from)) => {
                runs.push(from..index);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(from) = start {
        runs.push(from..selected.len());
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn decode(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE).decode()
    }

    #[test]
    fn runs_are_the_contiguous_selected_ranges() {
        let selected = [true, true, false, false, true, false, true, true];
        assert_eq!(runs(&selected), vec![0..2, 4..5, 6..8]);
        assert_eq!(runs(&[false; 4]), Vec::<Range<usize>>::new());
        assert_eq!(runs(&[true; 4]), vec![0..4]);
    }

    #[test]
    fn a_byte_the_store_leaves_differs_between_the_runs() {
        let first = [FIRST_FILL, 7, 7, FIRST_FILL];
        let second = [SECOND_FILL, 7, 7, SECOND_FILL];
        assert_eq!(
            written_bytes(&first, &second),
            vec![false, true, true, false]
        );
    }

    #[test]
    fn two_runs_of_a_masked_store_find_its_selected_elements() {
        use super::super::stub::{Exchange, StubCache, Width};
        if !std::arch::is_x86_feature_detected!("avx512bw") {
            return; // the ZMM stub cannot run here; the selection is tested above
        }
        // vmovdqu32 [rax]{k1}, zmm0 with k1 = elements 0 and 2
        let store = decode(&[0x62, 0xf1, 0x7e, 0x49, 0x7f, 0x00]);
        let mut first = Exchange {
            mxcsr: 0x1f80,
            ..Exchange::default()
        };
        first.zmm[0] = [0x11; 64];
        first.k[1] = 0b101;
        let mut second = first.clone();
        first.bounce.fill(FIRST_FILL);
        second.bounce.fill(SECOND_FILL);
        let mut stubs = StubCache::default();
        assert!(stubs.run(&store, Width::Zmm, &mut first).is_ok());
        assert!(stubs.run(&store, Width::Zmm, &mut second).is_ok());
        let written = written_bytes(&first.bounce, &second.bounce);
        assert_eq!(runs(&written), vec![0..4, 8..12]);
        assert_eq!(first.bounce[..4], [0x11; 4]);
    }

    #[test]
    fn a_masked_load_reads_its_selected_elements_only() {
        // vmovdqu32 zmm1{k1}, [rax]
        let load = decode(&[0x62, 0xf1, 0x7e, 0x49, 0x6f, 0x08]);
        assert_eq!(load.op_mask(), Register::K1);
        let bytes = read_bytes(&load, 64, 4, 0b1000_0000_0000_0101);
        let expected: Vec<bool> = (0..64).map(|byte| matches!(byte / 4, 0 | 2 | 15)).collect();
        assert_eq!(bytes, expected);
        // Bits above the vector's elements select nothing.
        assert!(read_bytes(&load, 64, 4, 0xffff_0000).iter().all(|&b| !b));
        // vmovdqu32 zmm1, [rax]: no mask, every byte.
        let plain = decode(&[0x62, 0xf1, 0x7e, 0x48, 0x6f, 0x08]);
        assert!(read_bytes(&plain, 64, 4, 0).iter().all(|&b| b));
    }

    #[test]
    fn an_expand_load_reads_as_many_leading_elements_as_selected() {
        // vpexpandd zmm1{k1}, [rax]
        let expand = decode(&[0x62, 0xf2, 0x7d, 0x49, 0x89, 0x08]);
        assert_eq!(expand.mnemonic(), Mnemonic::Vpexpandd);
        let bytes = read_bytes(&expand, 64, 4, 0b1010_0000_0000_0001);
        assert_eq!(bytes.iter().filter(|&&b| b).count(), 12);
        assert!(bytes[..12].iter().all(|&b| b));
    }
}
