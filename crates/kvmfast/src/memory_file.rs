//! Guest RAM to and from a memory file: checking a backing file before it is mapped,
//! reading it eagerly (holes skipped), and writing a slot's non-zero pages (a sparse
//! file: its zero pages stay holes).
//!
//! Independent of how RAM is mapped (memory.rs): the callers hand in reads and writes
//! of their mapping.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use pyo3::PyErr;
use pyo3::exceptions::{PyOSError, PyValueError};

pub const PAGE_SIZE: usize = 4096;
/// What one read or write moves: large enough for few system calls, small enough to
/// stage in the heap.
const CHUNK: usize = 1 << 20;
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

#[derive(Debug)]
pub enum BackingError {
    /// The file cannot be opened or read.
    Io {
        path: PathBuf,
        error: io::Error,
    },
    /// It ends before backing_offset + size.
    TooShort {
        path: PathBuf,
        file_size: u64,
        offset: u64,
        size: u64,
    },
    Unaligned {
        path: PathBuf,
        offset: u64,
    },
}

impl fmt::Display for BackingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, error } => write!(f, "memory file {}: {error}", path.display()),
            Self::TooShort {
                path,
                file_size,
                offset,
                size,
            } => write!(
                f,
                "memory file {} is {file_size:#x} bytes, shorter than offset {offset:#x} + \
                 size {size:#x}",
                path.display()
            ),
            Self::Unaligned { path, offset } => write!(
                f,
                "memory file {}: offset {offset:#x} is not a multiple of {PAGE_SIZE:#x}",
                path.display()
            ),
        }
    }
}

impl From<BackingError> for PyErr {
    fn from(error: BackingError) -> Self {
        let text = error.to_string();
        match error {
            BackingError::Io { path, error } => PyOSError::new_err((
                error.raw_os_error().unwrap_or(libc::EIO),
                text,
                path.display().to_string(),
            )),
            BackingError::TooShort { .. } | BackingError::Unaligned { .. } => {
                PyValueError::new_err(text)
            }
        }
    }
}

/// Opens `path` read-only and checks that [offset, offset+size) lies inside it.
pub fn open_backing(path: &Path, offset: u64, size: u64) -> Result<File, BackingError> {
    let io_error = |error| BackingError::Io {
        path: path.to_path_buf(),
        error,
    };
    if offset % PAGE_SIZE as u64 != 0 {
        return Err(BackingError::Unaligned {
            path: path.to_path_buf(),
            offset,
        });
    }
    let file = File::open(path).map_err(io_error)?;
    let file_size = file.metadata().map_err(io_error)?.len();
    if offset.checked_add(size).is_none_or(|end| end > file_size) {
        return Err(BackingError::TooShort {
            path: path.to_path_buf(),
            file_size,
            offset,
            size,
        });
    }
    Ok(file)
}

/// lseek(SEEK_DATA / SEEK_HOLE): None at the end (ENXIO); a file system without them
/// answers as if the file were all data.
fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let from =
        libc::off_t::try_from(from).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek on a file we own changes only its offset, which nothing else uses
    // (reads are positioned).
    let at = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if at >= 0 {
        return Ok(Some(at as u64));
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(error),
    }
}

/// The data ranges of [start, end), as (offset, length): holes need not be read.
fn data_ranges(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    let mut at = start;
    while at < end {
        let data = match seek(file, at, libc::SEEK_DATA) {
            Ok(Some(data)) => data,
            Ok(None) => break,
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(vec![(start, end - start)]);
            }
            Err(error) => return Err(error),
        };
        if data >= end {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        ranges.push((data, hole - data));
        at = hole;
    }
    Ok(ranges)
}

/// Reads [offset, offset+size) of `file` and hands each piece of data to
/// `write(position in the range, bytes)`; holes are skipped (the destination is zeroed
/// memory).
pub fn copy_from_file(
    path: &Path,
    file: &File,
    offset: u64,
    size: u64,
    mut write: impl FnMut(usize, &[u8]),
) -> Result<(), BackingError> {
    let io_error = |error| BackingError::Io {
        path: path.to_path_buf(),
        error,
    };
    let end = offset + size;
    let mut buffer = vec![0u8; CHUNK];
    for (start, length) in data_ranges(file, offset, end).map_err(io_error)? {
        let mut at = start;
        while at < start + length {
            let piece = (start + length - at).min(CHUNK as u64) as usize;
            file.read_exact_at(&mut buffer[..piece], at)
                .map_err(|error| {
                    if error.kind() == io::ErrorKind::UnexpectedEof {
                        // Cut short since open_backing measured it.
                        BackingError::TooShort {
                            path: path.to_path_buf(),
                            file_size: at,
                            offset,
                            size,
                        }
                    } else {
                        io_error(error)
                    }
                })?;
            write((at - offset) as usize, &buffer[..piece]);
            at += piece as u64;
        }
    }
    Ok(())
}

/// pwrite()s every page of a `size`-byte region that is not all zeros to `fd` at
/// `file_offset` + its offset, runs of them in one call; `read(offset, out)` copies the
/// region's bytes. Returns the bytes written.
pub fn save_pages(
    size: usize,
    mut read: impl FnMut(usize, &mut [u8]),
    fd: libc::c_int,
    file_offset: u64,
) -> io::Result<u64> {
    let mut buffer = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut at = 0;
    while at < size {
        let chunk = &mut buffer[..(size - at).min(CHUNK)];
        read(at, chunk);
        let mut page = 0;
        while page < chunk.len() {
            let is_data = |p: usize| chunk[p..(p + PAGE_SIZE).min(chunk.len())] != ZERO_PAGE[..];
            if !is_data(page) {
                page += PAGE_SIZE;
                continue;
            }
            let run_start = page;
            while page < chunk.len() && is_data(page) {
                page += PAGE_SIZE;
            }
            let run = &chunk[run_start..page.min(chunk.len())];
            write_all_at(fd, run, file_offset + (at + run_start) as u64)?;
            written += run.len() as u64;
        }
        at += chunk.len();
    }
    Ok(written)
}

fn write_all_at(fd: libc::c_int, mut data: &[u8], mut position: u64) -> io::Result<()> {
    while !data.is_empty() {
        let at = libc::off_t::try_from(position)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: pwrite reads data.len() bytes from a slice we hold; the fd is the
        // caller's, and a bad one is EBADF.
        let done = unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), at) };
        match done {
            d if d > 0 => {
                data = &data[d as usize..];
                position += d as u64;
            }
            0 => return Err(io::Error::from_raw_os_error(libc::EIO)),
            _ => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A file under the temporary directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new() -> Self {
            static COUNT: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "kvmfast-memory-file-{}-{}",
                std::process::id(),
                COUNT.fetch_add(1, Ordering::SeqCst)
            );
            Self(std::env::temp_dir().join(name))
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn pages(marks: &[(usize, u8)], count: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; count * PAGE_SIZE];
        for &(page, byte) in marks {
            bytes[page * PAGE_SIZE + 7] = byte;
        }
        bytes
    }

    #[test]
    fn save_writes_only_pages_with_data_and_leaves_holes() {
        let temp = TempFile::new();
        let file = File::create(&temp.0).unwrap();
        // Spans two chunks, with a run across the chunk boundary.
        let count = 2 * CHUNK / PAGE_SIZE + 3;
        let source = pages(&[(1, 1), (2, 2), (255, 3), (256, 4), (count - 1, 5)], count);
        file.set_len((PAGE_SIZE + source.len()) as u64).unwrap();
        let written = save_pages(
            source.len(),
            |at, out| out.copy_from_slice(&source[at..at + out.len()]),
            file.as_raw_fd(),
            PAGE_SIZE as u64,
        )
        .unwrap();
        assert_eq!(written, 5 * PAGE_SIZE as u64);
        let back = std::fs::read(&temp.0).unwrap();
        assert_eq!(&back[PAGE_SIZE..], &source[..]);
        let allocated = std::fs::metadata(&temp.0).unwrap().blocks() * 512;
        assert!(
            allocated <= 8 * PAGE_SIZE as u64,
            "{allocated} bytes allocated"
        );
    }

    #[test]
    fn save_reports_a_bad_fd() {
        let source = pages(&[(0, 1)], 1);
        let error = save_pages(
            source.len(),
            |at, out| out.copy_from_slice(&source[at..at + out.len()]),
            -1,
            0,
        )
        .unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn copy_reads_data_and_skips_holes() {
        let temp = TempFile::new();
        let file = File::create(&temp.0).unwrap();
        file.set_len(64 * PAGE_SIZE as u64).unwrap();
        file.write_all_at(b"first", 2 * PAGE_SIZE as u64).unwrap();
        file.write_all_at(b"last", 63 * PAGE_SIZE as u64).unwrap();
        let file = open_backing(&temp.0, PAGE_SIZE as u64, 63 * PAGE_SIZE as u64).unwrap();
        let mut copy = vec![0u8; 63 * PAGE_SIZE];
        let mut read = 0;
        copy_from_file(
            &temp.0,
            &file,
            PAGE_SIZE as u64,
            copy.len() as u64,
            |at, data| {
                copy[at..at + data.len()].copy_from_slice(data);
                read += data.len();
            },
        )
        .unwrap();
        assert_eq!(&copy[PAGE_SIZE..PAGE_SIZE + 5], b"first");
        assert_eq!(&copy[62 * PAGE_SIZE..62 * PAGE_SIZE + 4], b"last");
        assert_eq!(copy.iter().filter(|&&b| b != 0).count(), 9);
        // Where the file system keeps holes (fewer blocks than bytes), they were not read.
        if std::fs::metadata(&temp.0).unwrap().blocks() * 512 < 16 * PAGE_SIZE as u64 {
            assert!(read < 16 * PAGE_SIZE, "{read} bytes read");
        }
    }

    #[test]
    fn backing_checks_name_the_file_and_sizes() {
        let temp = TempFile::new();
        File::create(&temp.0)
            .unwrap()
            .set_len(3 * PAGE_SIZE as u64)
            .unwrap();
        let short = open_backing(&temp.0, PAGE_SIZE as u64, 3 * PAGE_SIZE as u64).unwrap_err();
        assert!(matches!(
            short,
            BackingError::TooShort {
                file_size: 0x3000,
                ..
            }
        ));
        let text = short.to_string();
        assert!(text.contains(&temp.0.display().to_string()) && text.contains("0x3000"));
        assert!(matches!(
            open_backing(&temp.0, 100, PAGE_SIZE as u64),
            Err(BackingError::Unaligned { offset: 100, .. })
        ));
        assert!(matches!(
            open_backing(&temp.0, u64::MAX - 0xfff, PAGE_SIZE as u64),
            Err(BackingError::TooShort { .. })
        ));
        let missing = temp.0.with_extension("missing");
        match open_backing(&missing, 0, PAGE_SIZE as u64) {
            Err(BackingError::Io { error, .. }) => {
                assert_eq!(error.kind(), io::ErrorKind::NotFound)
            }
            other => panic!("{other:?}"),
        }
        assert!(open_backing(&temp.0, 0, 3 * PAGE_SIZE as u64).is_ok());
    }
}
