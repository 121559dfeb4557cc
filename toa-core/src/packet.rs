//! Zero-copy views of IPv4/IPv6 TCP packets.

use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::checksum::Accumulator;
use crate::error::Layer;
use crate::option::{Options, TencentMeta, ToaOption, Toas};
use crate::{Error, Formats};

/// Field offsets, one module per header.
pub(crate) mod field {
    pub(crate) mod ipv4 {
        use core::ops::Range;
        pub(crate) const VER_IHL: usize = 0;
        pub(crate) const TOTAL_LEN: Range<usize> = 2..4;
        pub(crate) const FLAGS_FRAG: Range<usize> = 6..8;
        pub(crate) const PROTOCOL: usize = 9;
        pub(crate) const CHECKSUM: Range<usize> = 10..12;
        pub(crate) const SRC: Range<usize> = 12..16;
        pub(crate) const DST: Range<usize> = 16..20;
        pub(crate) const MIN_LEN: usize = 20;
        /// More Fragments flag and fragment offset: either set means a fragment.
        pub(crate) const MF_OFFSET_MASK: u16 = 0x3fff;
    }
    pub(crate) mod ipv6 {
        use core::ops::Range;
        pub(crate) const PAYLOAD_LEN: Range<usize> = 4..6;
        pub(crate) const NEXT_HEADER: usize = 6;
        pub(crate) const SRC: Range<usize> = 8..24;
        pub(crate) const DST: Range<usize> = 24..40;
        pub(crate) const LEN: usize = 40;
        pub(crate) const HOP_BY_HOP: u8 = 0;
        pub(crate) const ROUTING: u8 = 43;
        pub(crate) const FRAGMENT: u8 = 44;
        pub(crate) const DEST_OPTIONS: u8 = 60;
    }
    pub(crate) mod tcp {
        use core::ops::Range;
        pub(crate) const SRC_PORT: Range<usize> = 0..2;
        pub(crate) const DST_PORT: Range<usize> = 2..4;
        pub(crate) const SEQ: Range<usize> = 4..8;
        pub(crate) const ACK: Range<usize> = 8..12;
        /// Data offset (high nibble) and reserved bits; the 16-bit word with FLAGS.
        pub(crate) const DATA_OFFSET: usize = 12;
        pub(crate) const FLAGS: usize = 13;
        pub(crate) const WINDOW: Range<usize> = 14..16;
        pub(crate) const CHECKSUM: Range<usize> = 16..18;
        pub(crate) const OPTIONS: usize = 20;
        pub(crate) const MAX_HEADER_LEN: usize = 60;
        pub(crate) const PROTOCOL: u8 = 6;
    }
    pub(crate) mod udp {
        use core::ops::Range;
        pub(crate) const SRC_PORT: Range<usize> = 0..2;
        pub(crate) const DST_PORT: Range<usize> = 2..4;
        pub(crate) const LENGTH: Range<usize> = 4..6;
        pub(crate) const CHECKSUM: Range<usize> = 6..8;
        pub(crate) const HEADER_LEN: usize = 8;
        pub(crate) const PROTOCOL: u8 = 17;
    }
}

use field::{ipv4, ipv6, tcp};

pub(crate) fn read_u16(buf: &[u8], range: core::ops::Range<usize>) -> u16 {
    u16::from_be_bytes([buf[range.start], buf[range.start + 1]])
}

fn read_u32(buf: &[u8], range: core::ops::Range<usize>) -> u32 {
    let s = range.start;
    u32::from_be_bytes([buf[s], buf[s + 1], buf[s + 2], buf[s + 3]])
}

/// The TCP flags byte (with ECE and CWR).
///
/// Displays as the set flags' letters in the order F, S, R, P, A, U, E, C:
///
/// ```
/// use toa_core::TcpFlags;
/// assert_eq!(TcpFlags::SYN.union(TcpFlags::ACK).to_string(), "SA");
/// assert_eq!(TcpFlags::from_bits(0x18).to_string(), "PA");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(u8);

impl TcpFlags {
    /// FIN.
    pub const FIN: TcpFlags = TcpFlags(0x01);
    /// SYN.
    pub const SYN: TcpFlags = TcpFlags(0x02);
    /// RST.
    pub const RST: TcpFlags = TcpFlags(0x04);
    /// PSH.
    pub const PSH: TcpFlags = TcpFlags(0x08);
    /// ACK.
    pub const ACK: TcpFlags = TcpFlags(0x10);
    /// URG.
    pub const URG: TcpFlags = TcpFlags(0x20);
    /// ECE.
    pub const ECE: TcpFlags = TcpFlags(0x40);
    /// CWR.
    pub const CWR: TcpFlags = TcpFlags(0x80);

    /// The flags of a flags byte.
    pub const fn from_bits(bits: u8) -> Self {
        Self(bits)
    }

    /// The flags byte.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets of flags.
    #[must_use]
    pub const fn union(self, other: TcpFlags) -> Self {
        Self(self.0 | other.0)
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (bit, letter) in "FSRPAUEC".chars().enumerate() {
            if self.0 & (1 << bit) != 0 {
                fmt::Write::write_char(f, letter)?;
            }
        }
        Ok(())
    }
}

/// A view of a TCP header (and the segment after it).
///
/// ```
/// use toa_core::TcpHeader;
///
/// let segment = [
///     0x9c, 0x40, 0x00, 0x50, // ports 40000 -> 80
///     0, 0, 0, 1, 0, 0, 0, 0, // seq 1, ack 0
///     0x70, 0x02,             // data offset 7 words, SYN
///     0xff, 0xff, 0, 0, 0, 0, // window, checksum, urgent pointer
///     254, 8, 0x9c, 0x40, 203, 0, 113, 7, // toa 203.0.113.7:40000
/// ];
/// let tcp = TcpHeader::new_checked(&segment[..]).unwrap();
/// let toa = tcp.toa(&Default::default()).unwrap().unwrap();
/// assert_eq!(toa.toa.socket_addr(), Some("203.0.113.7:40000".parse().unwrap()));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct TcpHeader<T> {
    buffer: T,
    origin: usize,
}

impl<T: AsRef<[u8]>> TcpHeader<T> {
    /// Checks that `buffer` starts with a whole TCP header (data offset at
    /// least 5 words, header within the buffer). The buffer's length is the
    /// segment's length.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        Self::new_checked_at(buffer, 0)
    }

    /// As [`TcpHeader::new_checked`], reporting offsets as if the header
    /// started at byte `origin` of a larger buffer.
    #[inline]
    pub(crate) fn new_checked_at(buffer: T, origin: usize) -> Result<Self, Error> {
        let buf = buffer.as_ref();
        if buf.len() < tcp::OPTIONS {
            return Err(Error::Truncated {
                layer: Layer::Tcp,
                offset: origin,
                need: tcp::OPTIONS,
                available: buf.len(),
            });
        }
        let data_offset = buf[tcp::DATA_OFFSET] >> 4;
        let header_len = usize::from(data_offset) * 4;
        if header_len < tcp::OPTIONS || header_len > buf.len() {
            return Err(Error::DataOffset { offset: origin, data_offset, available: buf.len() });
        }
        Ok(Self { buffer, origin })
    }

    fn buf(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// The source port.
    pub fn src_port(&self) -> u16 {
        read_u16(self.buf(), tcp::SRC_PORT)
    }

    /// The destination port.
    pub fn dst_port(&self) -> u16 {
        read_u16(self.buf(), tcp::DST_PORT)
    }

    /// The sequence number.
    pub fn seq_number(&self) -> u32 {
        read_u32(self.buf(), tcp::SEQ)
    }

    /// The acknowledgement number.
    pub fn ack_number(&self) -> u32 {
        read_u32(self.buf(), tcp::ACK)
    }

    /// The flags.
    pub fn flags(&self) -> TcpFlags {
        TcpFlags(self.buf()[tcp::FLAGS])
    }

    /// The window field.
    pub fn window(&self) -> u16 {
        read_u16(self.buf(), tcp::WINDOW)
    }

    /// The checksum field.
    pub fn checksum(&self) -> u16 {
        read_u16(self.buf(), tcp::CHECKSUM)
    }

    /// The header length in bytes, options included (20 to 60).
    #[inline]
    pub fn header_len(&self) -> usize {
        usize::from(self.buf()[tcp::DATA_OFFSET] >> 4) * 4
    }

    /// The raw options area.
    #[inline]
    pub fn options_bytes(&self) -> &[u8] {
        &self.buf()[tcp::OPTIONS..self.header_len()]
    }

    /// A walker over the options.
    #[inline]
    pub fn options(&self) -> Options<'_> {
        Options::new(self.options_bytes(), self.origin + tcp::OPTIONS)
    }

    /// The payload after the header.
    pub fn payload(&self) -> &[u8] {
        &self.buf()[self.header_len()..]
    }

    /// The first TOA of an enabled format (options after it are not
    /// checked); see [`Options::first_toa`].
    pub fn toa(&self, formats: &Formats) -> Result<Option<ToaOption>, Error> {
        self.options().first_toa(formats)
    }

    /// Every TOA of an enabled format.
    pub fn toas(&self, formats: &Formats) -> Toas<'_> {
        self.options().toas(formats)
    }

    /// The Tencent CLB options (VPC id, VIP), when present.
    pub fn tencent_meta(&self) -> Result<TencentMeta, Error> {
        self.options().tencent_meta()
    }
}

impl<'a> TcpHeader<&'a [u8]> {
    /// A walker over the options that borrows the underlying buffer, not the view.
    #[inline]
    pub fn into_options(self) -> Options<'a> {
        let header_len = usize::from(self.buffer[tcp::DATA_OFFSET] >> 4) * 4;
        Options::new(&self.buffer[tcp::OPTIONS..header_len], self.origin + tcp::OPTIONS)
    }
}

/// The IP version of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpVersion {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// A view of a whole IPv4 or IPv6 packet carrying a TCP segment.
///
/// `new_checked` validates the IP header (IPv4 options included), walks
/// IPv6 hop-by-hop, routing and destination-options extension headers,
/// reports fragments ([`Error::Fragment`]) without parsing past them, and
/// validates the TCP header. Bytes after the IP length (link-layer padding)
/// are ignored.
///
/// ```
/// use toa_core::{Formats, TcpPacket};
///
/// let packet: &[u8] = &[
///     0x45, 0, 0, 48, 0, 0, 0x40, 0, 64, 6, 0, 0, // IPv4, 48 bytes, DF, TTL 64, TCP
///     100, 125, 0, 1, 10, 0, 0, 2,                // 100.125.0.1 -> 10.0.0.2
///     0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x70, 0x02, 0xff, 0xff, 0, 0, 0, 0,
///     254, 8, 0x9c, 0x40, 203, 0, 113, 7,         // toa 203.0.113.7:40000
/// ];
/// let packet = TcpPacket::new_checked(packet).unwrap();
/// assert_eq!(packet.src().to_string(), "100.125.0.1:40000");
/// let toa = packet.toa(&Formats::default()).unwrap().unwrap();
/// assert_eq!(toa.toa.socket_addr().unwrap().to_string(), "203.0.113.7:40000");
/// assert_eq!(toa.offset, 40);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct TcpPacket<T> {
    buffer: T,
    version: IpVersion,
    tcp_offset: usize,
    len: usize,
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    /// Checks `buffer` as an IP packet carrying a whole TCP header.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let buf = buffer.as_ref();
        let (version, tcp_offset, len, protocol) = parse_ip(buf)?;
        if protocol != tcp::PROTOCOL {
            return Err(Error::NotTcp { protocol, offset: tcp_offset });
        }
        TcpHeader::new_checked_at(&buf[tcp_offset..len], tcp_offset)?;
        Ok(Self { buffer, version, tcp_offset, len })
    }

    pub(crate) fn buf(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// The IP version.
    pub fn version(&self) -> IpVersion {
        self.version
    }

    /// The packet's length as its IP header declares it (the buffer may be longer).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the packet is empty; never true for a checked packet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the TCP header starts (after IPv4 options or IPv6 extension headers).
    pub fn tcp_offset(&self) -> usize {
        self.tcp_offset
    }

    /// The TCP header and payload.
    #[inline]
    pub fn tcp(&self) -> TcpHeader<&[u8]> {
        TcpHeader { buffer: &self.buf()[self.tcp_offset..self.len], origin: self.tcp_offset }
    }

    /// The source IP address.
    pub fn src_addr(&self) -> IpAddr {
        self.addr(ipv4::SRC, ipv6::SRC)
    }

    /// The destination IP address.
    pub fn dst_addr(&self) -> IpAddr {
        self.addr(ipv4::DST, ipv6::DST)
    }

    /// The source address and port.
    pub fn src(&self) -> SocketAddr {
        SocketAddr::new(self.src_addr(), self.tcp().src_port())
    }

    /// The destination address and port.
    pub fn dst(&self) -> SocketAddr {
        SocketAddr::new(self.dst_addr(), self.tcp().dst_port())
    }

    fn addr(&self, v4: core::ops::Range<usize>, v6: core::ops::Range<usize>) -> IpAddr {
        ip_addr(self.buf(), self.version, v4, v6)
    }

    /// The first TOA of an enabled format (options after it are not
    /// checked); see [`Options::first_toa`].
    #[inline]
    pub fn toa(&self, formats: &Formats) -> Result<Option<ToaOption>, Error> {
        self.tcp().options().first_toa(formats)
    }

    /// Every TOA of an enabled format, in header order.
    pub fn toas(&self, formats: &Formats) -> Toas<'_> {
        self.tcp().into_options().toas(formats)
    }

    /// The pseudo-header sum for a TCP segment of `tcp_len` bytes.
    pub(crate) fn pseudo_header(&self, tcp_len: usize) -> Accumulator {
        let mut acc = Accumulator::new();
        match (self.src_addr(), self.dst_addr()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                // A checked IPv4 packet is at most 65535 bytes.
                acc.add_ipv4_pseudo_header(src, dst, tcp::PROTOCOL, tcp_len as u16);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                acc.add_ipv6_pseudo_header(src, dst, tcp::PROTOCOL, tcp_len as u32);
            }
            _ => unreachable!("source and destination share the packet's version"),
        }
        acc
    }

    /// Whether the IPv4 header checksum (if any) and the TCP checksum are valid.
    pub fn checksums_valid(&self) -> bool {
        let buf = self.buf();
        let ip_ok = match self.version {
            IpVersion::V4 => {
                let ihl = usize::from(buf[ipv4::VER_IHL] & 0x0f) * 4;
                crate::checksum::compute(&buf[..ihl]) == 0
            }
            IpVersion::V6 => true,
        };
        let segment = &buf[self.tcp_offset..self.len];
        let mut acc = self.pseudo_header(segment.len());
        acc.add_bytes(segment);
        ip_ok && acc.finish() == 0
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

/// The address at `v4` or `v6` of a checked IP header, by its version.
pub(crate) fn ip_addr(
    buf: &[u8],
    version: IpVersion,
    v4: core::ops::Range<usize>,
    v6: core::ops::Range<usize>,
) -> IpAddr {
    match version {
        IpVersion::V4 => IpAddr::V4(Ipv4Addr::from_bits(read_u32(buf, v4))),
        IpVersion::V6 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&buf[v6]);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
    }
}

/// Validates the IP header (and IPv6 extension headers) of `buf`; returns
/// (version, upper-layer offset, packet length, protocol).
#[inline]
pub(crate) fn parse_ip(buf: &[u8]) -> Result<(IpVersion, usize, usize, u8), Error> {
    let Some(&first) = buf.first() else {
        let (layer, need, available) = (Layer::Ipv4, ipv4::MIN_LEN, 0);
        return Err(Error::Truncated { layer, offset: 0, need, available });
    };
    match first >> 4 {
        4 => parse_ipv4(buf),
        6 => parse_ipv6(buf),
        version => Err(Error::UnknownIpVersion { version }),
    }
}

/// Validates an IPv4 header; returns (version, upper-layer offset, packet length, protocol).
#[inline]
fn parse_ipv4(buf: &[u8]) -> Result<(IpVersion, usize, usize, u8), Error> {
    if buf.len() < ipv4::MIN_LEN {
        let (need, available) = (ipv4::MIN_LEN, buf.len());
        return Err(Error::Truncated { layer: Layer::Ipv4, offset: 0, need, available });
    }
    let ihl = buf[ipv4::VER_IHL] & 0x0f;
    let header_len = usize::from(ihl) * 4;
    if header_len < ipv4::MIN_LEN {
        return Err(Error::Ipv4HeaderLength { ihl });
    }
    if header_len > buf.len() {
        let available = buf.len();
        return Err(Error::Truncated { layer: Layer::Ipv4, offset: 0, need: header_len, available });
    }
    let declared = usize::from(read_u16(buf, ipv4::TOTAL_LEN));
    if declared < header_len || declared > buf.len() {
        return Err(Error::IpLength { declared, min: header_len, available: buf.len() });
    }
    if read_u16(buf, ipv4::FLAGS_FRAG) & ipv4::MF_OFFSET_MASK != 0 {
        return Err(Error::Fragment { offset: 0 });
    }
    Ok((IpVersion::V4, header_len, declared, buf[ipv4::PROTOCOL]))
}

/// Validates an IPv6 header and its extension headers; returns (version,
/// upper-layer offset, packet length, protocol).
fn parse_ipv6(buf: &[u8]) -> Result<(IpVersion, usize, usize, u8), Error> {
    if buf.len() < ipv6::LEN {
        let (need, available) = (ipv6::LEN, buf.len());
        return Err(Error::Truncated { layer: Layer::Ipv6, offset: 0, need, available });
    }
    let payload_len = usize::from(read_u16(buf, ipv6::PAYLOAD_LEN));
    if payload_len == 0 && buf[ipv6::NEXT_HEADER] == ipv6::HOP_BY_HOP {
        // RFC 2675: a zero payload length with a hop-by-hop header is a jumbogram.
        return Err(Error::Jumbogram);
    }
    let len = ipv6::LEN + payload_len;
    if len > buf.len() {
        return Err(Error::IpLength { declared: len, min: ipv6::LEN, available: buf.len() });
    }
    let mut next = buf[ipv6::NEXT_HEADER];
    let mut offset = ipv6::LEN;
    loop {
        match next {
            ipv6::FRAGMENT => return Err(Error::Fragment { offset }),
            ipv6::HOP_BY_HOP | ipv6::ROUTING | ipv6::DEST_OPTIONS => {
                // Every one of these starts with next header and length in 8-byte units, minus one.
                let Some(&[next_header, ext_len]) = buf[..len].get(offset..offset + 2) else {
                    let available = len.saturating_sub(offset);
                    let layer = Layer::Ipv6Extension;
                    return Err(Error::Truncated { layer, offset, need: 8, available });
                };
                let ext_len = (usize::from(ext_len) + 1) * 8;
                if offset + ext_len > len {
                    let (layer, available) = (Layer::Ipv6Extension, len - offset);
                    return Err(Error::Truncated { layer, offset, need: ext_len, available });
                }
                next = next_header;
                offset += ext_len;
            }
            protocol => return Ok((IpVersion::V6, offset, len, protocol)),
        }
    }
}
