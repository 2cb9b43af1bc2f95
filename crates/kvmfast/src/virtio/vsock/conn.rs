//! One stream between a guest port and a host Unix socket: its handshake phase, its
//! credit, the guest's bytes the host socket has not taken yet (never more than the
//! buffer the device advertised), and the packets it owes the driver.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::credit::{BUF_ALLOC, Credit};
use super::packet::{HOST_CID, Header, Op, SHUTDOWN_RECEIVE, SHUTDOWN_SEND, TYPE_STREAM};

/// The longest CONNECT line a host client may write ("CONNECT 4294967295\n" is 19).
pub const MAX_LINE: usize = 32;

#[derive(Debug, PartialEq, Eq)]
pub enum Phase {
    /// A host client that has not finished its `CONNECT <port>\n` line yet.
    AwaitingLine(Vec<u8>),
    /// The host asked: REQUEST owed or sent to the driver, no RESPONSE yet.
    LocalInit,
    Established,
}

/// Packets owed to the driver, in the order they go.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    pub request: bool,
    pub response: bool,
    /// SHUTDOWN flags owed (the host will send no more: SHUTDOWN_SEND).
    pub shutdown: u32,
    /// The driver asked (CREDIT_REQUEST).
    pub credit_update: bool,
}

/// Where a host client's CONNECT line is.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// Not complete yet (the client writes the rest later).
    Pending,
    /// `CONNECT <port>\n`.
    Connect(u32),
    /// End of file, an error, or a line that is not a CONNECT: the client is closed.
    Refused,
}

/// What the connection has for the driver next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A packet, and how many payload bytes of the scratch buffer follow its header.
    Packet(Header, usize),
    /// The host socket failed: the stream is reset.
    Fail,
    Nothing,
}

/// The CONNECT line's port (Firecracker's host protocol), if the line is one.
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.strip_prefix("CONNECT ")?.strip_suffix('\n')?;
    if port.is_empty() || !port.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

pub struct Conn {
    pub stream: UnixStream,
    pub phase: Phase,
    /// The host's port (ours) and the guest's.
    pub local_port: u32,
    pub peer_port: u32,
    pub credit: Credit,
    /// Bytes for the host socket that it has not taken.
    to_host: VecDeque<u8>,
    /// The first bytes of `to_host` that are the device's own (the OK line), not
    /// the driver's: they count against no credit.
    own_bytes: usize,
    pub due: Due,
    /// The host socket had input when last looked at (cleared when a read would block).
    pub readable: bool,
    /// The host sent end of file.
    pub host_eof: bool,
    /// The driver's SHUTDOWN flags so far.
    pub guest_shutdown: u32,
    host_write_shut: bool,
    /// Events the device's epoll set watches for this stream (0: not in it).
    pub watching: u32,
    /// In the muxer's queue of connections with something for the driver.
    pub queued: bool,
    /// While the host client's CONNECT line or the answer to our REQUEST waits: when
    /// the client is given up on.
    pub deadline: Option<Instant>,
}

impl Conn {
    fn new(stream: UnixStream, phase: Phase, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            phase,
            local_port,
            peer_port,
            credit: Credit::new(BUF_ALLOC),
            to_host: VecDeque::new(),
            own_bytes: 0,
            due: Due::default(),
            readable: false,
            host_eof: false,
            guest_shutdown: 0,
            host_write_shut: false,
            watching: 0,
            queued: false,
            deadline: None,
        }
    }

    /// A host client that has just connected to the listening socket, to be closed
    /// at `deadline` unless its CONNECT line is complete by then.
    pub fn accepted(stream: UnixStream, deadline: Instant) -> Self {
        let mut conn = Self::new(stream, Phase::AwaitingLine(Vec::new()), 0, 0);
        conn.deadline = Some(deadline);
        conn
    }

    /// A guest's REQUEST to host port `local_port` that reached a listener there.
    pub fn to_listener(stream: UnixStream, request: &Header) -> Self {
        let mut conn = Self::new(
            stream,
            Phase::Established,
            request.dst_port,
            request.src_port,
        );
        conn.credit.peer_update(request);
        conn.due.response = true;
        conn
    }

    /// Reads the CONNECT line a byte at a time (bytes after it are the stream's, left
    /// in the socket).
    pub fn read_line(&mut self) -> Line {
        let Phase::AwaitingLine(line) = &mut self.phase else {
            return Line::Refused;
        };
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Line::Refused,
                Ok(_) => {
                    line.push(byte[0]);
                    if byte[0] == b'\n' {
                        return parse_connect(line).map_or(Line::Refused, Line::Connect);
                    }
                    if line.len() >= MAX_LINE {
                        return Line::Refused;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Line::Pending,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Line::Refused,
            }
        }
    }

    /// The line was a CONNECT to guest port `port`, with `local_port` ours.
    pub fn start_request(&mut self, local_port: u32, port: u32, deadline: Instant) {
        self.phase = Phase::LocalInit;
        self.deadline = Some(deadline);
        self.local_port = local_port;
        self.peer_port = port;
        self.due.request = true;
    }

    /// The driver answered our REQUEST: the client hears `OK <host port>\n` first.
    pub fn established(&mut self) -> io::Result<()> {
        self.phase = Phase::Established;
        self.deadline = None;
        let line = format!("OK {}\n", self.local_port);
        self.own_bytes += line.len();
        self.to_host.extend(line.bytes());
        self.flush()
    }

    /// An RW's payload: forwarded now as far as the host socket takes it, the rest
    /// held. An error when the driver went beyond its credit or sends after its
    /// SHUTDOWN_SEND (EPROTO), or the host socket failed: the stream is reset.
    pub fn from_guest(&mut self, payload: &[u8]) -> Result<(), io::Error> {
        let length = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        if self.guest_shutdown & SHUTDOWN_SEND != 0 || !self.credit.receive(length) {
            return Err(io::Error::from_raw_os_error(libc::EPROTO));
        }
        if self.to_host.is_empty() {
            let written = write_some(&self.stream, payload)?;
            self.credit.forwarded(written as u32);
            self.to_host.extend(&payload[written..]);
        } else {
            self.to_host.extend(payload);
        }
        Ok(())
    }

    /// Writes what the host socket takes of the held bytes.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            let written = write_some(&self.stream, front)?;
            if written == 0 {
                break;
            }
            let own = written.min(self.own_bytes);
            self.own_bytes -= own;
            self.credit.forwarded((written - own) as u32);
            self.to_host.drain(..written);
        }
        if self.to_host.is_empty() {
            // The held bytes are gone: the VMM keeps no buffer for an idle stream.
            self.to_host.shrink_to(0);
            if self.guest_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
                self.host_write_shut = true;
                let _ = self.stream.shutdown(Shutdown::Write);
            }
        }
        Ok(())
    }

    pub fn held(&self) -> usize {
        self.to_host.len()
    }

    /// The driver's SHUTDOWN: it sends (SEND) or takes (RECEIVE) no more.
    pub fn guest_shut(&mut self, flags: u32) -> io::Result<()> {
        self.guest_shutdown |= flags & (SHUTDOWN_RECEIVE | SHUTDOWN_SEND);
        self.flush()
    }

    /// The driver closed its end and every byte it sent reached the host: the stream
    /// ends with an RST (the driver waits for one, 5.10.6.5).
    pub fn finished(&self) -> bool {
        self.guest_shutdown == SHUTDOWN_RECEIVE | SHUTDOWN_SEND && self.to_host.is_empty()
    }

    /// Whether host bytes can go to the driver now.
    fn may_send_data(&self) -> bool {
        self.phase == Phase::Established
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RECEIVE == 0
            && self.credit.peer_credit() > 0
    }

    /// Anything owed to the driver (to stay in the muxer's queue).
    pub fn has_work(&self) -> bool {
        self.due.request
            || self.due.response
            || self.due.shutdown != 0
            || self.due.credit_update
            || self.credit.update_due()
            || (self.readable && self.may_send_data())
    }

    /// What the device's epoll set should watch: input while it may be forwarded
    /// (not while known readable: level triggering would report it again and again
    /// until the driver has room), output while bytes are held.
    pub fn wanted_events(&self) -> u32 {
        let input = match self.phase {
            Phase::AwaitingLine(_) => true,
            Phase::LocalInit => false,
            Phase::Established => !self.readable && self.may_send_data(),
        };
        let mut events = 0;
        if input {
            events |= libc::EPOLLIN as u32;
        }
        if !self.to_host.is_empty() {
            events |= libc::EPOLLOUT as u32;
        }
        events
    }

    /// A header from this stream's host end to the driver, our credit in it.
    pub fn header(&mut self, guest_cid: u64, op: Op) -> Header {
        let mut header = Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            kind: TYPE_STREAM,
            op: op.to_u16(),
            ..Header::default()
        };
        self.credit.stamp(&mut header);
        header
    }

    /// The next packet for the driver, payload (if any) read into `scratch`, at most
    /// `room` bytes of it (the driver's buffer after the header).
    pub fn next_packet(&mut self, guest_cid: u64, room: usize, scratch: &mut [u8]) -> Next {
        if self.due.request {
            self.due.request = false;
            return Next::Packet(self.header(guest_cid, Op::Request), 0);
        }
        if self.due.response {
            self.due.response = false;
            return Next::Packet(self.header(guest_cid, Op::Response), 0);
        }
        if self.readable && self.may_send_data() {
            let want = room
                .min(scratch.len())
                .min(self.credit.peer_credit() as usize);
            if want > 0 {
                match (&self.stream).read(&mut scratch[..want]) {
                    Ok(0) => {
                        self.readable = false;
                        self.host_eof = true;
                        self.due.shutdown |= SHUTDOWN_SEND;
                    }
                    Ok(read) => {
                        let mut header = self.header(guest_cid, Op::Rw);
                        header.len = read as u32;
                        self.credit.sent(read as u32);
                        return Next::Packet(header, read);
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        self.readable = false;
                    }
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Next::Fail,
                }
            }
        }
        if self.due.shutdown != 0 {
            let mut header = self.header(guest_cid, Op::Shutdown);
            header.flags = self.due.shutdown;
            self.due.shutdown = 0;
            return Next::Packet(header, 0);
        }
        if self.due.credit_update || self.credit.update_due() {
            self.due.credit_update = false;
            return Next::Packet(self.header(guest_cid, Op::CreditUpdate), 0);
        }
        Next::Nothing
    }
}

/// Bytes written without waiting (0 when the socket is full).
fn write_some(stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    loop {
        match (&*stream).write(data) {
            Ok(written) => return Ok(written),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn pair() -> (Conn, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        (Conn::accepted(ours, Instant::now()), host)
    }

    /// A host-initiated stream past its handshake, the OK line read.
    fn established() -> (Conn, UnixStream) {
        let (mut conn, mut host) = pair();
        conn.start_request(9, 80, Instant::now());
        let mut scratch = [0u8; 8];
        assert!(matches!(
            conn.next_packet(3, 8, &mut scratch),
            Next::Packet(_, 0)
        ));
        conn.established().unwrap();
        let mut line = [0u8; 5];
        host.read_exact(&mut line).unwrap();
        (conn, host)
    }

    fn peer(buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 7,
            kind: TYPE_STREAM,
            buf_alloc,
            fwd_cnt,
            ..Header::default()
        }
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\n"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296\n"[..],
            b"CONNECT -1\n",
            b"CONNECT +1\n",
            b"CONNECT \n",
            b"CONNECT 52",
            b"connect 52\n",
            b"CONNECT 5 2\n",
            b"\xff\n",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_line_is_read_without_the_bytes_after_it() {
        let (mut conn, mut host) = pair();
        host.write_all(b"CONN").unwrap();
        assert_eq!(conn.read_line(), Line::Pending);
        host.write_all(b"ECT 80\nhello").unwrap();
        assert_eq!(conn.read_line(), Line::Connect(80));
        let mut rest = [0u8; 5];
        (&conn.stream).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"hello");
        // A line that never ends is refused at MAX_LINE bytes.
        let (mut conn, mut host) = pair();
        host.write_all(&[b'7'; MAX_LINE]).unwrap();
        assert_eq!(conn.read_line(), Line::Refused);
        // End of file before the line ends.
        let (mut conn, host) = pair();
        drop(host);
        assert_eq!(conn.read_line(), Line::Refused);
    }

    #[test]
    fn the_handshake_owes_a_request_then_writes_ok_without_counting_it() {
        let (mut conn, mut host) = pair();
        conn.start_request(1 << 30, 80, Instant::now());
        assert_eq!(conn.phase, Phase::LocalInit);
        assert_eq!(
            conn.wanted_events(),
            0,
            "host bytes wait until the guest answers"
        );
        let mut scratch = [0u8; 64];
        let Next::Packet(request, 0) = conn.next_packet(3, 64, &mut scratch) else {
            panic!("no request");
        };
        assert_eq!(
            (
                request.op,
                request.src_port,
                request.dst_port,
                request.dst_cid
            ),
            (1, 1 << 30, 80, 3)
        );
        assert_eq!(request.buf_alloc, BUF_ALLOC);
        conn.credit.peer_update(&peer(4096, 0));
        conn.established().unwrap();
        let mut line = [0u8; 14];
        host.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
        assert_eq!(conn.credit.held(), 0);
        let mut header = Header::default();
        conn.credit.stamp(&mut header);
        assert_eq!(header.fwd_cnt, 0, "the OK line is not the guest's");
    }

    #[test]
    fn host_bytes_go_only_within_the_peer_credit() {
        let (mut conn, mut host) = established();
        host.write_all(&[0xaa; 100]).unwrap();
        conn.readable = true;
        let mut scratch = [0u8; 4096];
        // Peer credit 0 (it has not spoken): nothing goes, no read is made.
        assert_eq!(conn.next_packet(3, 4096, &mut scratch), Next::Nothing);
        conn.credit.peer_update(&peer(30, 0));
        assert!(conn.has_work());
        let Next::Packet(rw, 30) = conn.next_packet(3, 4096, &mut scratch) else {
            panic!("no data");
        };
        assert_eq!((rw.op, rw.len), (5, 30));
        assert_eq!(conn.next_packet(3, 4096, &mut scratch), Next::Nothing);
        assert!(!conn.has_work());
        // The guest forwarded 20: 20 more, and never more than the buffer's room.
        conn.credit.peer_update(&peer(30, 20));
        assert!(matches!(
            conn.next_packet(3, 8, &mut scratch),
            Next::Packet(_, 8)
        ));
    }

    #[test]
    fn a_host_that_does_not_read_holds_at_most_the_advertised_buffer() {
        let (mut conn, _host) = pair();
        conn.start_request(9, 80, Instant::now());
        conn.established().unwrap();
        let chunk = vec![0x55u8; 60 * 1024];
        let mut sent = 0usize;
        while conn.from_guest(&chunk).is_ok() {
            sent += chunk.len();
            assert!(conn.held() <= BUF_ALLOC as usize + 16);
        }
        // The socket's own buffer took some; the rest is held, up to the credit.
        assert!(sent >= BUF_ALLOC as usize);
        assert!(conn.held() > 0);
        assert_ne!(conn.wanted_events() & libc::EPOLLOUT as u32, 0);
        assert!(conn.credit.held() as usize <= BUF_ALLOC as usize);
    }

    #[test]
    fn shutdowns_both_ways() {
        let (mut conn, mut host) = established();
        conn.credit.peer_update(&peer(4096, 0));
        // The guest sends no more: the host reads end of file once the bytes are out.
        conn.from_guest(b"bye").unwrap();
        conn.guest_shut(SHUTDOWN_SEND).unwrap();
        let mut got = Vec::new();
        host.set_nonblocking(false).unwrap();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"bye");
        assert!(conn.from_guest(b"late").is_err(), "RW after SHUTDOWN_SEND");
        // The host sends no more: the guest is told with SHUTDOWN_SEND after the data.
        host.write_all(b"last").unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        conn.readable = true;
        let mut scratch = [0u8; 64];
        assert!(matches!(
            conn.next_packet(3, 64, &mut scratch),
            Next::Packet(_, 4)
        ));
        let Next::Packet(shutdown, 0) = conn.next_packet(3, 64, &mut scratch) else {
            panic!("no shutdown");
        };
        assert_eq!((shutdown.op, shutdown.flags), (4, SHUTDOWN_SEND));
        assert!(!conn.finished());
        conn.guest_shut(SHUTDOWN_RECEIVE).unwrap();
        assert!(conn.finished());
    }
}
