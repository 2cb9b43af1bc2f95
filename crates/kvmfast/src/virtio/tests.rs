//! Queue processing end to end on the device (DeviceCore): a hand-built split ring in a
//! small guest RAM, virtio-blk on a temporary image, virtio-rng, malformed chains,
//! EVENT_IDX, reset.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::blk::{
    Block, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};
use super::device::{ActivateError, Backend, DeviceCore};
use super::disk::{Disk, OpenError};
use super::guest_memory::{DeviceMemory, Memory};
use super::queue::{QueueConfig, SetupError};
use super::queue_state::{QueueState, StateError};
use super::test_ring::{
    AVAIL, DESC, Driver, NEXT, RAM_SIZE, TempImage, USED, WRITE, put_descriptor, put_u16,
};
use super::{COMMON_FEATURES, VIRTIO_F_RING_EVENT_IDX};
use crate::eventfd::read_counter;
use crate::memory::{GuestRam, Mapping, RamRegion};

const SIZE: u16 = 16;
/// VERSION_1 and indirect descriptors: one interrupt per drained batch.
const FEATURES: u64 = COMMON_FEATURES & !(1 << VIRTIO_F_RING_EVENT_IDX);
const HEADERS: u64 = 0x3000;
const STATUS: u64 = 0x3800;
const DATA: u64 = 0x8000;

struct Rig {
    core: DeviceCore,
    ram: Arc<GuestRam>,
    view: DeviceMemory,
    driver: Driver,
}

fn ram() -> Arc<GuestRam> {
    let mut ram = GuestRam::default();
    ram.insert(RamRegion {
        guest_phys_addr: 0,
        slot: 0,
        mapping: Arc::new(Mapping::anonymous(RAM_SIZE as usize, false).unwrap()),
    });
    Arc::new(ram)
}

impl Rig {
    fn new(backend: Backend) -> Self {
        let ram = ram();
        Self {
            core: DeviceCore::new(backend).unwrap(),
            view: DeviceMemory::new(ram.clone()).unwrap(),
            ram,
            driver: Driver::new(SIZE),
        }
    }

    fn block(image: &TempImage, readonly: bool) -> Self {
        let disk = Disk::open(image.path(), readonly, false).unwrap();
        Self::new(Backend::Block(
            Block::new(disk, Some("kvmfast-serial")).unwrap(),
        ))
    }

    fn memory(&self) -> &Memory {
        self.view.memory()
    }

    fn activate(&self, features: u64) {
        self.core
            .activate(self.ram.clone(), features, &[Some(config())])
            .unwrap();
    }

    fn interrupts(&self) -> u64 {
        read_counter(self.core.interrupt(0).unwrap().as_raw_fd())
            .unwrap()
            .unwrap_or(0)
    }

    fn config_interrupts(&self) -> u64 {
        read_counter(self.core.config_interrupt().as_raw_fd())
            .unwrap()
            .unwrap_or(0)
    }

    fn counter(&self, name: &str) -> u64 {
        self.core
            .counters
            .snapshot()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
    }

    /// A blk request at descriptors head..: header, `data` (address, length, writable),
    /// status. Returns the status byte's address.
    fn offer_blk(&mut self, head: u16, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> u64 {
        let header = HEADERS + u64::from(head) * 16;
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        self.memory()
            .write_slice(&raw, GuestAddress(header))
            .unwrap();
        let status = STATUS + u64::from(head);
        self.memory()
            .write_obj(0xffu8, GuestAddress(status))
            .unwrap();
        let mut index = head;
        put_descriptor(self.memory(), DESC, index, header, 16, NEXT, index + 1);
        for &(address, length, writable) in data {
            index += 1;
            let flags = NEXT | if writable { WRITE } else { 0 };
            put_descriptor(
                self.memory(),
                DESC,
                index,
                address,
                length,
                flags,
                index + 1,
            );
        }
        index += 1;
        put_descriptor(self.memory(), DESC, index, status, 1, WRITE, 0);
        self.offer(head);
        status
    }

    fn offer(&mut self, head: u16) {
        self.driver.offer(self.view.memory(), head);
    }

    fn status(&self, address: u64) -> u8 {
        self.memory().read_obj(GuestAddress(address)).unwrap()
    }
}

fn config() -> QueueConfig {
    QueueConfig {
        size: u64::from(SIZE),
        desc: DESC,
        avail: AVAIL,
        used: USED,
    }
}

fn file(image: &TempImage) -> Vec<u8> {
    std::fs::read(&image.path).unwrap()
}

#[test]
fn writes_and_reads_reach_the_image() {
    let image = TempImage::new(8 * 512);
    let mut rig = Rig::block(&image, false);
    rig.activate(FEATURES);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 1) as u8).collect();
    rig.memory()
        .write_slice(&pattern, GuestAddress(DATA))
        .unwrap();
    // A write of two sectors split over two descriptors.
    let out = rig.offer_blk(0, T_OUT, 2, &[(DATA, 512, false), (DATA + 512, 512, false)]);
    rig.core.serve(0);
    assert_eq!(rig.status(out), S_OK);
    assert_eq!(&file(&image)[1024..2048], &pattern[..]);
    assert_eq!(rig.driver.used(rig.memory(), 0), (0, 1));
    let read = rig.offer_blk(4, T_IN, 2, &[(DATA + 0x1000, 1024, true)]);
    rig.core.serve(0);
    assert_eq!(rig.status(read), S_OK);
    let mut back = vec![0u8; 1024];
    rig.memory()
        .read_slice(&mut back, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(back, pattern);
    assert_eq!(rig.driver.used_idx(rig.memory()), 2);
    assert_eq!(rig.driver.used(rig.memory(), 1), (4, 1025));
    assert_eq!(rig.interrupts(), 2);
    assert_eq!(
        (rig.counter("read_bytes"), rig.counter("written_bytes")),
        (1024, 1024)
    );
}

#[test]
fn flush_get_id_and_unknown_types() {
    let image = TempImage::new(8 * 512);
    let mut rig = Rig::block(&image, false);
    rig.activate(FEATURES);
    let flush = rig.offer_blk(0, T_FLUSH, 0, &[]);
    let id = rig.offer_blk(2, T_GET_ID, 0, &[(DATA, 20, true)]);
    let unknown = rig.offer_blk(5, 99, 0, &[]);
    rig.core.serve(0);
    assert_eq!(
        [rig.status(flush), rig.status(id), rig.status(unknown)],
        [S_OK, S_OK, S_UNSUPP]
    );
    let mut serial = [0u8; 20];
    rig.memory()
        .read_slice(&mut serial, GuestAddress(DATA))
        .unwrap();
    assert_eq!(&serial, b"kvmfast-serial\0\0\0\0\0\0");
    assert_eq!(rig.counter("flushes"), 1);
    assert_eq!(rig.counter("unsupported"), 1);
    // Three completions, one doorbell: one interrupt.
    assert_eq!(rig.interrupts(), 1);
}

fn range(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&sector.to_le_bytes());
    raw[8..12].copy_from_slice(&sectors.to_le_bytes());
    raw[12..].copy_from_slice(&flags.to_le_bytes());
    raw
}

#[test]
fn discard_and_write_zeroes_read_back_zeroes() {
    let image = TempImage::new(0);
    std::fs::write(&image.path, vec![0x5Au8; 64 * 512]).unwrap();
    let mut rig = Rig::block(&image, false);
    rig.activate(FEATURES);
    let ranges = [range(8, 8, 0), range(20, 2, 1)].concat();
    rig.memory()
        .write_slice(&ranges, GuestAddress(DATA))
        .unwrap();
    let zeroes = rig.offer_blk(0, T_WRITE_ZEROES, 0, &[(DATA, 32, false)]);
    rig.memory()
        .write_slice(&range(40, 8, 0), GuestAddress(DATA + 0x100))
        .unwrap();
    let discard = rig.offer_blk(3, T_DISCARD, 0, &[(DATA + 0x100, 16, false)]);
    rig.memory()
        .write_slice(&range(48, 8, 1), GuestAddress(DATA + 0x200))
        .unwrap();
    let discard_unmap = rig.offer_blk(6, T_DISCARD, 0, &[(DATA + 0x200, 16, false)]);
    rig.memory()
        .write_slice(&range(63, 2, 0), GuestAddress(DATA + 0x300))
        .unwrap();
    let beyond = rig.offer_blk(9, T_WRITE_ZEROES, 0, &[(DATA + 0x300, 16, false)]);
    rig.core.serve(0);
    assert_eq!(
        [
            rig.status(zeroes),
            rig.status(discard),
            rig.status(discard_unmap),
            rig.status(beyond)
        ],
        [S_OK, S_OK, S_UNSUPP, S_IOERR]
    );
    let bytes = file(&image);
    let zero = |from: usize, to: usize| bytes[from * 512..to * 512].iter().all(|&b| b == 0);
    let kept = |from: usize, to: usize| bytes[from * 512..to * 512].iter().all(|&b| b == 0x5A);
    assert!(kept(0, 8) && zero(8, 16) && kept(16, 20) && zero(20, 22) && kept(22, 40));
    assert!(zero(40, 48), "discard punches a hole on ext4");
    assert!(
        kept(48, 64),
        "an unsupported or failed request changes nothing"
    );
    assert_eq!(bytes.len(), 64 * 512);
}

#[test]
fn out_of_range_and_misshapen_requests_fail_with_ioerr() {
    let image = TempImage::new(8 * 512);
    let mut rig = Rig::block(&image, false);
    rig.activate(FEATURES);
    let past_end = rig.offer_blk(0, T_IN, 7, &[(DATA, 1024, true)]);
    let huge_sector = rig.offer_blk(3, T_OUT, u64::MAX, &[(DATA, 512, false)]);
    let partial_sector = rig.offer_blk(6, T_IN, 0, &[(DATA, 100, true)]);
    // A write whose data the driver marked device-writable.
    let wrong_direction = rig.offer_blk(9, T_OUT, 0, &[(DATA, 512, true)]);
    rig.core.serve(0);
    for status in [past_end, huge_sector, partial_sector, wrong_direction] {
        assert_eq!(rig.status(status), S_IOERR);
    }
    // A header shorter than 16 bytes.
    put_descriptor(rig.memory(), DESC, 12, HEADERS, 8, NEXT, 13);
    put_descriptor(rig.memory(), DESC, 13, STATUS, 1, WRITE, 0);
    rig.offer(12);
    rig.core.serve(0);
    assert_eq!(rig.status(STATUS), S_IOERR);
    assert_eq!(rig.counter("io_errors"), 5);
    assert_eq!(rig.counter("bad_requests"), 3);
    assert!(!rig.core.needs_reset());
    assert_eq!(file(&image), vec![0u8; 8 * 512]);
}

#[test]
fn a_host_io_error_fails_the_request_with_ioerr() {
    let image = TempImage::new(8 * 512);
    let mut rig = Rig::block(&image, false);
    rig.activate(FEATURES);
    // Another process shrinks the image under the device: the read finds no data.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image.path)
        .unwrap()
        .set_len(512)
        .unwrap();
    let read = rig.offer_blk(0, T_IN, 4, &[(DATA, 512, true)]);
    rig.core.serve(0);
    assert_eq!(rig.status(read), S_IOERR);
    assert_eq!(rig.counter("host_errors"), 1);
    assert!(!rig.core.needs_reset());
}

#[test]
fn a_read_only_device_refuses_writes() {
    let image = TempImage::new(0);
    std::fs::write(&image.path, vec![0x11u8; 4 * 512]).unwrap();
    let mut rig = Rig::block(&image, true);
    assert_ne!(rig.core.features() & 1 << 5, 0, "VIRTIO_BLK_F_RO offered");
    rig.activate(FEATURES | 1 << 5);
    rig.memory()
        .write_slice(&[0x22; 512], GuestAddress(DATA))
        .unwrap();
    let write = rig.offer_blk(0, T_OUT, 0, &[(DATA, 512, false)]);
    rig.memory()
        .write_slice(&range(0, 1, 0), GuestAddress(DATA + 0x400))
        .unwrap();
    let zeroes = rig.offer_blk(3, T_WRITE_ZEROES, 0, &[(DATA + 0x400, 16, false)]);
    let read = rig.offer_blk(6, T_IN, 1, &[(DATA + 0x1000, 512, true)]);
    rig.core.serve(0);
    assert_eq!(
        [rig.status(write), rig.status(zeroes), rig.status(read)],
        [S_IOERR, S_IOERR, S_OK]
    );
    assert_eq!(file(&image), vec![0x11u8; 4 * 512]);
}

#[test]
fn a_malformed_chain_stops_the_queue_and_signals_needs_reset_once() {
    let image = TempImage::new(8 * 512);
    let mut rig = Rig::block(&image, false);
    rig.activate(FEATURES);
    let good = rig.offer_blk(0, T_FLUSH, 0, &[]);
    // A loop: 4 -> 5 -> 4.
    put_descriptor(rig.memory(), DESC, 4, HEADERS, 16, NEXT, 5);
    put_descriptor(rig.memory(), DESC, 5, STATUS, 1, WRITE | NEXT, 4);
    rig.offer(4);
    let after = rig.offer_blk(8, T_FLUSH, 0, &[]);
    rig.core.serve(0);
    assert_eq!(rig.status(good), S_OK);
    assert_eq!(
        rig.status(after),
        0xff,
        "nothing served after the bad chain"
    );
    assert!(rig.core.needs_reset());
    assert_eq!(rig.config_interrupts(), 1);
    assert_eq!(rig.interrupts(), 1, "the good request is still signalled");
    rig.offer(8);
    rig.core.serve(0);
    assert_eq!(rig.config_interrupts(), 0, "signalled once");
    assert_eq!(rig.driver.used_idx(rig.memory()), 1);
    rig.core.reset();
    assert!(!rig.core.needs_reset());
    assert_eq!(rig.counter("malformed_chains"), 1);
}

#[test]
fn a_chain_without_a_status_byte_or_a_runaway_avail_index_needs_reset() {
    let image = TempImage::new(8 * 512);
    let mut rig = Rig::block(&image, false);
    rig.activate(FEATURES);
    put_descriptor(rig.memory(), DESC, 0, HEADERS, 16, 0, 0);
    rig.offer(0);
    rig.core.serve(0);
    assert!(rig.core.needs_reset());
    assert_eq!(rig.driver.used_idx(rig.memory()), 0);
    rig.core.reset();
    rig.driver = Driver::new(SIZE);
    put_u16(rig.memory(), USED + 2, 0);
    rig.activate(FEATURES);
    put_u16(rig.memory(), AVAIL + 2, SIZE + 1);
    rig.core.serve(0);
    assert!(rig.core.needs_reset());
    assert_eq!(rig.driver.used_idx(rig.memory()), 0);
}

#[test]
fn event_idx_suppresses_interrupts_until_used_event() {
    let image = TempImage::new(8 * 512);
    let mut rig = Rig::block(&image, false);
    rig.activate(COMMON_FEATURES | 1 << VIRTIO_F_RING_EVENT_IDX);
    // Interrupt only once used idx passes 2 (after the third completion).
    rig.driver.set_used_event(rig.memory(), 2);
    rig.offer_blk(0, T_FLUSH, 0, &[]);
    rig.core.serve(0);
    assert_eq!(rig.interrupts(), 0);
    // The device asks for the next doorbell at the next avail index.
    assert_eq!(rig.driver.avail_event(rig.memory()), 1);
    rig.offer_blk(2, T_FLUSH, 0, &[]);
    rig.core.serve(0);
    assert_eq!(rig.interrupts(), 0);
    rig.offer_blk(4, T_FLUSH, 0, &[]);
    rig.core.serve(0);
    assert_eq!(rig.interrupts(), 1);
    assert_eq!(rig.counter("suppressed_interrupts"), 2);
    assert_eq!(rig.driver.avail_event(rig.memory()), 3);
}

#[test]
fn without_event_idx_no_interrupt_flag_is_honoured() {
    let image = TempImage::new(8 * 512);
    let mut rig = Rig::block(&image, false);
    rig.activate(FEATURES);
    put_u16(rig.memory(), AVAIL, 1);
    rig.offer_blk(0, T_FLUSH, 0, &[]);
    rig.core.serve(0);
    assert_eq!(rig.interrupts(), 0);
    put_u16(rig.memory(), AVAIL, 0);
    rig.offer_blk(2, T_FLUSH, 0, &[]);
    rig.core.serve(0);
    assert_eq!(rig.interrupts(), 1);
}

#[test]
fn after_reset_nothing_is_served() {
    let image = TempImage::new(8 * 512);
    let mut rig = Rig::block(&image, false);
    rig.activate(FEATURES);
    rig.core.reset();
    let status = rig.offer_blk(0, T_FLUSH, 0, &[]);
    rig.core.serve(0);
    assert_eq!(rig.status(status), 0xff);
    assert_eq!(rig.driver.used_idx(rig.memory()), 0);
    assert_eq!(rig.interrupts(), 0);
}

#[test]
fn rng_fills_writable_buffers() {
    let mut rig = Rig::new(Backend::Rng);
    rig.activate(FEATURES);
    put_descriptor(rig.memory(), DESC, 0, DATA, 64, WRITE | NEXT, 1);
    put_descriptor(rig.memory(), DESC, 1, DATA + 0x100, 64, WRITE, 0);
    rig.offer(0);
    rig.core.serve(0);
    assert_eq!(rig.driver.used(rig.memory(), 0), (0, 128));
    let mut bytes = [0u8; 64];
    rig.memory()
        .read_slice(&mut bytes, GuestAddress(DATA + 0x100))
        .unwrap();
    assert!(
        bytes.iter().any(|&b| b != 0),
        "64 random bytes are not all zero"
    );
    assert_eq!(rig.interrupts(), 1);
}

#[test]
fn activation_checks_features_rings_and_state() {
    let rig = Rig::new(Backend::Rng);
    let ram = rig.ram.clone();
    let attempt = |config: QueueConfig| {
        rig.core
            .activate(ram.clone(), COMMON_FEATURES, &[Some(config)])
    };
    let queue_error = |result: Result<(), ActivateError>| match result {
        Err(ActivateError::Queue { error, .. }) => error,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        queue_error(attempt(QueueConfig {
            size: 12,
            ..config()
        })),
        SetupError::Size(12)
    );
    assert_eq!(
        queue_error(attempt(QueueConfig {
            size: 512,
            ..config()
        })),
        SetupError::Size(512)
    );
    assert!(matches!(
        queue_error(attempt(QueueConfig {
            desc: DESC + 8,
            ..config()
        })),
        SetupError::Misaligned { .. }
    ));
    assert!(matches!(
        queue_error(attempt(QueueConfig {
            used: RAM_SIZE - 8,
            ..config()
        })),
        SetupError::OutsideRam { .. }
    ));
    assert!(matches!(
        rig.core.activate(ram.clone(), 1 << 40, &[Some(config())]),
        Err(ActivateError::Features { .. })
    ));
    assert!(matches!(
        rig.core
            .activate(Arc::new(GuestRam::default()), 0, &[Some(config())]),
        Err(ActivateError::Memory(_))
    ));
    attempt(config()).unwrap();
    assert!(matches!(
        attempt(config()),
        Err(ActivateError::AlreadyActive)
    ));
    // Activation rings the doorbell once, for chains made available before it.
    assert_eq!(
        read_counter(rig.core.notifier(0).unwrap().as_raw_fd()).unwrap(),
        Some(1)
    );
}

#[test]
fn config_space_is_the_virtio_blk_config() {
    let image = TempImage::new(100 * 512 + 17);
    let rig = Rig::block(&image, false);
    assert_eq!(rig.core.read_config(0, 8), 100);
    assert_eq!(rig.core.read_config(20, 4), 512);
    assert_eq!(rig.core.read_config(12, 4), 254);
    assert_eq!(rig.core.read_config(58, 4), 0);
    assert_eq!(rig.core.read_config(1 << 40, 4), 0);
    assert_eq!(rig.core.config_size(), 60);
}

#[test]
fn reset_waits_for_the_request_in_flight_and_nothing_follows_it() {
    // Sixteen requests of 254 x 32 KiB reads each (about 8 MiB, milliseconds apiece),
    // all through one indirect table into the same guest buffer.
    const TABLE: u64 = 0x4000;
    let segments = 254u16;
    let image = TempImage::new(usize::from(segments) * 0x8000 + 4096);
    let mut rig = Rig::block(&image, false);
    rig.activate(FEATURES);
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&T_IN.to_le_bytes());
    rig.memory()
        .write_slice(&raw, GuestAddress(HEADERS))
        .unwrap();
    put_descriptor(rig.memory(), TABLE, 0, HEADERS, 16, NEXT, 1);
    for index in 1..=segments {
        put_descriptor(
            rig.memory(),
            TABLE,
            index,
            DATA,
            0x8000,
            WRITE | NEXT,
            index + 1,
        );
    }
    put_descriptor(rig.memory(), TABLE, segments + 1, STATUS, 1, WRITE, 0);
    for head in 0..SIZE {
        put_descriptor(
            rig.memory(),
            DESC,
            head,
            TABLE,
            16 * 256,
            super::test_ring::INDIRECT,
            0,
        );
        rig.offer(head);
    }
    std::thread::scope(|scope| {
        let server = scope.spawn(|| rig.core.serve(0));
        while rig.driver.used_idx(rig.memory()) == 0 {
            std::hint::spin_loop();
        }
        rig.core.reset();
        let used_at_reset = rig.driver.used_idx(rig.memory());
        server.join().unwrap();
        assert_eq!(rig.driver.used_idx(rig.memory()), used_at_reset);
        assert!(used_at_reset < SIZE, "reset stopped the batch");
    });
    assert_eq!(
        rig.interrupts(),
        0,
        "no interrupt once reset() has returned"
    );
    assert_eq!(rig.status(STATUS), S_OK);
}

mod random_rings {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::virtio::test_ring::INDIRECT;

    /// A second descriptor table that random INDIRECT descriptors may point at.
    const SIDE_TABLE: u64 = 0x6000;

    type RawDescriptor = (u64, u32, u16, u16);

    /// Where a descriptor points: the side table, a buffer of its own (so that the
    /// writable ranges of different descriptors rarely cover each other), anywhere near
    /// RAM, anywhere at all.
    type Spec = (u8, u64, u32, u16, u16);

    fn spec() -> impl Strategy<Value = Spec> {
        let length = prop_oneof![0u32..32, Just(16), Just(512), 0u32..0x3000, any::<u32>()];
        (0u8..4, any::<u64>(), length, 0u16..8, 0u16..20)
    }

    fn materialise(specs: &[Spec], buffers: u64) -> Vec<RawDescriptor> {
        specs
            .iter()
            .enumerate()
            .map(|(index, &(kind, random, length, flags, next))| {
                let address = match kind {
                    0 => SIDE_TABLE,
                    1 => buffers + 0x200 * index as u64,
                    2 => random % (RAM_SIZE + 0x2000),
                    _ => random,
                };
                (address, length, flags, next)
            })
            .collect()
    }

    /// Every byte a device may write: the used ring and the buffers any descriptor of
    /// either table marks device-writable.
    fn writable(table: &[RawDescriptor], side: &[RawDescriptor]) -> Vec<(u64, u64)> {
        let mut ranges = vec![(USED, 6 + 8 * u64::from(SIZE))];
        for &(address, length, flags, _) in table.iter().chain(side) {
            if flags & WRITE != 0 && flags & INDIRECT == 0 {
                ranges.push((address, u64::from(length)));
            }
        }
        ranges
    }

    fn snapshot(memory: &Memory) -> Vec<u8> {
        let mut bytes = vec![0u8; RAM_SIZE as usize];
        memory.read_slice(&mut bytes, GuestAddress(0)).unwrap();
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn random_rings_never_panic_nor_write_outside_writable_buffers(
            table in vec(spec(), SIZE as usize),
            side in vec(spec(), 8),
            heads in vec(0u16..20, 0..SIZE as usize),
            avail_idx in prop_oneof![0u16..20, any::<u16>()],
            features in prop_oneof![Just(FEATURES), Just(COMMON_FEATURES), Just(1u64 << 32)],
            rng in any::<bool>(),
        ) {
            let (table, side) = (materialise(&table, DATA), materialise(&side, 0xC000));
            let image = TempImage::new(16 * 512);
            let rig = if rng { Rig::new(Backend::Rng) } else { Rig::block(&image, false) };
            rig.activate(features);
            for (index, &(address, length, flags, next)) in table.iter().enumerate() {
                put_descriptor(rig.memory(), DESC, index as u16, address, length, flags, next);
            }
            for (index, &(address, length, flags, next)) in side.iter().enumerate() {
                put_descriptor(rig.memory(), SIDE_TABLE, index as u16, address, length, flags, next);
            }
            for (slot, &head) in heads.iter().enumerate() {
                put_u16(rig.memory(), AVAIL + 4 + 2 * slot as u64, head);
            }
            put_u16(rig.memory(), AVAIL + 2, avail_idx);
            let before = snapshot(rig.memory());
            rig.core.serve(0);
            rig.core.serve(0);
            let after = snapshot(rig.memory());
            let allowed = writable(&table, &side);
            for (at, (old, new)) in before.iter().zip(&after).enumerate() {
                let at = at as u64;
                if old != new {
                    prop_assert!(
                        allowed.iter().any(|&(start, length)| at >= start && at - start < length),
                        "byte {at:#x} changed outside every writable buffer"
                    );
                }
            }
            prop_assert_eq!(std::fs::metadata(&image.path).unwrap().len(), 16 * 512);
            // Whatever happened, a reset brings the device back.
            rig.core.reset();
            prop_assert!(!rig.core.needs_reset());
        }
    }
}

#[test]
fn close_stops_activation_and_lets_another_process_lock_the_image() {
    let image = TempImage::new(8 * 512);
    let rig = Rig::block(&image, false);
    let locked = Disk::open(image.path(), false, false).map(|_| ());
    assert!(
        matches!(locked, Err(OpenError::Locked { .. })),
        "{locked:?}"
    );
    rig.core.close();
    Disk::open(image.path(), false, false).expect("the image is free once the device is closed");
    let again = rig
        .core
        .activate(rig.ram.clone(), COMMON_FEATURES, &[Some(config())]);
    assert!(matches!(again, Err(ActivateError::Closed)), "{again:?}");
}

#[test]
fn a_paused_device_serves_nothing_and_resume_serves_what_was_rung() {
    let image = TempImage::new(8 * 512);
    let mut rig = Rig::block(&image, false);
    rig.activate(FEATURES);
    // activate() rang the doorbell once: take that ring as the loop would.
    let _ = read_counter(rig.core.notifier(0).unwrap().as_raw_fd());
    rig.core.pause();
    let flush = rig.offer_blk(0, T_FLUSH, 0, &[]);
    rig.core.serve(0);
    assert_eq!(rig.driver.used_idx(rig.memory()), 0);
    assert_eq!(rig.interrupts(), 0);
    rig.core.resume();
    let rung = read_counter(rig.core.notifier(0).unwrap().as_raw_fd()).unwrap();
    assert_eq!(rung, Some(1));
    rig.core.serve(0);
    assert_eq!(rig.status(flush), S_OK);
    assert_eq!(rig.driver.used_idx(rig.memory()), 1);
}

/// A second device over the same RAM and image, as a restored machine makes it.
fn restored(rig: &Rig, image: &TempImage, features: u64) -> DeviceCore {
    let disk = Disk::open(image.path(), false, false).unwrap();
    let core = DeviceCore::new(Backend::Block(Block::new(disk, None).unwrap())).unwrap();
    core.pause();
    core.activate(rig.ram.clone(), features, &[Some(config())])
        .unwrap();
    core
}

fn interrupts_of(core: &DeviceCore) -> u64 {
    read_counter(core.interrupt(0).unwrap().as_raw_fd())
        .unwrap()
        .unwrap_or(0)
}

#[test]
fn queue_states_continue_a_ring_on_a_new_device() {
    let image = TempImage::new(8 * 512);
    let features = COMMON_FEATURES | 1 << VIRTIO_F_RING_EVENT_IDX;
    let mut rig = Rig::block(&image, false);
    assert_eq!(rig.core.queue_states(), vec![QueueState::default()]);
    rig.activate(features);
    rig.driver.set_used_event(rig.memory(), 3);
    for head in [0, 2, 4] {
        rig.offer_blk(head, T_FLUSH, 0, &[]);
    }
    rig.core.serve(0);
    let states = rig.core.queue_states();
    assert_eq!(
        states,
        vec![QueueState {
            ready: true,
            size: u64::from(SIZE),
            desc_table: DESC,
            avail_ring: AVAIL,
            used_ring: USED,
            next_avail: 3,
            next_used: 3,
            event_idx: true,
            signalled_used: Some(3),
        }]
    );
    rig.core.close();

    let core = restored(&rig, &image, features);
    core.restore_queue_states(&states).unwrap();
    assert_eq!(core.queue_states(), states);
    core.resume();
    let fourth = rig.offer_blk(6, T_FLUSH, 0, &[]);
    core.serve(0);
    // Only the new chain was served, into the next used entry; used_event 3 is passed.
    assert_eq!(rig.status(fourth), S_OK);
    assert_eq!(rig.driver.used_idx(rig.memory()), 4);
    assert_eq!(rig.driver.used(rig.memory(), 3), (6, 1));
    assert_eq!(rig.driver.used(rig.memory(), 0), (0, 1));
    assert_eq!(interrupts_of(&core), 1);
}

#[test]
fn signalled_used_carries_the_interrupt_decision_across_a_restore() {
    let image = TempImage::new(8 * 512);
    let features = COMMON_FEATURES | 1 << VIRTIO_F_RING_EVENT_IDX;
    let mut rig = Rig::block(&image, false);
    rig.activate(features);
    for head in [0, 2, 4] {
        rig.offer_blk(head, T_FLUSH, 0, &[]);
    }
    rig.core.serve(0);
    let [mut state] = rig.core.queue_states().try_into().unwrap();
    rig.core.close();
    // The driver wants an interrupt once entry 1 is used: entries 1 and 2 were used
    // after a decision at 1 (a pause cut the drain short), so the next one interrupts;
    // had the decision been at 3, it would not.
    rig.driver.set_used_event(rig.memory(), 1);
    let mut interrupts = Vec::new();
    for (signalled, head) in [(Some(1), 6), (Some(3), 8), (None, 10)] {
        state.signalled_used = signalled;
        let core = restored(&rig, &image, features);
        core.restore_queue_states(&[state]).unwrap();
        core.resume();
        rig.offer_blk(head, T_FLUSH, 0, &[]);
        core.serve(0);
        interrupts.push(interrupts_of(&core));
        [state] = core.queue_states().try_into().unwrap();
        assert_eq!(state.signalled_used, Some(state.next_used));
        core.close();
    }
    // None is unknown: interrupt rather than risk a driver waiting forever.
    assert_eq!(interrupts, [1, 0, 1]);
}

#[test]
fn a_bad_restore_changes_nothing() {
    let image = TempImage::new(8 * 512);
    let mut rig = Rig::block(&image, false);
    rig.activate(FEATURES);
    rig.offer_blk(0, T_FLUSH, 0, &[]);
    rig.core.serve(0);
    let [served] = rig.core.queue_states().try_into().unwrap();
    rig.core.close();

    let core = restored(&rig, &image, FEATURES);
    let fresh = core.queue_states();
    let attempt = |change: &dyn Fn(&mut QueueState)| {
        let mut state = served;
        change(&mut state);
        let result = core.restore_queue_states(&[state]);
        assert_eq!(core.queue_states(), fresh);
        result
    };
    assert_eq!(
        attempt(&|s| s.size = 8),
        Err(StateError::Mismatch {
            queue: 0,
            key: "size"
        })
    );
    assert_eq!(
        attempt(&|s| s.avail_ring = 0x2100),
        Err(StateError::Mismatch {
            queue: 0,
            key: "avail_ring"
        })
    );
    assert_eq!(
        attempt(&|s| s.ready = false),
        Err(StateError::Mismatch {
            queue: 0,
            key: "ready"
        })
    );
    assert_eq!(
        core.restore_queue_states(&[served, served]),
        Err(StateError::Count {
            given: 2,
            expected: 1
        })
    );
    // Served since activate(): a restore would rewind what the driver already saw.
    core.resume();
    core.serve(0);
    assert_eq!(
        core.restore_queue_states(&[served]),
        Err(StateError::AlreadyServed { queue: 0 })
    );

    // A queue never activated: only a not-ready state fits it.
    let idle = DeviceCore::new(Backend::Rng).unwrap();
    assert_eq!(
        idle.restore_queue_states(&[served]),
        Err(StateError::Mismatch {
            queue: 0,
            key: "ready"
        })
    );
    assert_eq!(idle.restore_queue_states(&[QueueState::default()]), Ok(()));
}
