//! SSE..SSSE3 computations run on the host: to be completed.

use super::{Completion, Stop};

#[derive(Default)]
pub struct StubCache;

pub fn allowed(_instruction: &iced_x86::Instruction) -> bool {
    false
}

pub fn complete(_c: &mut Completion<'_>, _stubs: &mut StubCache) -> Result<(), Stop> {
    Err(Stop::Unsupported("SSE".into()))
}
