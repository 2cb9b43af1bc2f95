//! virtio-net on the device (DeviceCore) with a socketpair standing in for the TAP: the
//! test holds the other end, reading what the device transmits and writing what it
//! receives, one datagram per frame as a TAP gives them.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::backend::Net;
use super::header::{F_NEEDS_CSUM, GSO_TCPV4};
use super::mac::{parse_mac, random_mac};
use super::tap::{Offloads, Tap};
use super::*;
use crate::eventfd::read_counter;
use crate::fd_watch::Readiness;
use crate::memory::{GuestRam, Mapping, RamRegion};
use crate::virtio::device::{Backend, DeviceCore};
use crate::virtio::guest_memory::{DeviceMemory, Memory};
use crate::virtio::queue::QueueConfig;
use crate::virtio::test_ring::{NEXT, WRITE, get_u16, get_u32, put_descriptor, put_u16};
use crate::virtio::{COMMON_FEATURES, VIRTIO_F_RING_EVENT_IDX};

const RAM: usize = 0x40000;
const SIZE: u16 = 8;
const DATA: u64 = 0x10000;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// One interrupt per batch (no EVENT_IDX), as the blk tests.
const BASE: u64 = COMMON_FEATURES & !(1 << VIRTIO_F_RING_EVENT_IDX);

/// The driver's side of one queue at `base` (descriptors, avail +0x400, used +0x800).
struct Ring {
    base: u64,
    avail_idx: u16,
}

impl Ring {
    fn config(&self) -> QueueConfig {
        QueueConfig {
            size: u64::from(SIZE),
            desc: self.base,
            avail: self.base + 0x400,
            used: self.base + 0x800,
        }
    }

    fn descriptor(&self, memory: &Memory, index: u16, address: u64, length: u32, flags: u16) {
        put_descriptor(memory, self.base, index, address, length, flags, index + 1);
    }

    fn offer(&mut self, memory: &Memory, head: u16) {
        let slot = u64::from(self.avail_idx % SIZE);
        put_u16(memory, self.base + 0x400 + 4 + 2 * slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        put_u16(memory, self.base + 0x400 + 2, self.avail_idx);
    }

    fn used_idx(&self, memory: &Memory) -> u16 {
        get_u16(memory, self.base + 0x800 + 2)
    }

    fn used(&self, memory: &Memory, n: u16) -> (u32, u32) {
        let at = self.base + 0x800 + 4 + 8 * u64::from(n % SIZE);
        (get_u32(memory, at), get_u32(memory, at + 4))
    }
}

/// A net device on a fake TAP, and the TAP's other end.
fn net_core(offloads: Offloads) -> (Arc<DeviceCore>, UnixDatagram) {
    // SEQPACKET: one read per frame, as a TAP, and an end of file when the peer goes.
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array we own.
    let made =
        unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
    assert_eq!(made, 0);
    // SAFETY: both fds were just made and are owned by nothing else.
    let (fd, peer) = unsafe {
        (
            OwnedFd::from_raw_fd(fds[0]),
            UnixDatagram::from_raw_fd(fds[1]),
        )
    };
    // SAFETY: F_SETFL on the open fd we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let net = Net::new(Tap::from_fd(fd, offloads), MAC);
    (Arc::new(DeviceCore::new(Backend::Net(net)).unwrap()), peer)
}

struct Rig {
    core: Arc<DeviceCore>,
    ram: Arc<GuestRam>,
    view: DeviceMemory,
    peer: UnixDatagram,
    rx: Ring,
    tx: Ring,
}

impl Rig {
    fn new(offloads: Offloads) -> Self {
        let (core, peer) = net_core(offloads);
        let mut ram = GuestRam::default();
        ram.insert(RamRegion {
            guest_phys_addr: 0,
            slot: 0,
            mapping: Arc::new(Mapping::anonymous(RAM, false).unwrap()),
        });
        let ram = Arc::new(ram);
        Self {
            core,
            view: DeviceMemory::new(ram.clone()).unwrap(),
            ram,
            peer,
            rx: Ring {
                base: 0x1000,
                avail_idx: 0,
            },
            tx: Ring {
                base: 0x4000,
                avail_idx: 0,
            },
        }
    }

    fn activate(&self, features: u64) {
        self.core
            .activate(
                self.ram.clone(),
                features,
                &[Some(self.rx.config()), Some(self.tx.config())],
            )
            .unwrap();
        // activate() rang both doorbells: serve them as the loop would.
        self.core.serve(RX_QUEUE);
        self.core.serve(TX_QUEUE);
    }

    fn memory(&self) -> &Memory {
        self.view.memory()
    }

    fn counter(&self, name: &str) -> u64 {
        let counters = self.core.counters.snapshot();
        counters.into_iter().find(|(n, _)| *n == name).unwrap().1
    }

    fn interrupts(&self, queue: usize) -> u64 {
        read_counter(self.core.interrupt(queue).unwrap().as_raw_fd())
            .unwrap()
            .unwrap_or(0)
    }

    /// A TX chain at descriptors head..: each part (bytes, writable) at its own address.
    fn send(&mut self, head: u16, parts: &[(&[u8], bool)]) {
        let mut address = DATA + u64::from(head) * 0x2000;
        for (i, (bytes, writable)) in parts.iter().enumerate() {
            self.memory()
                .write_slice(bytes, GuestAddress(address))
                .unwrap();
            let last = i + 1 == parts.len();
            let flags = if last { 0 } else { NEXT } | if *writable { WRITE } else { 0 };
            let index = head + i as u16;
            self.tx
                .descriptor(self.memory(), index, address, bytes.len() as u32, flags);
            address += bytes.len() as u64;
        }
        let memory = self.view.memory();
        self.tx.offer(memory, head);
    }

    /// `count` one-descriptor RX buffers of `length` bytes at descriptors first...
    fn offer_rx(&mut self, first: u16, count: u16, length: u32) {
        for i in 0..count {
            let index = (first + i) % SIZE;
            let address = rx_buffer(index);
            put_descriptor(
                self.memory(),
                self.rx.base,
                index,
                address,
                length,
                WRITE,
                0,
            );
            let memory = self.view.memory();
            self.rx.offer(memory, index);
        }
    }

    fn rx_bytes(&self, index: u16, length: usize) -> Vec<u8> {
        let mut out = vec![0u8; length];
        self.memory()
            .read_slice(&mut out, GuestAddress(rx_buffer(index)))
            .unwrap();
        out
    }

    /// Whether a datagram waits at the peer (what the device transmitted).
    fn transmitted(&self) -> Option<Vec<u8>> {
        self.peer.set_nonblocking(true).unwrap();
        let mut buffer = vec![0u8; 70000];
        let got = self.peer.recv(&mut buffer).ok();
        self.peer.set_nonblocking(false).unwrap();
        got.map(|n| buffer[..n].to_vec())
    }
}

fn rx_buffer(index: u16) -> u64 {
    DATA + 0x20000 + u64::from(index) * 0x1000
}

fn frame(length: usize, seed: u8) -> Vec<u8> {
    (0..length)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// A TAP frame: a header (flags, gso_type; the rest 0) and the frame.
fn with_header(flags: u8, gso: u8, frame: &[u8]) -> Vec<u8> {
    let mut bytes = vec![flags, gso, 0, 0, 0, 0, 0, 0, 0, 0, 0xee, 0xee];
    bytes.extend_from_slice(frame);
    bytes
}

#[test]
fn features_and_config_follow_the_tap() {
    let plain = Rig::new(Offloads::NONE);
    let features = plain.core.features();
    for bit in [
        F_MAC,
        F_STATUS,
        F_MRG_RXBUF,
        F_CSUM,
        F_HOST_TSO4,
        F_HOST_TSO6,
    ] {
        assert!(has(features, bit), "bit {bit}");
    }
    for bit in [
        F_GUEST_CSUM,
        F_GUEST_TSO4,
        F_GUEST_TSO6,
        F_GUEST_UFO,
        F_HOST_UFO,
    ] {
        assert!(!has(features, bit), "bit {bit}");
    }
    let offloading = Rig::new(Offloads {
        csum: true,
        tso4: true,
        tso6: true,
        ufo: true,
    });
    let features = offloading.core.features();
    for bit in [
        F_GUEST_CSUM,
        F_GUEST_TSO4,
        F_GUEST_TSO6,
        F_GUEST_UFO,
        F_HOST_UFO,
    ] {
        assert!(has(features, bit), "bit {bit}");
    }
    assert_eq!(plain.core.device_type(), 1);
    assert_eq!(plain.core.num_queues(), 2);
    assert_eq!(plain.core.config_size(), CONFIG_SIZE);
    assert_eq!(plain.core.read_config(0, 6), 0x5634_1200_5452);
    assert_eq!(plain.core.read_config(6, 2), 1); // VIRTIO_NET_S_LINK_UP
}

#[test]
fn a_tx_chain_reaches_the_tap_as_header_and_frame() {
    let mut rig = Rig::new(Offloads::NONE);
    rig.activate(BASE | 1 << F_CSUM | 1 << F_HOST_TSO4);
    let payload = frame(1500, 3);
    let header = with_header(F_NEEDS_CSUM, GSO_TCPV4, &[]);
    // The header and the frame split across three descriptors, as Linux may.
    rig.send(
        0,
        &[
            (&header[..5], false),
            (&header[5..], false),
            (&payload, false),
        ],
    );
    rig.core.serve(TX_QUEUE);
    let sent = rig.transmitted().expect("a frame on the TAP");
    assert_eq!(sent, with_header(F_NEEDS_CSUM, GSO_TCPV4, &payload));
    assert_eq!(rig.tx.used_idx(rig.memory()), 1);
    assert_eq!(rig.tx.used(rig.memory(), 0), (0, 0));
    assert_eq!(
        (rig.counter("tx_packets"), rig.counter("tx_bytes")),
        (1, 1500)
    );
    assert_eq!(rig.interrupts(TX_QUEUE), 1);
}

#[test]
fn malformed_tx_packets_are_dropped_counted_and_completed() {
    let mut rig = Rig::new(Offloads::NONE);
    rig.activate(BASE | 1 << F_CSUM);
    let short = [0u8; 8];
    let header = with_header(0, 0, &[]);
    let too_long = vec![0u8; MAX_FRAME + 1];
    let longest = frame(MAX_FRAME, 1);
    let tso = with_header(F_NEEDS_CSUM, GSO_TCPV4, &[]);
    rig.send(0, &[(&short, false)]);
    rig.send(1, &[(&header, false), (&[1, 2, 3], true)]);
    rig.send(3, &[(&header, false), (&too_long, false)]);
    rig.send(5, &[(&tso, false), (&[1, 2, 3], false)]); // HOST_TSO4 not accepted
    rig.send(7, &[(&with_header(0, 0, &longest), false)]);
    rig.core.serve(TX_QUEUE);
    assert_eq!(rig.counter("tx_dropped"), 4);
    assert_eq!(rig.counter("tx_packets"), 1);
    assert!(!rig.core.needs_reset());
    assert_eq!(rig.tx.used_idx(rig.memory()), 5);
    for n in 0..5 {
        assert_eq!(rig.tx.used(rig.memory(), n).1, 0);
    }
    assert_eq!(rig.transmitted().unwrap().len(), HEADER_SIZE + MAX_FRAME);
    assert_eq!(rig.transmitted(), None);
}

#[test]
fn a_frame_fills_one_buffer_with_num_buffers_one() {
    let mut rig = Rig::new(Offloads::NONE);
    rig.activate(BASE);
    rig.offer_rx(0, 2, 2048);
    let payload = frame(60, 9);
    rig.peer
        .send(&with_header(F_NEEDS_CSUM, 0, &payload))
        .unwrap();
    assert_eq!(rig.core.receive(), Readiness::Rearm);
    assert_eq!(rig.rx.used_idx(rig.memory()), 1);
    assert_eq!(rig.rx.used(rig.memory(), 0), (0, 72));
    // flags cleared (no GUEST_CSUM), num_buffers 1.
    let mut expected = with_header(0, 0, &payload);
    expected[10..12].copy_from_slice(&[1, 0]);
    assert_eq!(rig.rx_bytes(0, 72), expected);
    assert_eq!(
        (rig.counter("rx_packets"), rig.counter("rx_bytes")),
        (1, 60)
    );
    assert_eq!(rig.interrupts(RX_QUEUE), 1);
}

#[test]
fn mrg_rxbuf_spreads_a_frame_over_several_buffers() {
    let mut rig = Rig::new(Offloads::NONE);
    rig.activate(BASE | 1 << F_MRG_RXBUF);
    rig.offer_rx(0, 6, 64);
    let payload = frame(200, 5);
    rig.peer.send(&with_header(0, 0, &payload)).unwrap();
    assert_eq!(rig.core.receive(), Readiness::Rearm);
    // 212 bytes: 64 + 64 + 64 + 20, published together.
    assert_eq!(rig.rx.used_idx(rig.memory()), 4);
    let lengths: Vec<_> = (0..4).map(|n| rig.rx.used(rig.memory(), n)).collect();
    assert_eq!(lengths, vec![(0, 64), (1, 64), (2, 64), (3, 20)]);
    let mut got = Vec::new();
    for (index, length) in [(0, 64), (1, 64), (2, 64), (3, 20)] {
        got.extend(rig.rx_bytes(index, length));
    }
    let mut expected = with_header(0, 0, &payload);
    expected[10..12].copy_from_slice(&4u16.to_le_bytes());
    assert_eq!(got, expected);
}

#[test]
fn without_buffers_the_tap_is_left_alone_until_the_rx_doorbell() {
    let mut rig = Rig::new(Offloads::NONE);
    rig.activate(BASE);
    let payload = frame(100, 1);
    rig.peer.send(&with_header(0, 0, &payload)).unwrap();
    assert_eq!(rig.core.receive(), Readiness::Park);
    assert_eq!(rig.counter("rx_deferred"), 1);
    assert_eq!(rig.counter("rx_dropped"), 0);
    // Still in the fake TAP's queue: nothing was read.
    let mut probe = [0u8; 1];
    let tap = rig.core.net().unwrap().tap().as_raw_fd();
    // SAFETY: MSG_PEEK into a one-byte array we own; the fd is the device's open socket.
    let peeked = unsafe {
        libc::recv(
            tap,
            probe.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    assert_eq!(peeked, 1);
    rig.offer_rx(0, 1, 2048);
    rig.core.serve(RX_QUEUE);
    assert_eq!(rig.rx.used(rig.memory(), 0), (0, 112));
    assert_eq!(rig.counter("rx_packets"), 1);
}

#[test]
fn a_merged_frame_waits_for_enough_buffers() {
    let mut rig = Rig::new(Offloads::NONE);
    rig.activate(BASE | 1 << F_MRG_RXBUF);
    rig.offer_rx(0, 2, 64);
    rig.peer.send(&with_header(0, 0, &frame(200, 2))).unwrap();
    assert_eq!(rig.core.receive(), Readiness::Park);
    assert_eq!(rig.counter("rx_deferred"), 1);
    assert_eq!(rig.rx.used_idx(rig.memory()), 0); // nothing used for a part of it
    rig.offer_rx(2, 2, 64);
    rig.core.serve(RX_QUEUE);
    assert_eq!(rig.rx.used_idx(rig.memory()), 4);
    assert_eq!(rig.counter("rx_packets"), 1);
}

#[test]
fn a_frame_no_buffer_can_hold_is_dropped_and_the_buffers_kept() {
    let mut rig = Rig::new(Offloads::NONE);
    rig.activate(BASE);
    rig.offer_rx(0, 1, 64);
    rig.peer.send(&with_header(0, 0, &frame(200, 2))).unwrap();
    rig.peer.send(&with_header(0, 0, &frame(40, 4))).unwrap();
    assert_eq!(rig.core.receive(), Readiness::Rearm); // buffers used up, the TAP empty
    assert_eq!(
        (rig.counter("rx_dropped"), rig.counter("rx_deferred")),
        (1, 0)
    );
    assert_eq!(rig.rx.used(rig.memory(), 0), (0, 52));
    assert_eq!(rig.rx_bytes(0, 52)[12..], frame(40, 4));

    // Merged: the whole ring offered (8 x 16 bytes) is still too small.
    let mut rig = Rig::new(Offloads::NONE);
    rig.activate(BASE | 1 << F_MRG_RXBUF);
    rig.offer_rx(0, SIZE, 16);
    rig.peer.send(&with_header(0, 0, &frame(200, 2))).unwrap();
    rig.peer.send(&with_header(0, 0, &frame(20, 4))).unwrap();
    assert_eq!(rig.core.receive(), Readiness::Rearm);
    assert_eq!(rig.counter("rx_dropped"), 1);
    assert_eq!(rig.rx.used_idx(rig.memory()), 2);
    assert_eq!(rig.rx.used(rig.memory(), 1), (1, 16));
}

#[test]
fn a_paused_or_reset_device_leaves_the_tap_alone() {
    let mut rig = Rig::new(Offloads::NONE);
    rig.activate(BASE);
    rig.offer_rx(0, 1, 2048);
    rig.peer.send(&with_header(0, 0, &frame(60, 1))).unwrap();
    rig.core.pause();
    assert_eq!(rig.core.receive(), Readiness::Park);
    assert_eq!(rig.rx.used_idx(rig.memory()), 0);
    rig.core.resume();
    rig.core.serve(RX_QUEUE);
    assert_eq!(rig.rx.used_idx(rig.memory()), 1);
    rig.core.reset();
    rig.peer.send(&with_header(0, 0, &frame(60, 1))).unwrap();
    assert_eq!(rig.core.receive(), Readiness::Park);
}

#[test]
fn the_peer_going_away_takes_the_link_down() {
    let rig = Rig::new(Offloads::NONE);
    rig.activate(BASE);
    let mut rig = rig;
    rig.offer_rx(0, 1, 2048);
    let Rig { core, peer, .. } = rig;
    drop(peer);
    assert_eq!(core.receive(), Readiness::Park);
    assert_eq!(core.read_config(6, 2), 0);
    assert_eq!(
        read_counter(core.config_interrupt().as_raw_fd()).unwrap(),
        Some(1)
    );
    assert!(!core.needs_reset());
}

#[test]
fn close_lets_the_tap_go() {
    let mut rig = Rig::new(Offloads::NONE);
    rig.activate(BASE);
    rig.core.close();
    let mut buffer = [0u8; 16];
    // The device's end is closed: the peer reads the end of the stream.
    assert_eq!(rig.peer.recv(&mut buffer).unwrap(), 0);
    rig.send(0, &[(&with_header(0, 0, &[1, 2, 3]), false)]);
    rig.core.serve(TX_QUEUE); // a closed device serves nothing, and does not crash
    assert_eq!(rig.counter("tx_packets"), 0);
}

#[test]
fn queue_states_carry_both_rings_to_a_new_device() {
    let mut rig = Rig::new(Offloads::NONE);
    rig.activate(BASE);
    rig.send(0, &[(&with_header(0, 0, &frame(60, 1)), false)]);
    rig.core.serve(TX_QUEUE);
    rig.offer_rx(0, 2, 2048);
    rig.peer.send(&with_header(0, 0, &frame(60, 2))).unwrap();
    rig.core.receive();
    rig.core.pause();
    let states = rig.core.queue_states();
    assert_eq!(
        (states[RX_QUEUE].next_avail, states[RX_QUEUE].next_used),
        (1, 1)
    );
    assert_eq!(
        (states[TX_QUEUE].next_avail, states[TX_QUEUE].next_used),
        (1, 1)
    );
    rig.core.close();

    let (core, peer) = net_core(Offloads::NONE);
    core.pause();
    core.activate(
        rig.ram.clone(),
        BASE,
        &[Some(rig.rx.config()), Some(rig.tx.config())],
    )
    .unwrap();
    core.restore_queue_states(&states).unwrap();
    core.resume();
    rig.send(2, &[(&with_header(0, 0, &frame(70, 3)), false)]);
    core.serve(TX_QUEUE);
    assert_eq!(rig.tx.used_idx(rig.memory()), 2);
    assert_eq!(rig.tx.used(rig.memory(), 1), (2, 0));
    let mut sent = vec![0u8; 200];
    assert_eq!(peer.recv(&mut sent).unwrap(), HEADER_SIZE + 70);
    peer.send(&with_header(0, 0, &frame(80, 4))).unwrap();
    assert_eq!(core.receive(), Readiness::Rearm);
    // The second buffer, the one the first device had not used.
    assert_eq!(rig.rx.used_idx(rig.memory()), 2);
    assert_eq!(rig.rx.used(rig.memory(), 1), (1, 92));
}

#[test]
fn event_idx_holds_rx_interrupts_until_used_event() {
    let mut rig = Rig::new(Offloads::NONE);
    rig.activate(BASE | 1 << VIRTIO_F_RING_EVENT_IDX);
    rig.offer_rx(0, 4, 2048);
    // used_event (after the avail ring's entries, 2.7.10) = 1: interrupt once entry 1
    // is used, not for entry 0.
    put_u16(
        rig.memory(),
        rig.rx.base + 0x400 + 4 + 2 * u64::from(SIZE),
        1,
    );
    rig.peer.send(&with_header(0, 0, &frame(60, 1))).unwrap();
    rig.core.receive();
    assert_eq!(rig.interrupts(RX_QUEUE), 0);
    rig.peer.send(&with_header(0, 0, &frame(60, 2))).unwrap();
    rig.core.receive();
    assert_eq!(rig.interrupts(RX_QUEUE), 1);
    assert_eq!(rig.counter("suppressed_interrupts"), 1);
}

#[test]
fn mac_addresses_are_checked() {
    assert_eq!(parse_mac("52:54:00:12:34:56"), Ok(MAC));
    for bad in [
        "52:54:00:12:34",
        "52:54:00:12:34:5g",
        "5254:00:12:34:56:",
        "53:54:00:12:34:56",
    ] {
        assert!(parse_mac(bad).is_err(), "{bad}");
    }
    let random = random_mac();
    assert_eq!((random[0], random[1], random[2]), (0x52, 0x54, 0x00));
}

mod random_rings {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::virtio::test_ring::INDIRECT;

    /// (address, length, flags, next)
    type RawDescriptor = (u64, u32, u16, u16);

    /// Mostly a buffer of its own (so that frames are delivered as often as refused),
    /// else anywhere near RAM, or anywhere at all; any flags, any next.
    fn descriptor() -> impl Strategy<Value = (u8, u64, u32, u16, u16)> {
        let kind = prop_oneof![4 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)];
        let length = prop_oneof![
            3 => 0u32..3100,
            1 => Just(12u32),
            1 => Just(64u32),
            1 => any::<u32>(),
        ];
        let flags = prop_oneof![3 => Just(WRITE), 1 => Just(0u16), 2 => 0u16..8];
        let next = prop_oneof![3 => 0u16..SIZE, 1 => 0u16..12];
        (kind, any::<u64>(), length, flags, next)
    }

    fn head() -> impl Strategy<Value = u16> {
        prop_oneof![4 => 0u16..SIZE, 1 => 0u16..12]
    }

    fn materialise(specs: &[(u8, u64, u32, u16, u16)], buffers: u64) -> Vec<RawDescriptor> {
        specs
            .iter()
            .enumerate()
            .map(|(index, &(kind, random, length, flags, next))| {
                let address = match kind {
                    0 => buffers + 0x2000 * index as u64,
                    1 => random % (RAM as u64 + 0x2000),
                    _ => random,
                };
                // Indirect tables are chain.rs's, fuzzed with blk; one here could point
                // into the TX table and make its buffers writable.
                (address, length, flags & !INDIRECT, next)
            })
            .collect()
    }

    fn snapshot(memory: &Memory) -> Vec<u8> {
        let mut bytes = vec![0u8; RAM];
        memory.read_slice(&mut bytes, GuestAddress(0)).unwrap();
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn random_rings_never_panic_nor_write_outside_rx_buffers(
            rx_table in vec(descriptor(), SIZE as usize),
            tx_table in vec(descriptor(), SIZE as usize),
            heads in (vec(head(), SIZE as usize), vec(head(), SIZE as usize)),
            avail in (prop_oneof![4 => 0u16..12, 1 => any::<u16>()], prop_oneof![0u16..12, any::<u16>()]),
            frames in vec(0usize..3000, 0..4),
            features in prop_oneof![
                Just(BASE),
                Just(BASE | 1 << F_MRG_RXBUF),
                Just(COMMON_FEATURES | 1 << F_MRG_RXBUF | 1 << F_CSUM),
            ],
        ) {
            let rig = Rig::new(Offloads::NONE);
            rig.activate(features);
            let rx_table = materialise(&rx_table, DATA);
            let tx_table = materialise(&tx_table, DATA + 0x1000);
            let rings = [(&rig.rx, &rx_table, &heads.0, avail.0), (&rig.tx, &tx_table, &heads.1, avail.1)];
            for (ring, table, heads, idx) in rings {
                for (index, &(address, length, flags, next)) in table.iter().enumerate() {
                    put_descriptor(rig.memory(), ring.base, index as u16, address, length, flags, next);
                }
                for (slot, &head) in heads.iter().enumerate() {
                    put_u16(rig.memory(), ring.base + 0x400 + 4 + 2 * slot as u64, head);
                }
                put_u16(rig.memory(), ring.base + 0x400 + 2, idx);
            }
            for &length in &frames {
                rig.peer.send(&with_header(0, 0, &frame(length, 7))).unwrap();
            }
            let before = snapshot(rig.memory());
            rig.core.serve(TX_QUEUE);
            rig.core.receive();
            rig.core.serve(RX_QUEUE);
            let after = snapshot(rig.memory());
            // Only the used rings (with avail_event) and the RX table's writable
            // buffers may change: a TX chain is never written to.
            let mut allowed = vec![
                (rig.rx.base + 0x800, 6 + 8 * u64::from(SIZE)),
                (rig.tx.base + 0x800, 6 + 8 * u64::from(SIZE)),
            ];
            for &(address, length, flags, _) in &rx_table {
                if flags & WRITE != 0 {
                    allowed.push((address, u64::from(length)));
                }
            }
            for (at, (old, new)) in before.iter().zip(&after).enumerate() {
                let at = at as u64;
                if old != new {
                    prop_assert!(
                        allowed.iter().any(|&(start, length)| at >= start && at - start < length),
                        "byte {at:#x} changed outside every writable buffer"
                    );
                }
            }
            rig.core.reset();
            prop_assert!(!rig.core.needs_reset());
        }
    }
}
