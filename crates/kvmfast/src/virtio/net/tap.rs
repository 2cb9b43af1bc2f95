//! A TAP interface as virtio-net's backend (Linux's Documentation/networking/tuntap.rst):
//! /dev/net/tun attached with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, so that every frame
//! read or written carries a 12-byte virtio_net_hdr (TUNSETVNETHDRSZ) in front of it,
//! the same header the guest's driver speaks. The fd is non-blocking: the event loop
//! waits for it, nobody blocks on it.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::RwLock;

use crate::locks;

use super::HEADER_SIZE;

const IFNAMSIZ: usize = 16;

/// struct ifreq as TUNSETIFF reads and fills it: the name, then ifr_flags in a union
/// 24 bytes long on 64-bit Linux.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _union_rest: [u8; 22],
}

/// What the kernel may hand us in a frame read from the TAP (TUNSETOFFLOAD's bits):
/// partial checksums, TSO of IPv4/IPv6, UFO. The guest gets only what it accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub ufo: bool,
}

impl Offloads {
    pub const NONE: Self = Self {
        csum: false,
        tso4: false,
        tso6: false,
        ufo: false,
    };

    fn flags(self) -> libc::c_uint {
        // TSO and UFO are meaningless to the kernel without CSUM (tun.c's set_offload).
        if !self.csum {
            return 0;
        }
        let mut flags = libc::TUN_F_CSUM;
        if self.tso4 {
            flags |= libc::TUN_F_TSO4;
        }
        if self.tso6 {
            flags |= libc::TUN_F_TSO6;
        }
        if self.ufo {
            flags |= libc::TUN_F_UFO;
        }
        flags
    }
}

#[derive(Debug)]
pub enum TapError {
    /// The name does not fit IFNAMSIZ or holds a NUL.
    BadName(String),
    OpenTun {
        name: String,
        error: io::Error,
    },
    /// TUNSETIFF refused (EPERM: not allowed to create or attach; EBUSY: attached elsewhere
    /// without multi-queue; EINVAL: a TUN, not a TAP, of that name).
    Attach {
        name: String,
        error: io::Error,
    },
    VnetHeader {
        name: String,
        error: io::Error,
    },
}

impl fmt::Display for TapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadName(name) => write!(
                f,
                "TAP {name:?}: not an interface name (1 to {} bytes, no NUL)",
                IFNAMSIZ - 1
            ),
            Self::OpenTun { name, error } => write!(f, "TAP {name}: /dev/net/tun: {error}"),
            Self::Attach { name, error } => {
                let why = match error.raw_os_error() {
                    Some(libc::EPERM) => "no permission (CAP_NET_ADMIN, or the TAP's owner)",
                    Some(libc::EBUSY) => "already in use by another process",
                    Some(libc::EINVAL) => "not a TAP interface (a TUN of that name?)",
                    _ => "TUNSETIFF refused",
                };
                write!(f, "TAP {name}: {why}: {error}")
            }
            Self::VnetHeader { name, error } => {
                write!(f, "TAP {name}: no 12-byte virtio-net header: {error}")
            }
        }
    }
}

#[derive(Debug)]
pub struct Tap {
    /// None once closed: the interface is let go (a TAP we created disappears).
    fd: RwLock<Option<OwnedFd>>,
    name: String,
    /// What TUNSETOFFLOAD accepted when probed at open.
    offloads: Offloads,
}

fn set_offload(fd: RawFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (the flags), no memory.
    if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Attaches to the TAP `name` (created if there is none), or to a new one whose
    /// name the kernel picks (`name` None).
    pub fn open(name: Option<&str>) -> Result<Self, TapError> {
        let mut request = IfReq {
            name: [0; IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _union_rest: [0; 22],
        };
        if let Some(name) = name {
            if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
                return Err(TapError::BadName(name.to_string()));
            }
            request.name[..name.len()].copy_from_slice(name.as_bytes());
        }
        // SAFETY: the path is a NUL-terminated literal; open has no other memory argument.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        let shown = name.unwrap_or("(new)").to_string();
        if fd < 0 {
            return Err(TapError::OpenTun {
                name: shown,
                error: io::Error::last_os_error(),
            });
        }
        // SAFETY: the fd was just opened and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: TUNSETIFF reads and rewrites one struct ifreq, which `request` is
        // (40 bytes, name first, flags at offset 16).
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &raw mut request) } < 0 {
            return Err(TapError::Attach {
                name: shown,
                error: io::Error::last_os_error(),
            });
        }
        let end = request
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(IFNAMSIZ);
        let name = String::from_utf8_lossy(&request.name[..end]).into_owned();
        let size = HEADER_SIZE as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, ours.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &raw const size) } < 0 {
            return Err(TapError::VnetHeader {
                name,
                error: io::Error::last_os_error(),
            });
        }
        let mut tap = Self {
            fd: RwLock::new(Some(fd)),
            name,
            offloads: Offloads::NONE,
        };
        tap.offloads = tap.probe_offloads();
        Ok(tap)
    }

    /// A TAP stand-in over any datagram fd (a socketpair end), for tests: the
    /// offloads it pretends to take are `offloads`.
    #[cfg(test)]
    pub fn from_fd(fd: OwnedFd, offloads: Offloads) -> Self {
        Self {
            fd: RwLock::new(Some(fd)),
            name: "fake".into(),
            offloads,
        }
    }

    /// What the kernel takes, tried as QEMU's tap_probe_has_ufo does; left at none (the
    /// kernel then hands us only complete, checksummed frames) until a driver asks.
    fn probe_offloads(&self) -> Offloads {
        let all = Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            ufo: false,
        };
        let ufo = Offloads {
            ufo: true,
            ..Offloads::NONE
        };
        let tso = self.try_offload(all);
        let ufo = self.try_offload(Offloads { csum: true, ..ufo });
        let _ = self.try_offload(Offloads::NONE);
        Offloads {
            csum: tso || ufo,
            tso4: tso,
            tso6: tso,
            ufo,
        }
    }

    fn try_offload(&self, offloads: Offloads) -> bool {
        self.with_fd(|fd| set_offload(fd, offloads.flags())).is_ok()
    }

    /// `f` on the open fd; EBADFD (as for a TAP gone) once closed.
    fn with_fd<T>(&self, f: impl FnOnce(RawFd) -> io::Result<T>) -> io::Result<T> {
        let fd = locks::read(&self.fd);
        match fd.as_ref() {
            Some(fd) => f(fd.as_raw_fd()),
            None => Err(io::Error::from_raw_os_error(libc::EBADFD)),
        }
    }

    /// A duplicate of the fd (for the event loop's watch), made while it is open.
    pub fn duplicate(&self) -> io::Result<OwnedFd> {
        self.with_fd(|fd| {
            // SAFETY: the fd stays open while with_fd holds the lock around this call.
            unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()
        })
    }

    /// Lets the interface go: a TAP we created is deleted by the kernel with its last
    /// fd (the event loop's watch must be removed too), one we attached to is free for
    /// another process.
    pub fn close(&self) {
        drop(locks::write(&self.fd).take());
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// Asks for `wanted` (limited to what the probe found); when the kernel refuses,
    /// fewer (checksums only, then none: the kernel then finishes every frame itself).
    /// What is in force is returned.
    pub fn set_offloads(&self, wanted: Offloads) -> Offloads {
        let have = self.offloads;
        let wanted = Offloads {
            csum: wanted.csum && have.csum,
            tso4: wanted.tso4 && have.tso4,
            tso6: wanted.tso6 && have.tso6,
            ufo: wanted.ufo && have.ufo,
        };
        let csum_only = Offloads {
            csum: wanted.csum,
            ..Offloads::NONE
        };
        [wanted, csum_only, Offloads::NONE]
            .into_iter()
            .find(|&offloads| self.try_offload(offloads))
            .unwrap_or(Offloads::NONE)
    }

    /// Whether a frame (or an error) waits, without taking it.
    pub fn readable(&self) -> bool {
        self.with_fd(|fd| {
            let mut poll = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll reads and writes the one pollfd we own; timeout 0 never waits.
            Ok(unsafe { libc::poll(&raw mut poll, 1, 0) } > 0)
        })
        .unwrap_or(false)
    }

    /// One frame (header first) into `buffer`: Ok(None) when none is queued.
    pub fn read_frame(&self, buffer: &mut [u8]) -> io::Result<Option<usize>> {
        self.with_fd(|fd| {
            loop {
                // SAFETY: read writes at most buffer.len() bytes into the buffer we borrow.
                let n = unsafe { libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len()) };
                if n >= 0 {
                    return Ok(Some(n as usize));
                }
                let error = io::Error::last_os_error();
                match error.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => return Ok(None),
                    _ => return Err(error),
                }
            }
        })
    }

    /// One frame from its parts (header, then the frame), in one writev: the TAP takes
    /// each write as one frame.
    pub fn write_frame(&self, parts: &[&[u8]]) -> io::Result<usize> {
        let iovecs: Vec<libc::iovec> = parts
            .iter()
            .map(|part| libc::iovec {
                iov_base: part.as_ptr().cast_mut().cast(),
                iov_len: part.len(),
            })
            .collect();
        self.with_fd(|fd| {
            loop {
                // SAFETY: writev reads iovecs.len() iovecs, each a slice we borrow for the call.
                let n = unsafe { libc::writev(fd, iovecs.as_ptr(), iovecs.len() as libc::c_int) };
                if n >= 0 {
                    return Ok(n as usize);
                }
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        })
    }
}

impl AsRawFd for Tap {
    /// -1 once closed.
    fn as_raw_fd(&self) -> RawFd {
        locks::read(&self.fd)
            .as_ref()
            .map_or(-1, AsRawFd::as_raw_fd)
    }
}

/// The TAP's interface is gone (deleted while we held it): tun.c detaches the file and
/// every read and write then fails with EBADFD.
pub fn is_gone(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::EBADFD)
}
