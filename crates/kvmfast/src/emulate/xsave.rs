//! The XSAVE family (SDM Vol. 1 chapter 13): to be completed.

use super::{Completion, Stop};

pub fn complete(c: &mut Completion<'_>) -> Result<(), Stop> {
    Err(Stop::Unsupported(format!(
        "{:?} is not completed yet",
        c.decoded.instruction.mnemonic()
    )))
}
