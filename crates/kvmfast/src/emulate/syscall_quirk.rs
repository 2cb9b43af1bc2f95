//! The SYSCALL host quirk: to be completed.

use super::Stop;
use super::cpu::Cpu;
use super::linear::GuestMemory;

pub const NAME: &str = "syscall_keeps_user_cs";

pub fn repair(_cpu: &mut Cpu<'_>, _memory: &GuestMemory<'_>) -> Result<bool, Stop> {
    Ok(false)
}
