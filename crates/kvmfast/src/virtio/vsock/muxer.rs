//! Every stream of one device: the listening socket at PATH and the host clients it
//! accepts, the guest's connections to PATH_<port>, one epoll set watching them all,
//! and the packets owed to the driver (per connection, served round-robin, so that
//! one stream whose host end does not read never holds up another).

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::conn::{Conn, Line, Next, Phase};
use super::packet::{Header, MAX_PAYLOAD, Op};
use super::unix::{Epoll, connect};
use crate::timerfd::OneShotTimer as Timer;
use crate::virtio::chain::Chain;
use crate::virtio::counters::{DeviceCounters, bump};
use crate::virtio::guest_memory::Memory;

/// The epoll tokens of the listening socket and of the deadline timer; connections
/// count from 1.
const LISTENER: u64 = 0;
const TIMER: u64 = u64::MAX;

/// The most streams at once (Firecracker's limit), host clients still writing their
/// CONNECT line included. Beyond it a client is closed, a guest REQUEST reset.
pub const MAX_CONNECTIONS: usize = 1023;

/// The most RSTs waiting for receive buffers (answers to packets for no stream): a
/// driver sending such packets without giving buffers does not grow the VMM.
const MAX_CONTROL: usize = 1024;

/// How long a host client waits for the guest to answer its CONNECT (Firecracker's
/// 2 s): a guest with no listener answers RST at once, one without a driver never.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an accepted host client has to write its whole `CONNECT <port>\n` line
/// (as long as the guest has to answer it): a client that never does would
/// otherwise hold one of the MAX_CONNECTIONS slots for good.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(2);

/// Host ports the device hands to host-initiated streams (Firecracker's range).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// What `fill` put in a receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Filled {
    /// A packet of this many bytes, header included.
    Packet(u32),
    /// The buffer is smaller than a header: given back empty.
    TooSmall,
    /// Nothing is owed.
    Nothing,
}

pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: Option<UnixListener>,
    /// Not watched for a while: accept() ran out of fds.
    listener_stalled: bool,
    /// Fires at the earliest deadline: a CONNECT line or a REQUEST's answer.
    timer: Timer,
    request_timeout: Duration,
    line_timeout: Duration,
    max_connections: usize,
    conns: HashMap<u64, Conn>,
    /// (host port, guest port) -> connection id.
    ports: HashMap<(u32, u32), u64>,
    next_id: u64,
    next_local_port: u32,
    /// Connections with something for the driver, oldest first.
    queue: VecDeque<u64>,
    /// Packets for no stream (RSTs), first out.
    control: VecDeque<Header>,
    scratch: Vec<u8>,
    events: Vec<(u64, u32)>,
}

impl Muxer {
    pub fn new(
        guest_cid: u64,
        path: PathBuf,
        listener: UnixListener,
        epoll: &Epoll,
    ) -> std::io::Result<Self> {
        epoll.set(listener.as_raw_fd(), LISTENER, 0, libc::EPOLLIN as u32)?;
        let timer = Timer::new()?;
        epoll.set(timer.fd(), TIMER, 0, libc::EPOLLIN as u32)?;
        Ok(Self {
            guest_cid,
            path,
            listener: Some(listener),
            listener_stalled: false,
            timer,
            request_timeout: REQUEST_TIMEOUT,
            line_timeout: LINE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            conns: HashMap::new(),
            ports: HashMap::new(),
            next_id: 1,
            next_local_port: FIRST_LOCAL_PORT,
            queue: VecDeque::new(),
            control: VecDeque::new(),
            scratch: vec![0; MAX_PAYLOAD as usize],
            events: Vec::new(),
        })
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Bytes held for host sockets that are not reading, over every stream.
    pub fn held(&self) -> usize {
        self.conns.values().map(Conn::held).sum()
    }

    pub fn has_work(&self) -> bool {
        !self.control.is_empty() || !self.queue.is_empty()
    }

    /// Ends every stream (their host ends see end of file) and forgets what was owed:
    /// the driver reset the device, or it is closing.
    pub fn reset(&mut self, epoll: &Epoll) {
        for (id, conn) in self.conns.drain() {
            let _ = epoll.set(conn.stream.as_raw_fd(), id, conn.watching, 0);
        }
        self.ports.clear();
        self.queue.clear();
        self.control.clear();
        self.unstall(epoll);
    }

    /// Stops listening for good.
    pub fn close(&mut self, epoll: &Epoll) {
        self.reset(epoll);
        if let Some(listener) = self.listener.take() {
            let _ = epoll.set(listener.as_raw_fd(), LISTENER, libc::EPOLLIN as u32, 0);
        }
    }

    fn push_control(&mut self, header: Header, counters: &DeviceCounters) {
        if self.control.len() < MAX_CONTROL {
            self.control.push_back(header);
        } else {
            bump(&counters.tx_dropped, 1);
        }
    }

    fn reset_reply(&mut self, to: &Header, counters: &DeviceCounters) {
        if Op::from_u16(to.op) != Some(Op::Rst) {
            self.push_control(to.reset_reply(), counters);
        }
    }

    /// Drops connection `id`; the driver gets an RST if it knows the stream.
    fn kill(&mut self, id: u64, epoll: &Epoll, counters: &DeviceCounters, tell_guest: bool) {
        let Some(mut conn) = self.conns.remove(&id) else {
            return;
        };
        let _ = epoll.set(conn.stream.as_raw_fd(), id, conn.watching, 0);
        if !matches!(conn.phase, Phase::AwaitingLine(_)) {
            self.ports.remove(&(conn.local_port, conn.peer_port));
            // A stream whose REQUEST never went out is unknown to the driver.
            if tell_guest && !conn.due.request {
                let rst = conn.header(self.guest_cid, Op::Rst);
                self.push_control(rst, counters);
            }
        }
        drop(conn);
        self.unstall(epoll);
    }

    /// Puts `id` in the queue if it owes the driver something, and has the epoll
    /// set watch what it waits for.
    fn settle(&mut self, id: u64, epoll: &Epoll, counters: &DeviceCounters) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.finished() {
            self.kill(id, epoll, counters, true);
            return;
        }
        if !conn.queued && conn.has_work() {
            conn.queued = true;
            self.queue.push_back(id);
        }
        let wanted = conn.wanted_events();
        if epoll
            .set(conn.stream.as_raw_fd(), id, conn.watching, wanted)
            .is_ok()
        {
            conn.watching = wanted;
        }
    }

    fn insert(&mut self, conn: Conn) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        if !matches!(conn.phase, Phase::AwaitingLine(_)) {
            self.ports.insert((conn.local_port, conn.peer_port), id);
        }
        self.conns.insert(id, conn);
        id
    }

    fn local_port_for(&mut self, guest_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.ports.contains_key(&(port, guest_port)) {
                return port;
            }
        }
    }

    /// What the epoll set reports: clients to accept, CONNECT lines, host input for
    /// the driver, host sockets that take held bytes again.
    pub fn host_events(&mut self, epoll: &Epoll, counters: &DeviceCounters) {
        let mut events = std::mem::take(&mut self.events);
        // A client accepted here has often written its line already: a few rounds
        // take it without another trip through the event loop.
        for _ in 0..4 {
            events.clear();
            epoll.ready(&mut events);
            if events.is_empty() {
                break;
            }
            self.handle_events(&events, epoll, counters);
        }
        self.events = events;
    }

    fn handle_events(&mut self, events: &[(u64, u32)], epoll: &Epoll, counters: &DeviceCounters) {
        for &(token, flags) in events {
            if token == LISTENER {
                self.accept(epoll);
                continue;
            }
            if token == TIMER {
                self.timer.clear();
                self.expire(epoll, counters);
                continue;
            }
            let Some(conn) = self.conns.get_mut(&token) else {
                continue;
            };
            if matches!(conn.phase, Phase::AwaitingLine(_)) {
                match conn.read_line() {
                    Line::Pending => {}
                    Line::Connect(port) => {
                        let local = self.local_port_for(port);
                        let deadline = Instant::now() + self.request_timeout;
                        if let Some(conn) = self.conns.get_mut(&token) {
                            conn.start_request(local, port, deadline);
                        }
                        self.ports.insert((local, port), token);
                        self.arm_timer();
                        bump(&counters.vsock_connections, 1);
                    }
                    Line::Refused => {
                        self.kill(token, epoll, counters, false);
                        continue;
                    }
                }
                self.settle(token, epoll, counters);
                continue;
            }
            let input = (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32;
            if flags & input != 0 && conn.watching & libc::EPOLLIN as u32 != 0 {
                conn.readable = true;
            }
            if conn.held() > 0 && conn.flush().is_err() {
                self.kill(token, epoll, counters, true);
                continue;
            }
            self.settle(token, epoll, counters);
        }
    }

    /// Host clients that have not written their CONNECT line in time, or whose
    /// REQUEST the guest has not answered in time, are closed; the driver is told of
    /// the latter with an RST (its answer, if it comes, is then for no stream).
    fn expire(&mut self, epoll: &Epoll, counters: &DeviceCounters) {
        let now = Instant::now();
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, conn)| conn.deadline.is_some_and(|deadline| deadline <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            self.kill(id, epoll, counters, true);
        }
        self.arm_timer();
    }

    fn arm_timer(&self) {
        let next = self.conns.values().filter_map(|conn| conn.deadline).min();
        self.timer
            .set(next.map(|at| at.saturating_duration_since(Instant::now())));
    }

    /// A stream closed: a listener that ran out of fds is watched again.
    fn unstall(&mut self, epoll: &Epoll) {
        if let Some(listener) = &self.listener
            && self.listener_stalled
            && epoll
                .set(listener.as_raw_fd(), LISTENER, 0, libc::EPOLLIN as u32)
                .is_ok()
        {
            self.listener_stalled = false;
        }
    }

    fn accept(&mut self, epoll: &Epoll) {
        let Some(listener) = &self.listener else {
            return;
        };
        let mut accepted = Vec::new();
        // A burst of clients beyond the limit is closed at once (they see end of file).
        let stalled = loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + accepted.len() < self.max_connections
                        && stream.set_nonblocking(true).is_ok()
                    {
                        accepted.push(stream);
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                // Out of fds (EMFILE, ENFILE, ENOBUFS): the client waits in the
                // backlog, and the listener, still readable, would be reported again
                // and again. It is not watched until a stream closes.
                Err(_) => break true,
            }
        };
        if stalled
            && epoll
                .set(listener.as_raw_fd(), LISTENER, libc::EPOLLIN as u32, 0)
                .is_ok()
        {
            self.listener_stalled = true;
        }
        if accepted.is_empty() {
            return;
        }
        let deadline = Instant::now() + self.line_timeout;
        for stream in accepted {
            let id = self.insert(Conn::accepted(stream, deadline));
            if let Some(conn) = self.conns.get_mut(&id) {
                let wanted = conn.wanted_events();
                if epoll.set(conn.stream.as_raw_fd(), id, 0, wanted).is_ok() {
                    conn.watching = wanted;
                }
            }
        }
        self.arm_timer();
    }

    /// A packet from the driver, checked (packet::check_tx); `payload` an RW's bytes.
    pub fn from_guest(
        &mut self,
        header: &Header,
        op: Op,
        payload: &[u8],
        epoll: &Epoll,
        counters: &DeviceCounters,
    ) {
        let Some(&id) = self.ports.get(&(header.dst_port, header.src_port)) else {
            match op {
                Op::Request => self.guest_connects(header, epoll, counters),
                Op::Rst => {}
                _ => self.reset_reply(header, counters),
            }
            return;
        };
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.credit.peer_update(header);
        let result = match (&conn.phase, op) {
            (_, Op::Rst) => {
                self.kill(id, epoll, counters, false);
                return;
            }
            (Phase::LocalInit, Op::Response) => conn.established(),
            (Phase::Established, Op::Rw) => {
                bump(&counters.tx_bytes, payload.len() as u64);
                conn.from_guest(payload)
            }
            (Phase::Established, Op::CreditUpdate) => Ok(()),
            (Phase::Established, Op::CreditRequest) => {
                conn.due.credit_update = true;
                Ok(())
            }
            (Phase::Established, Op::Shutdown) => conn.guest_shut(header.flags),
            // A REQUEST for a stream that exists, a RESPONSE out of turn, anything but
            // RESPONSE or RST while our REQUEST waits: the stream is broken.
            _ => Err(std::io::Error::from_raw_os_error(libc::EPROTO)),
        };
        if result.is_err() {
            self.kill(id, epoll, counters, true);
            return;
        }
        self.settle(id, epoll, counters);
    }

    /// A packet that breaks the rules (packet::PacketError::answered): its stream, if
    /// any, ends, and the driver gets an RST for it.
    pub fn reject(&mut self, header: &Header, epoll: &Epoll, counters: &DeviceCounters) {
        if let Some(&id) = self.ports.get(&(header.dst_port, header.src_port)) {
            self.kill(id, epoll, counters, false);
        }
        self.reset_reply(header, counters);
    }

    /// The driver's REQUEST to host port P: a listener at PATH_P, or an RST.
    fn guest_connects(&mut self, request: &Header, epoll: &Epoll, counters: &DeviceCounters) {
        if self.conns.len() >= self.max_connections {
            self.reset_reply(request, counters);
            return;
        }
        let mut path = self.path.clone().into_os_string();
        path.push(format!("_{}", request.dst_port));
        match connect(Path::new(&path)) {
            Ok(stream) => {
                let id = self.insert(Conn::to_listener(stream, request));
                bump(&counters.vsock_connections, 1);
                self.settle(id, epoll, counters);
            }
            Err(_) => self.reset_reply(request, counters),
        }
    }

    /// The next packet owed to the driver, written into the writable part of `chain`.
    pub fn fill(
        &mut self,
        memory: &Memory,
        chain: &Chain,
        epoll: &Epoll,
        counters: &DeviceCounters,
    ) -> Filled {
        const HEADER: u64 = super::packet::HEADER_SIZE as u64;
        if chain.writable.total() < HEADER {
            return Filled::TooSmall;
        }
        let (head, body) = chain.writable.split_at(HEADER);
        let room = usize::try_from(body.total()).unwrap_or(usize::MAX);
        let write = |header: Header, payload: &[u8]| {
            head.write(memory, &header.to_bytes()) && body.write(memory, payload)
        };
        if let Some(header) = self.control.pop_front() {
            if header.op == Op::Rst.to_u16() {
                bump(&counters.vsock_resets, 1);
            }
            return if write(header, &[]) {
                Filled::Packet(HEADER as u32)
            } else {
                Filled::TooSmall
            };
        }
        // One pass over the queue: a stream with nothing that fits this buffer waits
        // for the next one in its place.
        for _ in 0..self.queue.len() {
            let Some(id) = self.queue.pop_front() else {
                break;
            };
            let guest_cid = self.guest_cid;
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            conn.queued = false;
            match conn.next_packet(guest_cid, room, &mut self.scratch) {
                Next::Packet(header, length) => {
                    let written = write(header, &self.scratch[..length]);
                    bump(&counters.rx_bytes, length as u64);
                    self.settle(id, epoll, counters);
                    return if written {
                        Filled::Packet(HEADER as u32 + length as u32)
                    } else {
                        Filled::TooSmall
                    };
                }
                Next::Fail => {
                    self.kill(id, epoll, counters, true);
                    return self.fill(memory, chain, epoll, counters);
                }
                Next::Nothing => self.settle(id, epoll, counters),
            }
        }
        Filled::Nothing
    }

    #[cfg(test)]
    pub fn set_max_connections(&mut self, limit: usize) {
        self.max_connections = limit;
    }

    #[cfg(test)]
    pub fn set_line_timeout(&mut self, timeout: Duration) {
        self.line_timeout = timeout;
    }

    #[cfg(test)]
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.request_timeout = timeout;
    }

    /// A stream's state, for tests: (host port, guest port) -> (phase is established,
    /// bytes held, guest shutdown flags).
    #[cfg(test)]
    pub fn stream(&self, local_port: u32, peer_port: u32) -> Option<(bool, usize, u32)> {
        let conn = self.conns.get(self.ports.get(&(local_port, peer_port))?)?;
        Some((
            conn.phase == Phase::Established,
            conn.held(),
            conn.guest_shutdown,
        ))
    }
}
