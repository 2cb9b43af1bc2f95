//! The host side of a virtio-blk device: a raw image file, locked against a second
//! user, read and written at offsets (O_DIRECT through an aligned bounce buffer).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};

pub const SECTOR_SIZE: u64 = 512;

/// O_DIRECT needs buffers, offsets and lengths aligned to the host device's logical
/// block; a page covers every common one.
const BOUNCE_ALIGN: usize = 4096;

#[derive(Debug)]
pub enum OpenError {
    Open { path: String, error: io::Error },
    Locked { path: String },
    Lock { path: String, error: io::Error },
    NotADisk { path: String },
    TooSmall { path: String, size: u64 },
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open { path, error } => write!(f, "cannot open disk image {path}: {error}"),
            Self::Locked { path } => {
                write!(f, "disk image {path} is in use by another process (locked)")
            }
            Self::Lock { path, error } => write!(f, "cannot lock disk image {path}: {error}"),
            Self::NotADisk { path } => {
                write!(
                    f,
                    "disk image {path} is neither a regular file nor a block device"
                )
            }
            Self::TooSmall { path, size: 0 } => write!(f, "disk image {path} is empty"),
            Self::TooSmall { path, size } => write!(
                f,
                "disk image {path} is {size} bytes, less than one {SECTOR_SIZE}-byte sector"
            ),
        }
    }
}

#[derive(Debug)]
pub struct Disk {
    file: File,
    size: u64,
    readonly: bool,
    direct: bool,
    device: u64,
    inode: u64,
}

impl Disk {
    /// Opens `path` and takes flock(LOCK_EX) (LOCK_SH when read-only) without waiting:
    /// two writers, or a writer and a reader, never share an image.
    pub fn open(path: &str, readonly: bool, direct: bool) -> Result<Self, OpenError> {
        let open_error = |error| OpenError::Open {
            path: path.to_string(),
            error,
        };
        let mut options = OpenOptions::new();
        options.read(true).write(!readonly);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(open_error)?;
        let metadata = file.metadata().map_err(open_error)?;
        let kind = metadata.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(OpenError::NotADisk {
                path: path.to_string(),
            });
        }
        let operation = if readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock takes an open fd and flags; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), operation | libc::LOCK_NB) } < 0 {
            let error = io::Error::last_os_error();
            return Err(if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                OpenError::Locked {
                    path: path.to_string(),
                }
            } else {
                OpenError::Lock {
                    path: path.to_string(),
                    error,
                }
            });
        }
        // A block device's metadata says 0 bytes: its end says how long it is.
        let size = (&file).seek(SeekFrom::End(0)).map_err(open_error)?;
        if size < SECTOR_SIZE {
            return Err(OpenError::TooSmall {
                path: path.to_string(),
                size,
            });
        }
        Ok(Self {
            file,
            size,
            readonly,
            direct,
            device: metadata.dev(),
            inode: metadata.ino(),
        })
    }

    /// Whole 512-byte sectors (a partial last sector is not addressable).
    /// Lets another process lock the image (the device is closed and does no more I/O).
    pub fn unlock(&self) {
        // SAFETY: flock takes an open fd and flags; no memory is involved.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }

    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// A serial when the user gave none: the image's device and inode, stable across
    /// runs, as Cloud Hypervisor derives one.
    pub fn default_serial(&self) -> String {
        format!("{:x}{:x}", self.device, self.inode)
    }

    pub fn read_exact_at(&self, out: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(out, offset)
    }

    pub fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// fdatasync: what was written is on stable storage before the request completes.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, length: u64) -> io::Result<()> {
        let (Ok(offset), Ok(length)) =
            (libc::off_t::try_from(offset), libc::off_t::try_from(length))
        else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        loop {
            // SAFETY: fallocate takes an open fd and integers; no memory is involved.
            if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, length) } == 0 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }

    /// Deallocates the range; it reads back as zeroes.
    pub fn punch_hole(&self, offset: u64, length: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            length,
        )
    }

    /// Makes the range read as zeroes: keeping it allocated (ZERO_RANGE) unless
    /// `unmap`, then by a hole, then (a file system with neither) by writing zeroes.
    pub fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        unmap: bool,
        bounce: &mut Bounce,
    ) -> io::Result<()> {
        let unsupported = |e: &io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
            )
        };
        if !unmap {
            match self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                length,
            ) {
                Err(e) if unsupported(&e) => {}
                other => return other,
            }
        }
        match self.punch_hole(offset, length) {
            Err(e) if unsupported(&e) => {}
            other => return other,
        }
        let mut done = 0;
        while done < length {
            let chunk = bounce.zeroed((length - done).min(BOUNCE_CHUNK as u64) as usize);
            self.write_all_at(chunk, offset + done)?;
            done += chunk.len() as u64;
        }
        Ok(())
    }

    pub fn direct(&self) -> bool {
        self.direct
    }
}

/// The most bytes one host read or write moves.
pub const BOUNCE_CHUNK: usize = 1 << 20;

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Block([u8; BOUNCE_ALIGN]);

/// A page-aligned buffer reused across requests: guest buffers go through it on their
/// way to and from the image (vm-memory's volatile copies on the guest side, never a raw
/// host pointer into guest RAM handed to a system call; and aligned for O_DIRECT).
#[derive(Default)]
pub struct Bounce {
    blocks: Vec<Block>,
}

impl Bounce {
    /// The first `length` bytes (at most BOUNCE_CHUNK), contents unspecified.
    pub fn get(&mut self, length: usize) -> &mut [u8] {
        let length = length.min(BOUNCE_CHUNK);
        let blocks = length.div_ceil(BOUNCE_ALIGN);
        if self.blocks.len() < blocks {
            self.blocks.resize(blocks, Block([0; BOUNCE_ALIGN]));
        }
        // SAFETY: Block is repr(C) with one byte array and no padding (its size is its
        // alignment), so the first `blocks` blocks are `blocks * BOUNCE_ALIGN` initialised
        // bytes, borrowed mutably from self for the slice's lifetime.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                self.blocks.as_mut_ptr().cast::<u8>(),
                blocks * BOUNCE_ALIGN,
            )
        };
        &mut bytes[..length]
    }

    pub fn zeroed(&mut self, length: usize) -> &mut [u8] {
        let buffer = self.get(length);
        buffer.fill(0);
        buffer
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::super::test_ring::TempImage;
    use super::*;

    fn image(bytes: usize) -> TempImage {
        TempImage::new(bytes)
    }

    #[test]
    fn open_refuses_missing_empty_and_locked_images() {
        let missing = Disk::open("/nonexistent/kvmfast.img", false, false).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/kvmfast.img"));
        let empty = image(0);
        let error = Disk::open(empty.path(), false, false).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("disk image {} is empty", empty.path())
        );
        let disk = image(4096);
        let first = Disk::open(disk.path(), false, false).unwrap();
        let second = Disk::open(disk.path(), false, false).unwrap_err();
        assert!(matches!(second, OpenError::Locked { .. }), "{second}");
        assert!(second.to_string().contains("in use by another process"));
        assert!(Disk::open(disk.path(), true, false).is_err());
        drop(first);
        let reader = Disk::open(disk.path(), true, false).unwrap();
        let other_reader = Disk::open(disk.path(), true, false).unwrap();
        assert!(Disk::open(disk.path(), false, false).is_err());
        drop((reader, other_reader));
        assert!(Disk::open("/", true, false).is_err());
    }

    #[test]
    fn write_zeroes_reads_back_zeroes_either_way() {
        let path = image(0);
        std::fs::File::create(&path.path)
            .unwrap()
            .write_all(&[0xAB; 16384])
            .unwrap();
        let disk = Disk::open(path.path(), false, false).unwrap();
        assert_eq!(disk.sectors(), 32);
        let mut bounce = Bounce::default();
        disk.write_zeroes(4096, 4096, false, &mut bounce).unwrap();
        disk.write_zeroes(9000, 100, true, &mut bounce).unwrap();
        let mut back = vec![0u8; 16384];
        disk.read_exact_at(&mut back, 0).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0xAB));
        assert!(back[4096..8192].iter().all(|&b| b == 0));
        assert!(back[8192..9000].iter().all(|&b| b == 0xAB));
        assert!(back[9000..9100].iter().all(|&b| b == 0));
        assert!(back[9100..].iter().all(|&b| b == 0xAB));
    }

    #[test]
    fn bounce_buffers_are_page_aligned() {
        let mut bounce = Bounce::default();
        assert_eq!(bounce.get(100).len(), 100);
        assert_eq!(bounce.get(5000).as_ptr() as usize % BOUNCE_ALIGN, 0);
        assert_eq!(bounce.get(BOUNCE_CHUNK + 1).len(), BOUNCE_CHUNK);
    }
}
