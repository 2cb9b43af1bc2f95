//! virtio-vsock on the device (DeviceCore): the test plays the driver through rings in
//! a small guest RAM, and the host through real Unix sockets; the event loop's part is
//! played by calling the watch (VsockWatch::ready) and the doorbells (serve) by hand.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::credit::BUF_ALLOC;
use super::packet::{HEADER_SIZE, HOST_CID, Header, SHUTDOWN_RECEIVE, SHUTDOWN_SEND, TYPE_STREAM};
use super::*;
use crate::fd_watch::{ReadableHandler, Readiness};
use crate::memory::{GuestRam, Mapping, RamRegion};
use crate::virtio::COMMON_FEATURES;
use crate::virtio::device::{Backend, DeviceCore, VsockWatch};
use crate::virtio::guest_memory::{DeviceMemory, Memory};
use crate::virtio::queue::QueueConfig;
use crate::virtio::test_ring::{WRITE, get_u16, get_u32, put_descriptor, put_u16};

const RAM: usize = 0x40000;
const SIZE: u16 = 16;
const CID: u64 = 3;
const RX_BUFFERS: u64 = 0x10000;
const RX_BUFFER: u32 = 0x1000;
const TX_DATA: u64 = 0x20000;
const EVENT_BUFFER: u64 = 0x38000;
const RINGS: [u64; 3] = [0x1000, 0x4000, 0x7000];

const REQUEST: u16 = 1;
const RESPONSE: u16 = 2;
const RST: u16 = 3;
const SHUTDOWN: u16 = 4;
const RW: u16 = 5;
const CREDIT_UPDATE: u16 = 6;
const CREDIT_REQUEST: u16 = 7;

fn temp_path() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "kvmfast-vsock-dev-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

struct Rig {
    core: Arc<DeviceCore>,
    ram: Arc<GuestRam>,
    view: DeviceMemory,
    watch: VsockWatch,
    path: PathBuf,
    avail: [u16; 3],
    rx_seen: u16,
    rx_offered: u16,
    /// The guest's credit to the host per stream: its buffer and what it forwarded.
    guest_buf_alloc: u32,
    guest_fwd_cnt: u32,
}

impl Rig {
    fn new() -> Self {
        let path = temp_path();
        let vsock = Vsock::new(CID, &path).unwrap();
        let core = Arc::new(DeviceCore::new(Backend::Vsock(Box::new(vsock))).unwrap());
        let mut ram = GuestRam::default();
        ram.insert(RamRegion {
            guest_phys_addr: 0,
            slot: 0,
            mapping: Arc::new(Mapping::anonymous(RAM, false).unwrap()),
        });
        let ram = Arc::new(ram);
        let rig = Self {
            watch: VsockWatch(core.clone()),
            core,
            view: DeviceMemory::new(ram.clone()).unwrap(),
            ram,
            path,
            avail: [0; 3],
            rx_seen: 0,
            rx_offered: 0,
            guest_buf_alloc: 64 * 1024,
            guest_fwd_cnt: 0,
        };
        rig.core
            .activate(
                rig.ram.clone(),
                COMMON_FEATURES & !(1 << 29),
                &rig.configs(),
            )
            .unwrap();
        rig
    }

    fn configs(&self) -> Vec<Option<QueueConfig>> {
        RINGS
            .iter()
            .map(|&base| {
                Some(QueueConfig {
                    size: u64::from(SIZE),
                    desc: base,
                    avail: base + 0x400,
                    used: base + 0x800,
                })
            })
            .collect()
    }

    fn memory(&self) -> &Memory {
        self.view.memory()
    }

    fn counter(&self, name: &str) -> u64 {
        let counters = self.core.counters.snapshot();
        counters.into_iter().find(|(n, _)| *n == name).unwrap().1
    }

    fn offer(&mut self, queue: usize, head: u16) {
        let avail = RINGS[queue] + 0x400;
        let slot = u64::from(self.avail[queue] % SIZE);
        put_u16(self.memory(), avail + 4 + 2 * slot, head);
        self.avail[queue] = self.avail[queue].wrapping_add(1);
        put_u16(self.memory(), avail + 2, self.avail[queue]);
    }

    /// Fills the rx ring with 4 KiB buffers and rings.
    fn fill_rx(&mut self) {
        while self.rx_offered.wrapping_sub(self.rx_seen) < SIZE {
            let index = self.rx_offered % SIZE;
            let address = RX_BUFFERS + u64::from(index) * u64::from(RX_BUFFER);
            put_descriptor(self.memory(), RINGS[0], index, address, RX_BUFFER, WRITE, 0);
            self.offer(RX_QUEUE, index);
            self.rx_offered = self.rx_offered.wrapping_add(1);
        }
        self.core.serve(RX_QUEUE);
    }

    /// The packets the device put in the rx ring since the last call (the buffers
    /// given back), after letting it look at its host sockets.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut packets = Vec::new();
        for _ in 0..64 {
            let _ = self.watch.ready();
            let used = get_u16(self.memory(), RINGS[0] + 0x800 + 2);
            if used == self.rx_seen {
                break;
            }
            while self.rx_seen != used {
                let at = RINGS[0] + 0x800 + 4 + 8 * u64::from(self.rx_seen % SIZE);
                let (head, length) = (get_u32(self.memory(), at), get_u32(self.memory(), at + 4));
                let address = RX_BUFFERS + u64::from(head) * u64::from(RX_BUFFER);
                let mut bytes = vec![0u8; length as usize];
                self.memory()
                    .read_slice(&mut bytes, GuestAddress(address))
                    .unwrap();
                let mut raw = [0u8; HEADER_SIZE];
                raw.copy_from_slice(&bytes[..HEADER_SIZE]);
                let header = Header::parse(&raw);
                assert_eq!(header.len as usize, bytes.len() - HEADER_SIZE);
                packets.push((header, bytes[HEADER_SIZE..].to_vec()));
                self.rx_seen = self.rx_seen.wrapping_add(1);
            }
            self.fill_rx();
        }
        packets
    }

    fn header(&self, op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            kind: TYPE_STREAM,
            op,
            buf_alloc: self.guest_buf_alloc,
            fwd_cnt: self.guest_fwd_cnt,
            ..Header::default()
        }
    }

    /// One tx packet: the raw bytes in one descriptor (`writable` to break the rules).
    fn send_raw(&mut self, bytes: &[u8], writable: bool) {
        self.memory()
            .write_slice(bytes, GuestAddress(TX_DATA))
            .unwrap();
        let flags = if writable { WRITE } else { 0 };
        let head = self.avail[TX_QUEUE] % SIZE;
        put_descriptor(
            self.memory(),
            RINGS[1],
            head,
            TX_DATA,
            bytes.len() as u32,
            flags,
            0,
        );
        self.offer(TX_QUEUE, head);
        self.core.serve(TX_QUEUE);
    }

    fn send(&mut self, mut header: Header, payload: &[u8]) {
        if header.op == RW {
            header.len = payload.len() as u32;
        }
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_raw(&bytes, false);
    }

    /// A host client through CONNECT to guest port `port`, answered: (client, host port).
    fn host_connects(&mut self, port: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(&self.path).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let packets = self.received();
        let (request, _) = packets
            .iter()
            .find(|(h, _)| h.op == REQUEST && h.dst_port == port)
            .expect("a REQUEST for the guest port");
        assert_eq!((request.src_cid, request.dst_cid), (HOST_CID, CID));
        assert_eq!(request.buf_alloc, BUF_ALLOC);
        let local = request.src_port;
        assert!(local >= 1 << 30);
        self.send(self.header(RESPONSE, port, local), &[]);
        let line = read_line(&mut client);
        assert_eq!(line, format!("OK {local}\n"));
        (client, local)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.core.close();
    }
}

fn read_line(client: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        client.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

fn data_of(packets: &[(Header, Vec<u8>)], port: u32) -> Vec<u8> {
    packets
        .iter()
        .filter(|(h, _)| h.op == RW && h.dst_port == port)
        .flat_map(|(_, data)| data.clone())
        .collect()
}

#[test]
fn the_device_is_a_vsock_device_with_the_guest_cid_in_its_config() {
    let rig = Rig::new();
    assert_eq!(rig.core.device_type(), 19);
    assert_eq!(rig.core.num_queues(), 3);
    assert_eq!(rig.core.features(), COMMON_FEATURES);
    assert_eq!(rig.core.read_config(0, 8), CID);
    assert!(Vsock::new(2, &temp_path()).is_err());
    assert!(Vsock::new(u64::from(u32::MAX) + 1, &temp_path()).is_err());
    assert!(matches!(
        Vsock::new(4, &rig.path),
        Err(VsockError::Socket(unix::SocketError::InUse(_)))
    ));
}

#[test]
fn a_host_connect_is_answered_ok_and_bytes_flow_both_ways() {
    let mut rig = Rig::new();
    rig.fill_rx();
    let (mut client, local) = rig.host_connects(80);
    client.write_all(b"from the host").unwrap();
    let packets = rig.received();
    assert_eq!(data_of(&packets, 80), b"from the host");
    let rw = &packets.iter().find(|(h, _)| h.op == RW).unwrap().0;
    assert_eq!(
        (rw.src_port, rw.dst_port, rw.buf_alloc),
        (local, 80, BUF_ALLOC)
    );
    rig.send(rig.header(RW, 80, local), b"from the guest");
    let mut got = [0u8; 14];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"from the guest");
    assert_eq!(rig.counter("vsock_connections"), 1);
}

#[test]
fn a_guest_rst_before_its_response_closes_the_host_client() {
    let mut rig = Rig::new();
    rig.fill_rx();
    let mut client = UnixStream::connect(&rig.path).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"CONNECT 81\n").unwrap();
    let request = rig.received()[0].0;
    rig.send(rig.header(RST, 81, request.src_port), &[]);
    let mut rest = Vec::new();
    assert_eq!(client.read_to_end(&mut rest).unwrap(), 0);
    // A bad line closes the client with nothing sent to the guest.
    let mut bad = UnixStream::connect(&rig.path).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    bad.write_all(b"HELLO 81\n").unwrap();
    assert!(rig.received().is_empty());
    assert_eq!(bad.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn a_port_nobody_listens_on_is_reset_and_a_listening_path_port_is_reached() {
    let mut rig = Rig::new();
    rig.fill_rx();
    rig.send(rig.header(REQUEST, 5000, 99), &[]);
    let packets = rig.received();
    assert_eq!(packets.len(), 1);
    let rst = packets[0].0;
    assert_eq!(
        (rst.op, rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port),
        (RST, HOST_CID, CID, 99, 5000)
    );
    // A listener at PATH_77: RESPONSE, and the bytes reach it.
    let mut listener_path = rig.path.clone().into_os_string();
    listener_path.push("_77");
    let listener = UnixListener::bind(&listener_path).unwrap();
    rig.send(rig.header(REQUEST, 5001, 77), &[]);
    let packets = rig.received();
    assert_eq!(packets[0].0.op, RESPONSE);
    assert_eq!((packets[0].0.src_port, packets[0].0.dst_port), (77, 5001));
    let (mut server, _) = listener.accept().unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    rig.send(rig.header(RW, 5001, 77), b"to the host");
    let mut got = [0u8; 11];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"to the host");
    server.write_all(b"back").unwrap();
    assert_eq!(data_of(&rig.received(), 5001), b"back");
    std::fs::remove_file(&listener_path).unwrap();
}

#[test]
fn packets_for_no_stream_and_malformed_packets_never_panic() {
    let mut rig = Rig::new();
    rig.fill_rx();
    // For no stream: RW, SHUTDOWN, credit ops are reset; an RST is not answered.
    for op in [RESPONSE, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST] {
        rig.send(rig.header(op, 6000, 6001), &[]);
        let packets = rig.received();
        assert_eq!(packets.len(), 1, "op {op}");
        assert_eq!(packets[0].0.op, RST);
    }
    rig.send(rig.header(RST, 6000, 6001), &[]);
    assert!(rig.received().is_empty());
    // A live stream, then packets breaking the rules on it.
    let (mut client, local) = rig.host_connects(80);
    let dropped = rig.counter("tx_dropped");
    // Dropped without an answer: a short header, a writable buffer, a foreign or
    // misdirected CID.
    rig.send_raw(&[0u8; 20], false);
    rig.send_raw(&rig.header(RW, 80, local).to_bytes(), true);
    let foreign = Header {
        src_cid: 9,
        ..rig.header(RW, 80, local)
    };
    rig.send(foreign, b"x");
    let misdirected = Header {
        dst_cid: 7,
        ..rig.header(RW, 80, local)
    };
    rig.send(misdirected, b"x");
    assert!(rig.received().is_empty());
    assert_eq!(rig.counter("tx_dropped"), dropped + 4);
    assert_eq!(
        rig.core
            .vsock()
            .unwrap()
            .muxer()
            .stream(local, 80)
            .map(|s| s.0),
        Some(true)
    );
    // An RW whose len is beyond its bytes: the stream is reset, the client closed.
    let mut lying = rig.header(RW, 80, local);
    lying.len = 100;
    let mut bytes = lying.to_bytes().to_vec();
    bytes.extend_from_slice(b"short");
    rig.send_raw(&bytes, false);
    let packets = rig.received();
    assert_eq!(packets.len(), 1);
    assert_eq!((packets[0].0.op, packets[0].0.dst_port), (RST, 80));
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(
        rig.core
            .vsock()
            .unwrap()
            .muxer()
            .stream(local, 80)
            .is_none()
    );
    // An unknown op, an unknown type: RST.
    for (kind, op) in [(TYPE_STREAM, 0), (TYPE_STREAM, 8), (2, REQUEST)] {
        let header = Header {
            kind,
            op,
            ..rig.header(op, 7000, 80)
        };
        rig.send(header, &[]);
        let packets = rig.received();
        assert_eq!(packets.len(), 1, "type {kind} op {op}");
        assert_eq!(packets[0].0.op, RST);
    }
    assert!(!rig.core.needs_reset());
}

#[test]
fn host_bytes_go_to_the_guest_only_within_its_credit() {
    let mut rig = Rig::new();
    rig.fill_rx();
    rig.guest_buf_alloc = 1000;
    let (mut client, local) = rig.host_connects(80);
    client.write_all(&[7u8; 5000]).unwrap();
    assert_eq!(data_of(&rig.received(), 80).len(), 1000);
    assert!(rig.received().is_empty(), "nothing beyond the credit");
    // The guest forwarded 600: 600 more.
    rig.guest_fwd_cnt = 600;
    rig.send(rig.header(CREDIT_UPDATE, 80, local), &[]);
    assert_eq!(data_of(&rig.received(), 80).len(), 600);
    // A CREDIT_REQUEST is answered with our credit.
    rig.send(rig.header(CREDIT_REQUEST, 80, local), &[]);
    let packets = rig.received();
    assert_eq!(packets.len(), 1);
    assert_eq!(
        (packets[0].0.op, packets[0].0.buf_alloc),
        (CREDIT_UPDATE, BUF_ALLOC)
    );
}

#[test]
fn a_host_that_does_not_read_holds_the_guest_back_and_others_flow() {
    let mut rig = Rig::new();
    rig.fill_rx();
    let (_slow, slow_port) = rig.host_connects(80);
    let (mut fast, fast_port) = rig.host_connects(81);
    // The guest sends as its credit allows, as a driver does: BUF_ALLOC less what
    // the device holds unforwarded, from the fwd_cnt of each packet it got.
    let chunk = vec![0x5au8; 60 * 1024];
    let mut sent: u64 = 0;
    let mut device_fwd: u64 = 0;
    for _ in 0..64 {
        let in_flight = sent - device_fwd;
        let credit = u64::from(BUF_ALLOC) - in_flight;
        if credit == 0 {
            break;
        }
        let take = chunk.len().min(credit as usize);
        rig.send(rig.header(RW, 80, slow_port), &chunk[..take]);
        sent += take as u64;
        for (header, _) in rig.received() {
            if header.dst_port == 80 {
                assert_ne!(header.op, RST);
                device_fwd = device_fwd.max(u64::from(header.fwd_cnt));
            }
        }
        let held = rig.core.vsock().unwrap().muxer().held();
        assert!(held <= BUF_ALLOC as usize, "{held} bytes held");
    }
    assert!(sent > u64::from(BUF_ALLOC), "the socket took some: {sent}");
    let held = rig.core.vsock().unwrap().muxer().held();
    assert!(held > 0, "the slow stream holds bytes");
    // The other stream still flows both ways.
    rig.send(rig.header(RW, 81, fast_port), b"ping");
    let mut got = [0u8; 4];
    fast.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    fast.write_all(b"pong").unwrap();
    assert_eq!(data_of(&rig.received(), 81), b"pong");
    // The guest goes beyond its credit: that stream is reset, not buffered.
    rig.send(rig.header(RW, 80, slow_port), &chunk);
    let packets = rig.received();
    assert!(
        packets.iter().any(|(h, _)| h.op == RST && h.dst_port == 80),
        "a guest beyond its credit is reset"
    );
    assert_eq!(rig.core.vsock().unwrap().muxer().held(), 0);
}

#[test]
fn a_forwarded_half_buffer_brings_a_credit_update() {
    let mut rig = Rig::new();
    rig.fill_rx();
    let (mut client, local) = rig.host_connects(80);
    let chunk = vec![1u8; 60 * 1024];
    let mut updates = Vec::new();
    let reader = std::thread::spawn(move || {
        let mut total = 0;
        let mut buffer = vec![0u8; 65536];
        while total < 3 * 60 * 1024 {
            total += client.read(&mut buffer).unwrap();
        }
    });
    for _ in 0..3 {
        rig.send(rig.header(RW, 80, local), &chunk);
    }
    reader.join().unwrap();
    for _ in 0..50 {
        updates.extend(
            rig.received()
                .into_iter()
                .filter(|(h, _)| h.op == CREDIT_UPDATE)
                .map(|(h, _)| h.fwd_cnt),
        );
        if updates.last() == Some(&(3 * 60 * 1024)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!updates.is_empty(), "no CREDIT_UPDATE");
    assert!(updates.iter().all(|&fwd| fwd > BUF_ALLOC / 2));
}

#[test]
fn shutdown_both_ways_and_the_final_rst() {
    let mut rig = Rig::new();
    rig.fill_rx();
    let (mut client, local) = rig.host_connects(80);
    rig.send(rig.header(RW, 80, local), b"last words");
    let mut shutdown = rig.header(SHUTDOWN, 80, local);
    shutdown.flags = SHUTDOWN_SEND;
    rig.send(shutdown, &[]);
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words", "then end of file");
    // The host still sends; then it is done too.
    client.write_all(b"reply").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let packets = rig.received();
    assert_eq!(data_of(&packets, 80), b"reply");
    let last = packets.last().unwrap().0;
    assert_eq!((last.op, last.flags), (SHUTDOWN, SHUTDOWN_SEND));
    // The guest closes: the device ends the stream with an RST.
    shutdown.flags = SHUTDOWN_SEND | SHUTDOWN_RECEIVE;
    rig.send(shutdown, &[]);
    let packets = rig.received();
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, RST);
    assert!(
        rig.core
            .vsock()
            .unwrap()
            .muxer()
            .stream(local, 80)
            .is_none()
    );
}

#[test]
fn a_guest_rst_closes_the_host_client() {
    let mut rig = Rig::new();
    rig.fill_rx();
    let (mut client, local) = rig.host_connects(80);
    rig.send(rig.header(RST, 80, local), &[]);
    let mut rest = Vec::new();
    assert_eq!(client.read_to_end(&mut rest).unwrap(), 0);
    assert!(rig.received().is_empty(), "an RST is not answered");
}

#[test]
fn a_host_client_closing_is_a_shutdown_then_its_stream_is_reset_on_a_write() {
    let mut rig = Rig::new();
    rig.fill_rx();
    let (client, local) = rig.host_connects(80);
    drop(client);
    let packets = rig.received();
    assert_eq!(packets.len(), 1);
    assert_eq!(
        (packets[0].0.op, packets[0].0.flags),
        (SHUTDOWN, SHUTDOWN_SEND)
    );
    rig.send(rig.header(RW, 80, local), b"anyone?");
    let packets = rig.received();
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, RST);
}

#[test]
fn without_receive_buffers_packets_wait_for_the_rx_doorbell() {
    let mut rig = Rig::new();
    let mut client = UnixStream::connect(&rig.path).unwrap();
    client.write_all(b"CONNECT 80\n").unwrap();
    assert_eq!(rig.watch.ready(), Readiness::Rearm);
    assert_eq!(get_u16(rig.memory(), RINGS[0] + 0x800 + 2), 0);
    // The set reports nothing more: the loop is not woken again and again.
    let mut events = Vec::new();
    rig.core.vsock().unwrap().epoll_ready(&mut events);
    assert!(events.is_empty(), "{events:?}");
    rig.fill_rx();
    let packets = rig.received();
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, REQUEST);
}

#[test]
fn a_request_the_guest_never_answers_closes_the_client_and_resets_the_stream() {
    let mut rig = Rig::new();
    rig.core
        .vsock()
        .unwrap()
        .muxer()
        .set_request_timeout(Duration::from_millis(50));
    rig.fill_rx();
    let mut client = UnixStream::connect(&rig.path).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"CONNECT 80\n").unwrap();
    let packets = rig.received();
    assert_eq!(packets[0].0.op, REQUEST);
    // The driver never answers: the timer fires in the device's epoll set.
    let mut fired = false;
    for _ in 0..200 {
        std::thread::sleep(Duration::from_millis(5));
        let mut events = Vec::new();
        rig.core.vsock().unwrap().epoll_ready(&mut events);
        if !events.is_empty() {
            fired = true;
            break;
        }
    }
    assert!(fired, "the REQUEST timer never fired");
    let packets = rig.received();
    assert_eq!(packets.len(), 1);
    assert_eq!((packets[0].0.op, packets[0].0.dst_port), (RST, 80));
    let mut rest = Vec::new();
    assert_eq!(client.read_to_end(&mut rest).unwrap(), 0);
    // A client whose REQUEST never reached the driver (no buffers) goes quietly.
    let mut quiet = UnixStream::connect(&rig.path).unwrap();
    quiet
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Every rx buffer taken, none given back: the REQUEST cannot go.
    let used = get_u16(rig.memory(), RINGS[0] + 0x800 + 2);
    rig.rx_seen = used;
    for _ in 0..SIZE {
        rig.send(rig.header(REQUEST, 9000, 99), &[]);
    }
    quiet.write_all(b"CONNECT 81\n").unwrap();
    for _ in 0..200 {
        let _ = rig.watch.ready();
        if rig.core.vsock().unwrap().muxer().connections() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(quiet.read_to_end(&mut rest).unwrap(), 0);
    let late = rig.received();
    assert_eq!(late.len(), usize::from(SIZE), "the RSTs to port 9000 only");
    assert!(late.iter().all(|(h, _)| h.dst_port == 9000));
    assert_eq!(rig.core.vsock().unwrap().muxer().connections(), 0);
}

#[test]
fn reset_ends_every_stream_and_a_restore_owes_a_transport_reset() {
    let mut rig = Rig::new();
    rig.fill_rx();
    let (mut client, _) = rig.host_connects(80);
    let states = rig.core.queue_states();
    rig.core.reset();
    let mut rest = Vec::new();
    assert_eq!(client.read_to_end(&mut rest).unwrap(), 0);
    assert_eq!(rig.core.vsock().unwrap().muxer().connections(), 0);
    // A new device continuing the rings: TRANSPORT_RESET in the first event buffer.
    let path = temp_path();
    let restored =
        DeviceCore::new(Backend::Vsock(Box::new(Vsock::new(CID, &path).unwrap()))).unwrap();
    restored
        .activate(
            rig.ram.clone(),
            COMMON_FEATURES & !(1 << 29),
            &rig.configs(),
        )
        .unwrap();
    restored.restore_queue_states(&states).unwrap();
    restored.serve(EVENT_QUEUE);
    assert_eq!(
        get_u16(rig.memory(), RINGS[2] + 0x800 + 2),
        0,
        "no buffer yet"
    );
    rig.memory()
        .write_slice(&[0xff; 4], GuestAddress(EVENT_BUFFER))
        .unwrap();
    put_descriptor(rig.memory(), RINGS[2], 0, EVENT_BUFFER, 4, WRITE, 0);
    rig.offer(EVENT_QUEUE, 0);
    restored.serve(EVENT_QUEUE);
    assert_eq!(get_u16(rig.memory(), RINGS[2] + 0x800 + 2), 1);
    assert_eq!(get_u32(rig.memory(), RINGS[2] + 0x800 + 8), 4);
    assert_eq!(get_u32(rig.memory(), EVENT_BUFFER), EVENT_TRANSPORT_RESET);
    // Once only.
    put_descriptor(rig.memory(), RINGS[2], 1, EVENT_BUFFER, 4, WRITE, 0);
    rig.offer(EVENT_QUEUE, 1);
    restored.serve(EVENT_QUEUE);
    assert_eq!(get_u16(rig.memory(), RINGS[2] + 0x800 + 2), 1);
    restored.close();
    assert!(!path.exists(), "close removes the socket");
}

#[test]
fn streams_beyond_the_limit_are_refused_both_ways() {
    let mut rig = Rig::new();
    rig.fill_rx();
    rig.core.vsock().unwrap().muxer().set_max_connections(4);
    let mut clients = Vec::new();
    for _ in 0..6 {
        let client = UnixStream::connect(&rig.path).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        clients.push(client);
    }
    let _ = rig.watch.ready();
    assert_eq!(rig.core.vsock().unwrap().muxer().connections(), 4);
    // The two beyond it were closed at once.
    let mut rest = Vec::new();
    assert_eq!(clients[5].read_to_end(&mut rest).unwrap(), 0);
    assert_eq!(clients[4].read_to_end(&mut rest).unwrap(), 0);
    // A guest REQUEST beyond it is reset, even to a listening PATH_<port>.
    let mut listener_path = rig.path.clone().into_os_string();
    listener_path.push("_77");
    let _listener = UnixListener::bind(&listener_path).unwrap();
    rig.send(rig.header(REQUEST, 5000, 77), &[]);
    let packets = rig.received();
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, RST);
    std::fs::remove_file(&listener_path).unwrap();
}

mod random_packets {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    /// (op, type, src_cid, dst_cid, port pair, len, payload length, flags, writable)
    type Spec = (u16, u16, u64, u64, u8, u32, usize, u32, bool);

    fn spec() -> impl Strategy<Value = Spec> {
        (
            prop_oneof![1u16..=7, 0u16..10, any::<u16>()],
            prop_oneof![4 => Just(TYPE_STREAM), 1 => any::<u16>()],
            prop_oneof![4 => Just(CID), 1 => any::<u64>()],
            prop_oneof![4 => Just(HOST_CID), 1 => any::<u64>()],
            0u8..4,
            prop_oneof![0u32..300, any::<u32>()],
            0usize..300,
            0u32..4,
            prop_oneof![9 => Just(false), 1 => Just(true)],
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// Whatever the driver sends, on streams that exist or not: no panic, no
        /// NEEDS_RESET (a bad packet is the stream's problem, not the queue's), every
        /// packet the device sends well-formed, never more held than advertised.
        #[test]
        fn random_packets_never_panic_and_get_well_formed_answers(
            specs in vec(spec(), 1..40),
            host_writes in vec(any::<bool>(), 40),
        ) {
            let mut rig = Rig::new();
            rig.fill_rx();
            let (mut client, local) = rig.host_connects(80);
            let mut listener_path = rig.path.clone().into_os_string();
            listener_path.push("_77");
            let _listener = UnixListener::bind(&listener_path).unwrap();
            // Port pairs: the host's stream, a guest stream to PATH_77, nothing, a REQUEST
            // target with no listener.
            let pairs = [(80, local), (5000, 77), (6000, 6001), (7000, 99)];
            for (n, &(op, kind, src_cid, dst_cid, pair, len, payload, flags, writable)) in
                specs.iter().enumerate()
            {
                let (src_port, dst_port) = pairs[usize::from(pair)];
                let header = Header {
                    src_cid,
                    dst_cid,
                    src_port,
                    dst_port,
                    len,
                    kind,
                    op,
                    flags,
                    buf_alloc: 4096,
                    fwd_cnt: 0,
                };
                let mut bytes = header.to_bytes().to_vec();
                bytes.extend(std::iter::repeat_n(0x42, payload));
                rig.send_raw(&bytes, writable);
                if host_writes[n % host_writes.len()] {
                    let _ = client.write(b"host bytes");
                }
                for (packet, data) in rig.received() {
                    prop_assert_eq!((packet.src_cid, packet.dst_cid), (HOST_CID, CID));
                    prop_assert_eq!(packet.kind, TYPE_STREAM);
                    prop_assert!((1..=7).contains(&packet.op), "op {}", packet.op);
                    prop_assert!(packet.op == RW || data.is_empty());
                }
                let held = rig.core.vsock().unwrap().muxer().held();
                prop_assert!(held <= BUF_ALLOC as usize);
            }
            prop_assert!(!rig.core.needs_reset());
            let _ = std::fs::remove_file(&listener_path);
        }
    }
}

#[test]
fn a_paused_device_leaves_guest_ram_alone_and_resume_delivers() {
    let mut rig = Rig::new();
    rig.fill_rx();
    let (mut client, local) = rig.host_connects(80);
    rig.core.pause();
    client.write_all(b"while paused").unwrap();
    let used = get_u16(rig.memory(), RINGS[0] + 0x800 + 2);
    for _ in 0..3 {
        let _ = rig.watch.ready();
        rig.core.serve(RX_QUEUE);
    }
    assert_eq!(get_u16(rig.memory(), RINGS[0] + 0x800 + 2), used);
    // The driver's packets wait in the tx ring too.
    let head = rig.avail[TX_QUEUE] % SIZE;
    let mut bytes = rig.header(RW, 80, local).to_bytes().to_vec();
    bytes[24..28].copy_from_slice(&2u32.to_le_bytes());
    bytes.extend_from_slice(b"hi");
    rig.memory()
        .write_slice(&bytes, GuestAddress(TX_DATA))
        .unwrap();
    put_descriptor(
        rig.memory(),
        RINGS[1],
        head,
        TX_DATA,
        bytes.len() as u32,
        0,
        0,
    );
    rig.offer(TX_QUEUE, head);
    rig.core.serve(TX_QUEUE);
    client.set_nonblocking(true).unwrap();
    let mut got = [0u8; 2];
    assert!(
        client.read(&mut got).is_err(),
        "nothing reaches the host while paused"
    );
    client.set_nonblocking(false).unwrap();
    // resume() rings every doorbell; the loop would serve them.
    rig.core.resume();
    for queue in [RX_QUEUE, TX_QUEUE, EVENT_QUEUE] {
        rig.core.serve(queue);
    }
    assert_eq!(data_of(&rig.received(), 80), b"while paused");
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hi");
}

#[test]
fn a_malformed_receive_chain_needs_a_reset_once_and_nothing_more_is_written() {
    let mut rig = Rig::new();
    let mut client = UnixStream::connect(&rig.path).unwrap();
    client.write_all(b"CONNECT 80\n").unwrap();
    // A receive buffer beyond guest RAM.
    put_descriptor(rig.memory(), RINGS[0], 0, RAM as u64, RX_BUFFER, WRITE, 0);
    rig.offer(RX_QUEUE, 0);
    rig.core.serve(RX_QUEUE);
    let _ = rig.watch.ready();
    assert!(rig.core.needs_reset());
    let other = UnixStream::connect(&rig.path).unwrap();
    (&other).write_all(b"CONNECT 81\n").unwrap();
    for _ in 0..3 {
        let _ = rig.watch.ready();
        rig.core.serve(RX_QUEUE);
    }
    assert_eq!(rig.counter("malformed_chains"), 1);
    assert_eq!(get_u16(rig.memory(), RINGS[0] + 0x800 + 2), 0);
    // reset() brings it back: streams gone, a new driver served.
    rig.core.reset();
    assert!(!rig.core.needs_reset());
    assert_eq!(rig.core.vsock().unwrap().muxer().connections(), 0);
}

#[test]
fn a_client_that_does_not_finish_its_connect_line_in_time_is_closed() {
    let mut rig = Rig::new();
    rig.core
        .vsock()
        .unwrap()
        .muxer()
        .set_line_timeout(Duration::from_millis(100));
    rig.fill_rx();
    let open = |line: &[u8]| {
        let mut client = UnixStream::connect(&rig.path).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.write_all(line).unwrap();
        client
    };
    let opened = std::time::Instant::now();
    let mut silent = open(b"");
    let mut half = open(b"CONNECT 8");
    let mut whole = open(b"CONNECT 80\n");
    let packets = rig.received();
    assert_eq!(packets.len(), 1);
    let (request, _) = &packets[0];
    assert_eq!((request.op, request.dst_port), (REQUEST, 80));
    rig.send(rig.header(RESPONSE, 80, request.src_port), &[]);
    assert_eq!(read_line(&mut whole), format!("OK {}\n", request.src_port));
    assert_eq!(rig.core.vsock().unwrap().muxer().connections(), 3);
    // The deadline passes: the timer fires in the device's epoll set.
    while rig.core.vsock().unwrap().muxer().connections() > 1 {
        assert!(
            opened.elapsed() < Duration::from_secs(5),
            "no deadline fired"
        );
        std::thread::sleep(Duration::from_millis(10));
        let _ = rig.watch.ready();
    }
    assert!(
        opened.elapsed() >= Duration::from_millis(100),
        "closed early"
    );
    let mut rest = Vec::new();
    assert_eq!(silent.read_to_end(&mut rest).unwrap(), 0);
    assert_eq!(half.read_to_end(&mut rest).unwrap(), 0);
    // Neither reached the driver, so it hears nothing of them.
    assert!(rig.received().is_empty());
    // The stream whose line was whole goes on.
    whole.write_all(b"still here").unwrap();
    assert_eq!(data_of(&rig.received(), 80), b"still here");
    assert_eq!(rig.core.vsock().unwrap().muxer().connections(), 1);
}
