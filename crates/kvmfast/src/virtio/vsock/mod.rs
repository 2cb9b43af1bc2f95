//! virtio-vsock (virtio 1.2 section 5.10) with Firecracker's host side: queue 0
//! receives (packets for the driver), 1 transmits (the driver's packets), 2 carries
//! events (TRANSPORT_RESET). Stream sockets only; the host end of each stream is a Unix
//! socket: clients of the listening socket at PATH write `CONNECT <port>\n` to reach a
//! guest listener (and read `OK <host port>\n`), and a guest connecting to the host
//! (CID 2) on port P reaches the listener at `PATH_P`.
//!
//! Streams are not part of a snapshot: a device restored from one starts with none,
//! and tells the driver with TRANSPORT_RESET (as Firecracker does), so that the
//! guest's sockets see their peers gone rather than wait for them.

pub mod conn;
pub mod credit;
pub mod muxer;
pub mod packet;
pub mod unix;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use muxer::{Filled, Muxer};
use packet::{HEADER_SIZE, check_tx};
use unix::{Epoll, SocketError, listen, remove_if_ours};

use super::chain::Chain;
use super::counters::{DeviceCounters, bump};
use super::disk::Bounce;
use super::guest_memory::Memory;
use super::queue::Completion;
use crate::locks;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
pub const NUM_QUEUES: usize = 3;

/// struct virtio_vsock_config: guest_cid, le64 (5.10.4).
pub const CONFIG_SIZE: usize = 8;

/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (5.10.6.6), struct virtio_vsock_event's id.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

#[derive(Debug)]
pub enum VsockError {
    /// 0-2 are reserved (hypervisor, local, host), and the guest's CID is 32 bits in
    /// every driver (the config field is 64).
    BadCid(u64),
    Socket(SocketError),
    Epoll(std::io::Error),
}

impl std::fmt::Display for VsockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadCid(cid) => write!(
                f,
                "guest CID {cid}: must be between 3 and {} (0-2 are reserved)",
                u32::MAX
            ),
            Self::Socket(error) => write!(f, "{error}"),
            Self::Epoll(error) => write!(f, "vsock: cannot make an epoll set: {error}"),
        }
    }
}

pub struct Vsock {
    cid: u64,
    path: PathBuf,
    inode: (u64, u64),
    epoll: Epoll,
    muxer: Mutex<Muxer>,
    /// A TRANSPORT_RESET is owed to the driver (after a restore).
    reset_event: AtomicBool,
    closed: AtomicBool,
}

impl Vsock {
    pub fn new(cid: u64, path: &Path) -> Result<Self, VsockError> {
        if !(3..=u64::from(u32::MAX)).contains(&cid) {
            return Err(VsockError::BadCid(cid));
        }
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        let (listener, inode) = listen(path).map_err(VsockError::Socket)?;
        let muxer = match Muxer::new(cid, path.to_path_buf(), listener, &epoll) {
            Ok(muxer) => muxer,
            Err(error) => {
                remove_if_ours(path, inode);
                return Err(VsockError::Epoll(error));
            }
        };
        Ok(Self {
            cid,
            path: path.to_path_buf(),
            inode,
            epoll,
            muxer: Mutex::new(muxer),
            reset_event: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> Vec<u8> {
        self.cid.to_le_bytes().to_vec()
    }

    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.fd().as_raw_fd()
    }

    pub fn duplicate_epoll(&self) -> std::io::Result<OwnedFd> {
        self.epoll.fd().try_clone()
    }

    pub fn muxer(&self) -> std::sync::MutexGuard<'_, Muxer> {
        locks::lock(&self.muxer)
    }

    /// The driver reset the device: every stream ends.
    pub fn reset(&self) {
        self.muxer().reset(&self.epoll);
        self.reset_event.store(false, Ordering::SeqCst);
    }

    /// No more listening: the socket file goes.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            self.muxer().close(&self.epoll);
            remove_if_ours(&self.path, self.inode);
        }
    }

    /// The device continues a snapshot's driver: the driver's streams are gone.
    pub fn owe_transport_reset(&self) {
        self.reset_event.store(true, Ordering::SeqCst);
    }

    pub fn take_transport_reset(&self) -> bool {
        self.reset_event.swap(false, Ordering::SeqCst)
    }

    pub fn transport_reset_owed(&self) -> bool {
        self.reset_event.load(Ordering::SeqCst)
    }

    /// Reads what the host sockets have for us (the epoll set is readable).
    pub fn host_events(&self, counters: &DeviceCounters) {
        self.muxer().host_events(&self.epoll, counters);
    }

    pub fn fill(&self, memory: &Memory, chain: &Chain, counters: &DeviceCounters) -> Filled {
        self.muxer().fill(memory, chain, &self.epoll, counters)
    }

    /// What the device's epoll set reports now, without taking it (for tests).
    #[cfg(test)]
    pub fn epoll_ready(&self, out: &mut Vec<(u64, u32)>) {
        self.epoll.ready(out);
    }

    pub fn has_work(&self) -> bool {
        self.muxer().has_work()
    }
}

/// One packet of the driver's tx queue: checked, then handed to its stream. The
/// chain is completed whatever happens to the packet (nothing written).
pub fn transmit(
    vsock: &Vsock,
    memory: &Memory,
    chain: &Chain,
    bounce: &mut Bounce,
    counters: &DeviceCounters,
) -> Completion {
    let completion = Completion {
        head: chain.head,
        used_len: 0,
    };
    let readable = chain.readable.total();
    let mut header_bytes = [0u8; HEADER_SIZE];
    let header_read =
        readable >= HEADER_SIZE as u64 && chain.readable.read(memory, &mut header_bytes);
    let checked = check_tx(
        header_read.then_some(&header_bytes),
        readable,
        chain.writable.total(),
        vsock.cid,
    );
    bump(&counters.tx_packets, 1);
    let (header, op) = match checked {
        Ok(checked) => checked,
        Err((header, error)) => {
            bump(&counters.tx_dropped, 1);
            if let Some(header) = header.filter(|_| error.answered()) {
                vsock.muxer().reject(&header, &vsock.epoll, counters);
            }
            return completion;
        }
    };
    let length = if op == packet::Op::Rw {
        header.len as usize
    } else {
        0
    };
    let (_, body) = chain.readable.split_at(HEADER_SIZE as u64);
    let payload = &mut bounce.get(length)[..length];
    if !body.read(memory, payload) {
        bump(&counters.tx_dropped, 1);
        return completion;
    }
    vsock
        .muxer()
        .from_guest(&header, op, payload, &vsock.epoll, counters);
    completion
}

#[cfg(test)]
mod tests;
