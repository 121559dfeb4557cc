//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! Every edit in this crate updates checksums incrementally: it subtracts the
//! words it removed and adds the words it wrote. That is O(option size), not
//! O(packet size), and it has a property a full recomputation lacks: a packet
//! that arrived with a *wrong* checksum still has a wrong one afterwards, so a
//! load balancer never launders a corrupted segment into a valid one.
//!
//! ```
//! use toa_core::checksum::{self, Accumulator};
//!
//! // The example from RFC 1071, section 3.
//! let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
//! let mut acc = Accumulator::new();
//! acc.add_bytes(&data);
//! assert_eq!(acc.fold(), 0xddf2);
//! assert_eq!(acc.finish(), !0xddf2);
//!
//! // Change one word and update the checksum incrementally (RFC 1624).
//! let updated = checksum::update_word(acc.finish(), 0xf4f5, 0x1234);
//! let mut again = Accumulator::new();
//! again.add_bytes(&[0x00, 0x01, 0xf2, 0x03, 0x12, 0x34, 0xf6, 0xf7]);
//! assert_eq!(updated, again.finish());
//! ```

use core::net::{Ipv4Addr, Ipv6Addr};

/// A running one's-complement sum of 16-bit big-endian words.
///
/// Bytes are summed as if they started at an even offset of the checksummed
/// region; use [`Accumulator::add_bytes_at`] for a run that starts at an odd
/// offset. Only the last run added with [`Accumulator::add_bytes`] may have an
/// odd length (it is padded with a zero byte, as RFC 793 specifies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Accumulator(u64);

impl Accumulator {
    /// An empty sum.
    pub const fn new() -> Self {
        Self(0)
    }

    /// Adds one 16-bit word.
    pub fn add_u16(&mut self, word: u16) {
        self.0 += u64::from(word);
    }

    /// Adds a 32-bit value as two 16-bit words.
    pub fn add_u32(&mut self, value: u32) {
        // 2^16 = 1 (mod 2^16 - 1), so a 32-bit word folds to the sum of its halves.
        self.0 += u64::from(value);
    }

    /// Adds `data`, starting at an even offset of the checksummed region.
    pub fn add_bytes(&mut self, data: &[u8]) {
        let mut chunks = data.chunks_exact(4);
        let mut sum = self.0;
        for chunk in &mut chunks {
            sum += u64::from(u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]));
        }
        let rest = chunks.remainder();
        let mut tail = [0u8; 4];
        tail[..rest.len()].copy_from_slice(rest);
        sum += u64::from(u32::from_be_bytes(tail));
        self.0 = sum;
    }

    /// Adds `data` found at byte `offset` of the checksummed region.
    ///
    /// A run at an odd offset contributes its byte-swapped sum (RFC 1071,
    /// section 2, "byte order independence").
    pub fn add_bytes_at(&mut self, offset: usize, data: &[u8]) {
        let mut run = Accumulator::new();
        run.add_bytes(data);
        let folded = run.fold();
        self.add_u16(if offset % 2 == 0 { folded } else { folded.swap_bytes() });
    }

    /// Adds another sum.
    pub fn add(&mut self, other: Accumulator) {
        self.add_u16(other.fold());
    }

    /// Adds the IPv4 pseudo header (RFC 793) for an upper-layer segment of `len` bytes.
    pub fn add_ipv4_pseudo_header(&mut self, src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: u16) {
        self.add_u32(src.to_bits());
        self.add_u32(dst.to_bits());
        self.add_u16(u16::from(protocol));
        self.add_u16(len);
    }

    /// Adds the IPv6 pseudo header (RFC 8200, section 8.1) for an upper-layer
    /// packet of `len` bytes.
    pub fn add_ipv6_pseudo_header(&mut self, src: Ipv6Addr, dst: Ipv6Addr, protocol: u8, len: u32) {
        self.add_bytes(&src.octets());
        self.add_bytes(&dst.octets());
        self.add_u32(len);
        self.add_u16(u16::from(protocol));
    }

    /// The folded one's-complement sum (not complemented).
    pub fn fold(self) -> u16 {
        let mut sum = self.0;
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        // The loop leaves at most 16 bits.
        sum as u16
    }

    /// The checksum: the complement of the folded sum.
    pub fn finish(self) -> u16 {
        !self.fold()
    }
}

/// The checksum of `data` (RFC 1071).
///
/// ```
/// // A checksummed region that includes its own correct checksum sums to zero.
/// let mut data = [0x45, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x00];
/// let sum = toa_core::checksum::compute(&data);
/// data[6..8].copy_from_slice(&sum.to_be_bytes());
/// assert_eq!(toa_core::checksum::compute(&data), 0);
/// ```
pub fn compute(data: &[u8]) -> u16 {
    let mut acc = Accumulator::new();
    acc.add_bytes(data);
    acc.finish()
}

/// Updates `checksum` after the data it covers lost the words summed in
/// `removed` and gained those summed in `added` (RFC 1624, equation 3,
/// generalised to many words: `HC' = ~(~HC + ~m + m')`).
pub fn update(checksum: u16, removed: Accumulator, added: Accumulator) -> u16 {
    let mut acc = Accumulator::new();
    acc.add_u16(!checksum);
    acc.add_u16(!removed.fold());
    acc.add_u16(added.fold());
    acc.finish()
}

/// Updates `checksum` after one aligned 16-bit word changed from `old` to `new`.
pub fn update_word(checksum: u16, old: u16, new: u16) -> u16 {
    let mut removed = Accumulator::new();
    removed.add_u16(old);
    let mut added = Accumulator::new();
    added.add_u16(new);
    update(checksum, removed, added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1624_example() {
        // RFC 1624, section 4: HC = 0xdd2f, m = 0x5555 -> m' = 0x3285, HC' = 0x0000.
        assert_eq!(update_word(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        let mut a = Accumulator::new();
        a.add_bytes(&[0x12, 0x34, 0x56]);
        let mut b = Accumulator::new();
        b.add_u16(0x1234);
        b.add_u16(0x5600);
        assert_eq!(a.fold(), b.fold());
    }

    #[test]
    fn odd_offset_is_byte_swapped() {
        let data = [0xab, 0x12, 0x34, 0x56, 0x78];
        let mut whole = Accumulator::new();
        whole.add_bytes(&data);
        let mut split = Accumulator::new();
        split.add_bytes_at(0, &data[..1]);
        split.add_bytes_at(1, &data[1..]);
        assert_eq!(whole.fold(), split.fold());
    }

    #[test]
    fn long_runs_do_not_overflow() {
        let data = [0xffu8; 65_536];
        let mut acc = Accumulator::new();
        for _ in 0..64 {
            acc.add_bytes(&data);
        }
        assert_eq!(acc.fold(), 0xffff);
    }
}
