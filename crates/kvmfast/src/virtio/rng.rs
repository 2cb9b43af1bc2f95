//! virtio-rng requests (virtio 1.2 section 5.4): every writable byte of a chain filled
//! from the host's getrandom.

use super::chain::Chain;
use super::counters::{DeviceCounters, bump};
use super::guest_memory::Memory;
use super::queue::Completion;

/// The most bytes one request gets: a chain may offer up to 4 GiB, and the loop thread
/// has other doorbells to serve. The used length tells the driver how many it got.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// Fills the chain's writable part from its start. Readable buffers carry nothing for
/// this device and are ignored.
pub fn execute(memory: &Memory, chain: &Chain, counters: &DeviceCounters) -> Completion {
    let wanted = chain.writable.total().min(MAX_REQUEST_BYTES) as usize;
    let mut bytes = vec![0u8; wanted];
    let filled = getrandom(&mut bytes);
    let (target, _) = chain.writable.split_at(filled as u64);
    let written = if target.write(memory, &bytes[..filled]) {
        filled
    } else {
        0
    };
    bump(&counters.read_bytes, written as u64);
    Completion {
        head: chain.head,
        used_len: written as u32,
    }
}

/// As many random bytes as getrandom gives (it blocks only before the host's pool is
/// initialised, long past by the time a VM runs); a failure gives what was filled.
fn getrandom(out: &mut [u8]) -> usize {
    let mut done = 0;
    while done < out.len() {
        let rest = &mut out[done..];
        // SAFETY: getrandom writes at most rest.len() bytes into the buffer we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        done += n as usize;
    }
    done
}
