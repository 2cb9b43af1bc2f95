//! What a device has done, counted on the loop thread and read from Python.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! device_counters {
    ($($name:ident),* $(,)?) => {
        #[derive(Debug, Default)]
        pub struct DeviceCounters {
            $(pub $name: AtomicU64,)*
        }

        impl DeviceCounters {
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

device_counters!(
    // Doorbells the loop handled (one may cover several rings).
    notifications,
    // Chains completed (written to the used ring).
    requests,
    // Bytes moved between the image (or getrandom) and guest memory.
    read_bytes,
    written_bytes,
    flushes,
    discards,
    write_zeroes,
    // Requests completed with VIRTIO_BLK_S_IOERR / VIRTIO_BLK_S_UNSUPP.
    io_errors,
    unsupported,
    // Requests the host failed (a read, write, sync or fallocate error).
    host_errors,
    // Requests whose layout does not fit their type (failed with IOERR).
    bad_requests,
    // Chains that broke the ring rules (the device then needs a reset).
    malformed_chains,
    // Used-ring interrupts sent, and those EVENT_IDX or NO_INTERRUPT suppressed.
    interrupts,
    suppressed_interrupts,
    config_interrupts,
    // virtio-net: frames sent to the TAP, and their bytes (without the header);
    // packets dropped for a malformed chain or header; writes the TAP refused.
    tx_packets,
    tx_bytes,
    tx_dropped,
    tx_errors,
    // virtio-net: frames received into the guest's buffers, and their bytes; frames
    // dropped (too big for every buffer, or shorter than a header); reads that failed;
    // times the TAP was left unread for want of buffers.
    rx_packets,
    rx_bytes,
    rx_dropped,
    rx_errors,
    rx_deferred,
    // virtio-vsock (beside tx_packets/tx_dropped/tx_bytes for the driver's packets and
    // RW bytes, rx_bytes for the host's): streams opened either way, RSTs sent.
    vsock_connections,
    vsock_resets,
);

pub fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}
