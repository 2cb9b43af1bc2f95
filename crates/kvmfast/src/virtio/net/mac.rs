//! The guest's MAC address: parsed from the user's spelling, or made up.

/// "52:54:00:12:34:56" as bytes: six hex pairs, a unicast address.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.split(':').collect();
    let mut mac = [0u8; 6];
    let valid = parts.len() == 6
        && parts.iter().zip(mac.iter_mut()).all(|(part, byte)| {
            part.len() == 2
                && u8::from_str_radix(part, 16)
                    .map(|value| *byte = value)
                    .is_ok()
        });
    if !valid {
        return Err(format!(
            "MAC address {text:?} is not six hex pairs (52:54:00:12:34:56)"
        ));
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "MAC address {text} is a multicast address (its first byte is odd)"
        ));
    }
    Ok(mac)
}

/// A random address under QEMU's 52:54:00 prefix (locally administered, unicast).
pub fn random_mac() -> [u8; 6] {
    let mut tail = [0u8; 3];
    // SAFETY: getrandom writes at most 3 bytes into the array we own.
    let n = unsafe { libc::getrandom(tail.as_mut_ptr().cast(), tail.len(), 0) };
    if n != 3 {
        // Never expected (3 bytes after boot); the process id keeps two VMs apart.
        tail = std::process::id().to_le_bytes()[..3]
            .try_into()
            .unwrap_or_default();
    }
    [0x52, 0x54, 0x00, tail[0], tail[1], tail[2]]
}
