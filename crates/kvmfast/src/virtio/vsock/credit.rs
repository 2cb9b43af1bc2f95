//! Credit-based flow control of one stream (virtio 1.2 section 5.10.6.3): each side
//! tells the other how much buffer it has (buf_alloc) and how many bytes it has passed
//! on (fwd_cnt); a sender may have at most buf_alloc - (sent - peer's fwd_cnt) bytes
//! in flight. All counters are free-running u32 (they wrap), as in the spec.

use super::packet::Header;

/// What the device advertises per connection (Firecracker's 256 KiB): the most bytes
/// of one connection the VMM ever holds, waiting for a host socket that is not reading.
pub const BUF_ALLOC: u32 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    buf_alloc: u32,
    /// RW payload bytes the driver sent us.
    rx_cnt: u32,
    /// Of those, the bytes written to the host socket.
    fwd_cnt: u32,
    /// fwd_cnt as the driver last heard it (every packet we send carries it).
    fwd_cnt_told: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// RW payload bytes we sent the driver.
    tx_cnt: u32,
}

impl Credit {
    pub fn new(buf_alloc: u32) -> Self {
        Self {
            buf_alloc,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
        }
    }

    /// Every packet of the driver's carries its buffer and forward count.
    pub fn peer_update(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
    }

    /// How many more bytes the driver can take. A driver claiming to have forwarded
    /// more than it was sent gets nothing (its in-flight count wraps past its buffer).
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn sent(&mut self, bytes: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(bytes);
    }

    /// Bytes received and not yet forwarded: what the VMM holds for this stream.
    pub fn held(&self) -> u32 {
        self.rx_cnt.wrapping_sub(self.fwd_cnt)
    }

    /// The driver sent `bytes`: false (nothing counted) if that is beyond the credit it
    /// was given, a driver breaking the rules that the stream is reset for.
    pub fn receive(&mut self, bytes: u32) -> bool {
        if u64::from(self.held()) + u64::from(bytes) > u64::from(self.buf_alloc) {
            return false;
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(bytes);
        true
    }

    pub fn forwarded(&mut self, bytes: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(bytes);
    }

    /// Puts our buffer and forward count in a packet about to go to the driver.
    pub fn stamp(&mut self, header: &mut Header) {
        header.buf_alloc = self.buf_alloc;
        header.fwd_cnt = self.fwd_cnt;
        self.fwd_cnt_told = self.fwd_cnt;
    }

    /// Whether a CREDIT_UPDATE is worth a packet: the driver believes less than half
    /// of our buffer free, and more is free than it was told. A driver out of credit
    /// always gets one once anything is forwarded (it never asks: Linux waits).
    pub fn update_due(&self) -> bool {
        let believed_held = self.rx_cnt.wrapping_sub(self.fwd_cnt_told);
        let believed_free = self.buf_alloc.saturating_sub(believed_held);
        self.fwd_cnt != self.fwd_cnt_told && believed_free < self.buf_alloc / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_peer(buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            buf_alloc,
            fwd_cnt,
            ..Header::default()
        }
    }

    #[test]
    fn the_device_never_sends_beyond_the_peer_credit() {
        let mut credit = Credit::new(BUF_ALLOC);
        assert_eq!(credit.peer_credit(), 0, "no credit before the peer speaks");
        credit.peer_update(&from_peer(1000, 0));
        assert_eq!(credit.peer_credit(), 1000);
        credit.sent(600);
        assert_eq!(credit.peer_credit(), 400);
        credit.sent(400);
        assert_eq!(credit.peer_credit(), 0);
        credit.peer_update(&from_peer(1000, 250));
        assert_eq!(credit.peer_credit(), 250);
        // A peer shrinking its buffer below what is in flight: no credit, no underflow.
        credit.peer_update(&from_peer(100, 250));
        assert_eq!(credit.peer_credit(), 0);
        // A peer claiming more forwarded than sent: nothing (the count wraps).
        credit.peer_update(&from_peer(1000, 5000));
        assert_eq!(credit.peer_credit(), 0);
    }

    #[test]
    fn counters_wrap_around_u32() {
        let mut credit = Credit::new(BUF_ALLOC);
        credit.tx_cnt = u32::MAX - 10;
        credit.peer_update(&from_peer(100, u32::MAX - 10));
        credit.sent(50);
        assert_eq!(credit.peer_credit(), 50);
        credit.rx_cnt = u32::MAX - 5;
        credit.fwd_cnt = u32::MAX - 5;
        assert!(credit.receive(20));
        assert_eq!(credit.held(), 20);
        credit.forwarded(20);
        assert_eq!(credit.held(), 0);
    }

    #[test]
    fn a_driver_beyond_its_credit_is_refused_and_nothing_counted() {
        let mut credit = Credit::new(1000);
        assert!(credit.receive(1000));
        assert!(!credit.receive(1));
        assert_eq!(credit.held(), 1000);
        credit.forwarded(10);
        assert!(credit.receive(10));
        assert!(!credit.receive(1));
    }

    #[test]
    fn a_credit_update_is_due_once_the_driver_runs_low_and_something_was_forwarded() {
        let mut credit = Credit::new(1000);
        assert!(credit.receive(400));
        credit.forwarded(400);
        // The driver believes 600 free: more than half, no update.
        assert!(!credit.update_due());
        assert!(credit.receive(200));
        credit.forwarded(200);
        // It believes 400 free (600 held) and 1000 are: due.
        assert!(credit.update_due());
        let mut header = Header::default();
        credit.stamp(&mut header);
        assert_eq!((header.buf_alloc, header.fwd_cnt), (1000, 600));
        assert!(!credit.update_due());
        // Out of credit with nothing forwarded: an update would tell it nothing new.
        assert!(credit.receive(1000));
        assert!(!credit.update_due());
        credit.forwarded(1);
        assert!(credit.update_due());
    }
}
