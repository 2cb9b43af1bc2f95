//! RDTSCP and RDPID as SDM Vol. 2B describes them, without a vCPU: the privilege check
//! and the registers written from the MSR values.

use iced_x86::{Decoder, DecoderOptions};

use super::*;

fn decode(bitness: u32, bytes: &[u8]) -> Instruction {
    let instruction = Decoder::with_ip(bitness, bytes, 0, DecoderOptions::NONE).decode();
    assert!(!instruction.is_invalid(), "{bytes:02x?}");
    instruction
}

const RDTSCP: [u8; 3] = [0x0f, 0x01, 0xf9];
/// RDPID r11 (F3 REX.B 0F C7 /7) in 64-bit mode.
const RDPID_R11: [u8; 5] = [0xf3, 0x41, 0x0f, 0xc7, 0xfb];
/// RDPID eax (F3 0F C7 /7) in 32-bit mode.
const RDPID_EAX: [u8; 4] = [0xf3, 0x0f, 0xc7, 0xf8];

/// SDM Vol. 2B RDTSCP, protected-mode exceptions: #GP(0) when CR4.TSD = 1 and CPL > 0;
/// CPL 0, or CR4.TSD = 0, reads TSC and TSC_AUX.
#[test]
fn rdtscp_honours_cr4_tsd_above_cpl_0() {
    let rdtscp = decode(64, &RDTSCP);
    assert_eq!(
        msrs_to_read(&rdtscp, CR4_TSD, 3),
        Err(Fault::GeneralProtection(0))
    );
    assert_eq!(
        msrs_to_read(&rdtscp, CR4_TSD, 1),
        Err(Fault::GeneralProtection(0))
    );
    assert_eq!(
        msrs_to_read(&rdtscp, CR4_TSD, 0),
        Ok(&[MSR_IA32_TSC, MSR_IA32_TSC_AUX][..])
    );
    assert_eq!(
        msrs_to_read(&rdtscp, 0, 3),
        Ok(&[MSR_IA32_TSC, MSR_IA32_TSC_AUX][..])
    );
}

/// SDM Vol. 2B RDPID: no CR4.TSD or CPL check; it reads only IA32_TSC_AUX.
#[test]
fn rdpid_has_no_privilege_check() {
    let rdpid = decode(64, &RDPID_R11);
    assert_eq!(
        msrs_to_read(&rdpid, CR4_TSD, 3),
        Ok(&[MSR_IA32_TSC_AUX][..])
    );
}

/// SDM Vol. 2B RDTSCP: "EDX:EAX := TimeStampCounter; ECX := IA32_TSC_AUX[31:0]", the
/// high halves of RAX, RDX and RCX cleared in 64-bit mode (32-bit register writes).
#[test]
fn rdtscp_splits_the_tsc_and_returns_tsc_aux_in_ecx() {
    let rdtscp = decode(64, &RDTSCP);
    let tsc = 0x1234_5678_9abc_def0;
    let aux = 0xdead_0000_0000_0007;
    assert_eq!(
        results(&rdtscp, &[tsc, aux]),
        vec![
            (Register::EAX, 0x9abc_def0),
            (Register::EDX, 0x1234_5678),
            (Register::ECX, 7),
        ]
    );
}

/// SDM Vol. 2B RDPID: "IF 64-bit Mode THEN DEST[63:0] := IA32_TSC_AUX[63:0] ELSE
/// DEST[31:0] := IA32_TSC_AUX[31:0]": the operand names the register and its width.
#[test]
fn rdpid_writes_tsc_aux_into_its_operand() {
    let aux = 0x0000_0001_0000_0042;
    assert_eq!(
        results(&decode(64, &RDPID_R11), &[aux]),
        vec![(Register::R11, aux)]
    );
    assert_eq!(
        results(&decode(32, &RDPID_EAX), &[aux]),
        vec![(Register::EAX, 0x42)]
    );
}
