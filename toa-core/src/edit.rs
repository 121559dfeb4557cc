//! In-place edits of a TCP header's options: [`insert`] and [`strip`].
//!
//! Both rebuild the options area (at most 40 bytes) on the stack, move the
//! payload, and fix the data offset, the IP length, the IPv4 header checksum
//! and the TCP checksum incrementally. The options area starts at TCP byte 20
//! (an even offset) and its length changes by a multiple of 4, so the payload
//! keeps its 16-bit alignment and only the header words enter the update.

use crate::checksum::{self, Accumulator};
use crate::option::{Options, kind};
use crate::packet::field::{ipv4, ipv6, tcp};
use crate::packet::{IpVersion, TcpPacket, read_u16};
use crate::{Error, Format, Formats, Toa};

/// The most option bytes a TCP header holds (60 - 20).
const MAX_OPTIONS: usize = tcp::MAX_HEADER_LEN - tcp::OPTIONS;

/// Where the TCP header of a checked packet is.
#[derive(Clone, Copy)]
struct Layout {
    version: IpVersion,
    tcp_offset: usize,
    header_len: usize,
    len: usize,
}

impl Layout {
    fn of(buf: &[u8], len: usize) -> Result<Layout, Error> {
        let packet = buf.get(..len).ok_or(Error::Capacity { need: len, capacity: buf.len() })?;
        let packet = TcpPacket::new_checked(packet)?;
        Ok(Layout {
            version: packet.version(),
            tcp_offset: packet.tcp_offset(),
            header_len: packet.tcp().header_len(),
            len: packet.len(),
        })
    }

    fn options_range(&self) -> core::ops::Range<usize> {
        self.tcp_offset + tcp::OPTIONS..self.tcp_offset + self.header_len
    }
}

/// A rebuilt options area.
struct Area {
    bytes: [u8; MAX_OPTIONS],
    len: usize,
}

impl Area {
    fn new() -> Self {
        Self { bytes: [0; MAX_OPTIONS], len: 0 }
    }

    /// Appends `bytes`; the caller has checked they fit.
    fn push(&mut self, bytes: &[u8]) {
        self.bytes[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// Pads with `byte` to a multiple of 4, as the data offset counts words.
    fn pad(&mut self, byte: u8) {
        while self.len % 4 != 0 {
            self.push(&[byte]);
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    fn sum(&self) -> Accumulator {
        let mut acc = Accumulator::new();
        acc.add_bytes(self.as_slice());
        acc
    }
}

/// Replaces the options area with `area` (a multiple of 4 bytes), moving the
/// payload and fixing lengths and checksums. `removed` and `added` are the
/// checksum sums of what left and entered the options area. Returns the new
/// packet length. Leaves `buf` untouched on error.
fn rewrite(
    buf: &mut [u8],
    layout: Layout,
    area: &[u8],
    mut removed: Accumulator,
    mut added: Accumulator,
) -> Result<usize, Error> {
    debug_assert!(area.len() % 4 == 0 && area.len() <= MAX_OPTIONS);
    let new_header_len = tcp::OPTIONS + area.len();
    let new_len = layout.len - layout.header_len + new_header_len;
    if new_len > buf.len() {
        return Err(Error::Capacity { need: new_len, capacity: buf.len() });
    }
    let ip_len_field = match layout.version {
        IpVersion::V4 => new_len,
        IpVersion::V6 => new_len - ipv6::LEN,
    };
    let Ok(ip_len_field) = u16::try_from(ip_len_field) else {
        return Err(Error::TooLong { len: new_len });
    };

    let tcp_start = layout.tcp_offset;
    let old_payload = tcp_start + layout.header_len..layout.len;
    buf.copy_within(old_payload, tcp_start + new_header_len);
    buf[tcp_start + tcp::OPTIONS..tcp_start + new_header_len].copy_from_slice(area);

    // Data offset: the word at TCP bytes 12..14 changes.
    let word_at = |buf: &[u8]| read_u16(buf, tcp_start + 12..tcp_start + 14);
    removed.add_u16(word_at(buf));
    // new_header_len is at most 60, so the word count fits the nibble.
    let doff = (new_header_len / 4) as u8;
    buf[tcp_start + tcp::DATA_OFFSET] = (doff << 4) | (buf[tcp_start + tcp::DATA_OFFSET] & 0x0f);
    added.add_u16(word_at(buf));

    // Pseudo header: the TCP length changes (it stays below 65536 in both versions).
    removed.add_u16((layout.len - tcp_start) as u16);
    added.add_u16((new_len - tcp_start) as u16);

    let csum = tcp_start + tcp::CHECKSUM.start..tcp_start + tcp::CHECKSUM.end;
    let updated = checksum::update(read_u16(buf, csum.clone()), removed, added);
    buf[csum].copy_from_slice(&updated.to_be_bytes());

    match layout.version {
        IpVersion::V4 => {
            let old = read_u16(buf, ipv4::TOTAL_LEN);
            buf[ipv4::TOTAL_LEN].copy_from_slice(&ip_len_field.to_be_bytes());
            let csum = checksum::update_word(read_u16(buf, ipv4::CHECKSUM), old, ip_len_field);
            buf[ipv4::CHECKSUM].copy_from_slice(&csum.to_be_bytes());
        }
        IpVersion::V6 => buf[ipv6::PAYLOAD_LEN].copy_from_slice(&ip_len_field.to_be_bytes()),
    }
    Ok(new_len)
}

/// Adds `toa` to the TCP packet in `buf[..len]`, right after the 20-byte base
/// TCP header, with the option kind `formats` gives its format. Returns the
/// new packet length; `buf` needs that much capacity.
///
/// The option is padded with NOPs to a multiple of 4 bytes. If the header
/// would exceed 60 bytes, NOP padding (and anything after an EOL) is
/// reclaimed first; if that is not enough the result is [`Error::NoRoom`].
/// On any error `buf` is left as it was. An existing TOA is not replaced:
/// [`strip`] first when the packet comes from an untrusted peer.
///
/// ```
/// use toa_core::{insert, Format, Formats, TcpPacket, Toa};
///
/// let mut buf = [0u8; 128];
/// let syn = [
///     0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 100, 125, 0, 1, 10, 0, 0, 2,
///     0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
/// ];
/// buf[..40].copy_from_slice(&syn);
/// let toa = Toa::new(Format::Toa, "203.0.113.7:40000".parse().unwrap()).unwrap();
/// let len = insert(&mut buf, 40, &toa, &Formats::default()).unwrap();
/// assert_eq!(len, 48);
/// let packet = TcpPacket::new_checked(&buf[..len]).unwrap();
/// assert_eq!(packet.toa(&Formats::default()).unwrap().unwrap().toa, toa);
/// ```
pub fn insert(buf: &mut [u8], len: usize, toa: &Toa, formats: &Formats) -> Result<usize, Error> {
    let layout = Layout::of(buf, len)?;
    let mut option = [0u8; 20];
    let option_len = toa.emit(formats.kind(toa.format()), &mut option)?;
    let option = &option[..option_len];
    let old = &buf[layout.options_range()];
    // Refuse to build on a malformed header, as strip and clamp_mss do.
    for raw in Options::new(old, layout.options_range().start) {
        raw?;
    }

    let mut area = Area::new();
    let (removed, added) = if option_len.next_multiple_of(4) + old.len() <= MAX_OPTIONS {
        area.push(option);
        area.pad(kind::NOP);
        // The old options shift by a multiple of 4: only the new block enters the sum.
        let added = area.sum();
        area.push(old);
        (Accumulator::new(), added)
    } else {
        // Reclaim NOPs: they only align what follows, and removing them changes no meaning.
        let mut compact = Area::new();
        // Offsets relative to `old`; the walk above has already validated it.
        for raw in Options::new(old, 0) {
            let raw = raw?;
            match raw.kind {
                kind::NOP => {}
                kind::EOL => break,
                _ => compact.push(&old[raw.offset..raw.offset + raw.wire_len()]),
            }
        }
        if option_len + compact.len > MAX_OPTIONS {
            return Err(Error::NoRoom { need: option_len, available: MAX_OPTIONS - compact.len });
        }
        area.push(option);
        area.push(compact.as_slice());
        area.pad(kind::EOL);
        let mut removed = Accumulator::new();
        removed.add_bytes(old);
        (removed, area.sum())
    };
    rewrite(buf, layout, area.as_slice(), removed, added)
}

/// What [`strip`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stripped {
    /// The packet's new length.
    pub len: usize,
    /// How many options were removed (0: the packet is unchanged).
    pub removed: usize,
}

/// Removes every option of the enabled formats from the TCP packet in
/// `buf[..len]`: TOAs, options of a TOA kind with a wrong length, and, when
/// `tencent` is enabled, its companions (kinds 201 and 202). A load balancer
/// must do this to what clients send, or a client can forge its address.
///
/// A NOP right after a removed option is removed too when that keeps the
/// header a multiple of 4 bytes, so `strip` undoes [`insert`] byte for byte
/// (unless `insert` had to reclaim NOPs; and a checksum field holding 0xffff,
/// one's-complement -0, which no real sender computes, may come back as its
/// equal 0x0000); otherwise the area is padded with EOL. A malformed options area is an
/// error and `buf` is left as it was.
///
/// ```
/// use toa_core::{strip, Formats, Stripped};
///
/// let mut packet = [
///     0x45, 0, 0, 48, 0, 0, 0x40, 0, 64, 6, 0xff, 0xff, 100, 125, 0, 1, 10, 0, 0, 2,
///     0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x70, 0x02, 0xff, 0xff, 0, 0, 0, 0,
///     254, 8, 0x9c, 0x40, 203, 0, 113, 7, // a forged toa
/// ];
/// let done = strip(&mut packet, 48, &Formats::default()).unwrap();
/// assert_eq!(done, Stripped { len: 40, removed: 1 });
/// assert_eq!(packet[32] >> 4, 5); // data offset back to 5 words
/// ```
pub fn strip(buf: &mut [u8], len: usize, formats: &Formats) -> Result<Stripped, Error> {
    let layout = Layout::of(buf, len)?;
    let old = &buf[layout.options_range()];
    let tencent = formats.contains(Format::Tencent);

    let mut area = Area::new();
    let mut removed_options = 0;
    let mut removed_bytes = 0;
    let mut copied_to = 0;
    let base = layout.options_range().start;
    for raw in Options::new(old, base) {
        let raw = raw?;
        let at = raw.offset - base;
        let wire_len = raw.wire_len();
        let toa_kind = match raw.kind {
            kind::EOL | kind::NOP => false,
            kind::TENCENT_VPC_ID | kind::TENCENT_VIP if tencent => true,
            // The walker guarantees the length byte fits a u8.
            _ => formats.classify(raw.kind, wire_len as u8) != crate::format::Class::Other,
        };
        if !toa_kind {
            continue;
        }
        area.push(&old[copied_to..at]);
        copied_to = at + wire_len;
        removed_options += 1;
        removed_bytes += wire_len;
        // Take the NOP padding an inserter put after an odd-sized option.
        while removed_bytes % 4 != 0 && old.get(copied_to) == Some(&kind::NOP) {
            copied_to += 1;
            removed_bytes += 1;
        }
    }
    if removed_options == 0 {
        return Ok(Stripped { len: layout.len, removed: 0 });
    }
    area.push(&old[copied_to..]);
    area.pad(kind::EOL);
    let mut removed = Accumulator::new();
    removed.add_bytes(old);
    let added = area.sum();
    let len = rewrite(buf, layout, area.as_slice(), removed, added)?;
    Ok(Stripped { len, removed: removed_options })
}
