//! The host side's Unix sockets and the device's own epoll set: the listening socket
//! at PATH (made 0600 before anyone can reach it), the connections to PATH_<port>
//! (non-blocking: a full backlog refuses rather than waits), and the epoll fd that
//! watches every connection, itself watched by the event loop as one readable fd.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum SocketError {
    /// Longer than sun_path holds, or with a NUL.
    BadPath(PathBuf),
    /// Something (a socket of another VMM, a file) is there already.
    InUse(PathBuf),
    Io {
        path: PathBuf,
        error: io::Error,
    },
}

impl fmt::Display for SocketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadPath(path) => write!(
                f,
                "vsock socket {}: not a Unix socket path (too long, or a NUL in it)",
                path.display()
            ),
            Self::InUse(path) => write!(
                f,
                "vsock socket {}: the path is in use (remove it if no VMM listens there)",
                path.display()
            ),
            Self::Io { path, error } => write!(f, "vsock socket {}: {error}", path.display()),
        }
    }
}

fn address(path: &Path) -> Option<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return None;
    }
    for (slot, byte) in addr.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    let length = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Some((addr, length as libc::socklen_t))
}

fn stream_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() has no memory arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just made and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The listening socket at `path`, non-blocking, mode 0600, and its inode (so that
/// close removes the file only while it is still ours).
pub fn listen(path: &Path) -> Result<(UnixListener, (u64, u64)), SocketError> {
    let io_error = |error| SocketError::Io {
        path: path.to_path_buf(),
        error,
    };
    let (addr, length) = address(path).ok_or_else(|| SocketError::BadPath(path.to_path_buf()))?;
    let fd = stream_socket().map_err(io_error)?;
    // The socket's inode mode is what bind gives the file (af_unix.c, less the umask):
    // set before bind, nobody else can connect in between.
    // SAFETY: fchmod on the socket fd we own.
    if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } < 0 {
        return Err(io_error(io::Error::last_os_error()));
    }
    // SAFETY: bind reads `length` bytes of the sockaddr_un we own.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            length,
        )
    };
    if bound < 0 {
        let error = io::Error::last_os_error();
        return Err(if error.raw_os_error() == Some(libc::EADDRINUSE) {
            SocketError::InUse(path.to_path_buf())
        } else {
            io_error(error)
        });
    }
    // SAFETY: listen on the bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
        let error = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(io_error(error));
    }
    let inode = std::fs::metadata(path)
        .map(|meta| (meta.dev(), meta.ino()))
        .map_err(io_error)?;
    Ok((UnixListener::from(fd), inode))
}

/// Removes the socket file at `path` if it is still the one `listen` made.
pub fn remove_if_ours(path: &Path, inode: (u64, u64)) {
    if std::fs::symlink_metadata(path).is_ok_and(|meta| (meta.dev(), meta.ino()) == inode) {
        let _ = std::fs::remove_file(path);
    }
}

/// A non-blocking connection to the socket at `path`; an error if none listens there
/// or its backlog is full (the guest is refused at once rather than kept waiting).
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let (addr, length) =
        address(path).ok_or_else(|| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
    let fd = stream_socket()?;
    // SAFETY: connect reads `length` bytes of the sockaddr_un we own.
    let connected = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            length,
        )
    };
    if connected < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// An epoll set of the device's own (level-triggered).
pub struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 has no memory arguments.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the fd was just made and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Never waited on (epoll_wait with a 0 timeout), but the event loop watches
        // only fds that cannot block its thread.
        // SAFETY: F_SETFL on the open fd we own.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.0
    }

    /// Sets what `fd` is watched for (`events` 0: not watched), from `was`.
    pub fn set(&self, fd: RawFd, token: u64, was: u32, events: u32) -> io::Result<()> {
        let op = match (was, events) {
            (0, 0) => return Ok(()),
            (0, _) => libc::EPOLL_CTL_ADD,
            (_, 0) => libc::EPOLL_CTL_DEL,
            _ if was == events => return Ok(()),
            _ => libc::EPOLL_CTL_MOD,
        };
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: epoll_ctl reads one epoll_event we own; both fds are open.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// What is ready now, without waiting: (token, events).
    pub fn ready(&self, out: &mut Vec<(u64, u32)>) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // SAFETY: epoll_wait writes at most events.len() entries into our array.
        let count = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                0,
            )
        };
        for event in &events[..usize::try_from(count).unwrap_or(0)] {
            out.push((event.u64, event.events));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("kvmfast-vsock-{}-{name}", std::process::id()))
    }

    #[test]
    fn the_listener_is_0600_refuses_a_path_in_use_and_is_removed_only_while_ours() {
        let path = temp_path("listen");
        let _ = std::fs::remove_file(&path);
        let (_listener, inode) = listen(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(listen(&path), Err(SocketError::InUse(_))));
        assert!(connect(&path).is_ok());
        remove_if_ours(&path, inode);
        assert!(!path.exists());
        // Someone else's file at the path now: left alone.
        std::fs::write(&path, b"not ours").unwrap();
        remove_if_ours(&path, inode);
        assert!(path.exists());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_path_nobody_listens_on_is_refused_and_bad_paths_are_named() {
        let path = temp_path("nobody");
        assert!(connect(&path).is_err());
        let long = PathBuf::from("/".repeat(200));
        assert!(matches!(listen(&long), Err(SocketError::BadPath(_))));
    }
}
