//! The one way kvmfast copies bytes to and from memory that others change underneath:
//! guest RAM (other vCPUs run while a completion reads or writes it, and the page
//! walker updates it through atomics) and the vCPU's `kvm_run` page (the kernel's).
//!
//! Plain `copy_nonoverlapping` on such memory is a data race in Rust's model, which
//! lets the compiler split, merge or repeat the accesses. These helpers use vm-memory's
//! `VolatileSlice` (rust-vmm's guest-memory crate, as its VMMs do): never a Rust
//! reference to the shared bytes, and copies of up to 8 bytes made of volatile loads
//! and stores of the widest width both ends' alignment allows. The small copies are
//! staged through an 8-byte-aligned word, so that the guest side alone decides that
//! width: a naturally aligned access of 2, 4 or 8 bytes is one load or store, as on
//! the CPU (SDM Vol. 3A 9.1.1, guaranteed atomic operations), and a racing vCPU never
//! sees it torn. Longer copies are vm-memory's too (a memcpy on raw pointers), as the
//! CPU guarantees nothing for them either.

use vm_memory::VolatileSlice;

/// The widest access the CPU makes atomically when aligned, and so the largest copy
/// that is staged.
const WORD: usize = 8;

/// A stage whose alignment never narrows the guest side's accesses.
#[repr(C, align(8))]
#[derive(Default)]
struct Word([u8; WORD]);

/// Copies `out.len()` bytes from `source` into `out`.
///
/// # Safety
/// `source` must be valid for reads of `out.len()` bytes for the whole call (mapped,
/// and not freed meanwhile); other threads and the kernel may write it concurrently.
pub unsafe fn read(source: *const u8, out: &mut [u8]) {
    // SAFETY: the caller guarantees the range; VolatileSlice only ever reaches it
    // through volatile accesses or a raw-pointer copy, never a reference.
    let shared = unsafe { VolatileSlice::new(source.cast_mut(), out.len()) };
    if out.len() <= WORD {
        let mut word = Word::default();
        shared.copy_to(&mut word.0[..out.len()]);
        out.copy_from_slice(&word.0[..out.len()]);
    } else {
        shared.copy_to(out);
    }
}

/// Copies `data` to `destination`.
///
/// # Safety
/// `destination` must be valid for writes of `data.len()` bytes for the whole call;
/// other threads and the kernel may read or write it concurrently.
pub unsafe fn write(destination: *mut u8, data: &[u8]) {
    // SAFETY: as in read.
    let shared = unsafe { VolatileSlice::new(destination, data.len()) };
    if data.len() <= WORD {
        let mut word = Word::default();
        word.0[..data.len()].copy_from_slice(data);
        shared.copy_from(&word.0[..data.len()]);
    } else {
        shared.copy_from(data);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use super::*;

    fn pattern(length: usize) -> Vec<u8> {
        (0..length).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn every_length_and_offset_round_trips_and_touches_nothing_else() {
        for length in 0..=40 {
            for offset in 0..WORD {
                let data = pattern(length);
                let mut memory = vec![0xEEu8; 64];
                // SAFETY: offset + length <= 48 < 64.
                unsafe { write(memory.as_mut_ptr().add(offset), &data) };
                assert!(memory[..offset].iter().all(|&b| b == 0xEE));
                assert_eq!(&memory[offset..offset + length], &data[..]);
                assert!(memory[offset + length..].iter().all(|&b| b == 0xEE));
                let mut out = vec![0u8; length];
                // SAFETY: as above.
                unsafe { read(memory.as_ptr().add(offset), &mut out) };
                assert_eq!(out, data, "length {length} offset {offset}");
            }
        }
    }

    /// Two values no torn mix of which equals either.
    const A: u64 = 0;
    const B: u64 = u64::MAX;
    const RACE: Duration = Duration::from_millis(100);

    /// Runs `flip` (A, then B, again and again) on another thread, as a racing vCPU
    /// would, while this one calls `whole` for RACE; the number of torn values seen.
    fn torn_while(
        word: &Arc<AtomicU64>,
        flip: impl Fn(&AtomicU64, u64) + Send + 'static,
        whole: impl Fn(&AtomicU64) -> bool,
    ) -> usize {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (word, stop, started) = (word.clone(), stop.clone(), started.clone());
            std::thread::spawn(move || {
                started.store(true, Ordering::SeqCst);
                while !stop.load(Ordering::Relaxed) {
                    flip(&word, B);
                    flip(&word, A);
                }
            })
        };
        while !started.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        let until = Instant::now() + RACE;
        let mut torn = 0;
        while Instant::now() < until {
            torn += (0..1000).filter(|_| !whole(word)).count();
        }
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
        torn
    }

    #[test]
    fn an_aligned_word_is_read_whole_into_any_buffer() {
        let word = Arc::new(AtomicU64::new(A));
        let flip = |word: &AtomicU64, value| word.store(value, Ordering::Relaxed);
        let torn = torn_while(&word, flip, |word| {
            // An odd destination: vm-memory alone would copy it byte by byte.
            let mut buffer = [0u8; WORD + 1];
            // SAFETY: the atomic's 8 bytes, live for the call.
            unsafe { read(word.as_ptr().cast(), &mut buffer[1..]) };
            let value = u64::from_le_bytes(buffer[1..].try_into().unwrap());
            value == A || value == B
        });
        assert_eq!(torn, 0, "torn reads of an aligned word");
    }

    #[test]
    fn an_aligned_word_is_written_whole_from_any_buffer() {
        let word = Arc::new(AtomicU64::new(A));
        let flip = |word: &AtomicU64, value: u64| {
            // An odd source, for the same reason.
            let mut buffer = [0u8; WORD + 1];
            buffer[1..].copy_from_slice(&value.to_le_bytes());
            // SAFETY: the atomic's 8 bytes, live while the flipper runs.
            unsafe { write(word.as_ptr().cast(), &buffer[1..]) };
        };
        let torn = torn_while(&word, flip, |word| {
            let value = word.load(Ordering::Relaxed);
            value == A || value == B
        });
        assert_eq!(torn, 0, "torn writes of an aligned word");
    }
}
