//! The one error type of the codec.

use core::fmt;

use crate::Format;

/// Which header a [`Error::Truncated`] refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Layer {
    /// The IPv4 header.
    Ipv4,
    /// The fixed IPv6 header.
    Ipv6,
    /// An IPv6 extension header.
    Ipv6Extension,
    /// The TCP header.
    Tcp,
    /// The UDP header.
    Udp,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layer::Ipv4 => "ipv4 header",
            Layer::Ipv6 => "ipv6 header",
            Layer::Ipv6Extension => "ipv6 extension header",
            Layer::Tcp => "tcp header",
            Layer::Udp => "udp header",
        })
    }
}

/// Everything that can be wrong with a packet or an edit.
///
/// Offsets count bytes from the start of the buffer the failing function was
/// given: the IP header for packet functions, the options area for
/// [`Options`](crate::Options) built over bare option bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Error {
    /// The buffer ends inside a header.
    Truncated {
        /// The header that is cut short.
        layer: Layer,
        /// Where that header starts.
        offset: usize,
        /// Bytes the header needs.
        need: usize,
        /// Bytes the buffer holds from `offset` on.
        available: usize,
    },
    /// The IP version nibble is neither 4 nor 6.
    UnknownIpVersion {
        /// The version found.
        version: u8,
    },
    /// The IPv4 header length field (IHL) is below 5 words.
    Ipv4HeaderLength {
        /// The IHL found, in 32-bit words.
        ihl: u8,
    },
    /// The IP length field disagrees with the header or the buffer.
    IpLength {
        /// The packet length the IP header declares, in bytes.
        declared: usize,
        /// The smallest length that would be valid (the header's own size).
        min: usize,
        /// Bytes in the buffer.
        available: usize,
    },
    /// An IPv6 jumbogram (payload length 0 with a jumbo option); not supported.
    Jumbogram,
    /// The packet is an IP fragment; its TCP header is not parsed.
    Fragment {
        /// The IPv4 header (0) or the IPv6 fragment header.
        offset: usize,
    },
    /// The packet does not carry TCP.
    NotTcp {
        /// The upper-layer protocol number found.
        protocol: u8,
        /// Where that protocol's header would start.
        offset: usize,
    },
    /// The packet does not carry UDP (from [`UdpPacket`](crate::UdpPacket)).
    NotUdp {
        /// The upper-layer protocol number found.
        protocol: u8,
        /// Where that protocol's header would start.
        offset: usize,
    },
    /// The UDP length field is below 8 or runs past the IP payload.
    UdpLength {
        /// Where the UDP header starts.
        offset: usize,
        /// The length the UDP header declares.
        declared: usize,
        /// Bytes of IP payload from `offset` on.
        available: usize,
    },
    /// The TCP data offset is below 5 words or points past the segment.
    DataOffset {
        /// Where the TCP header starts.
        offset: usize,
        /// The data offset found, in 32-bit words.
        data_offset: u8,
        /// Bytes in the segment.
        available: usize,
    },
    /// A TCP option's length byte is 0 or 1 (it must count kind and length).
    OptionLength {
        /// Where the option starts.
        offset: usize,
        /// The option kind.
        kind: u8,
        /// The length byte found.
        len: u8,
    },
    /// A TCP option runs past the end of the options area.
    OptionOverrun {
        /// Where the option starts.
        offset: usize,
        /// The option kind.
        kind: u8,
        /// The length the option claims; `None` when even the length byte is missing.
        len: Option<u8>,
        /// Bytes left in the options area from `offset` on.
        available: usize,
    },
    /// An option of a kind reserved for an enabled TOA format has a length no
    /// enabled format of that kind uses.
    ToaLength {
        /// Where the option starts.
        offset: usize,
        /// The option kind.
        kind: u8,
        /// The length found.
        len: u8,
    },
    /// An MSS option whose length is not 4.
    MssLength {
        /// Where the option starts.
        offset: usize,
        /// The length found.
        len: u8,
    },
    /// The format cannot carry this address: the wrong family (an IPv6
    /// address for `toa`), or a port for `ali-cdn`.
    Unrepresentable {
        /// The format asked for.
        format: Format,
    },
    /// An address of the other IP version than the packet's.
    AddressFamily,
    /// The TCP header has no room for the option, even after reclaiming NOP padding.
    NoRoom {
        /// Option bytes needed.
        need: usize,
        /// Option bytes that could be made free.
        available: usize,
    },
    /// The caller's buffer is too small for the edited packet.
    Capacity {
        /// Bytes needed.
        need: usize,
        /// Bytes in the buffer.
        capacity: usize,
    },
    /// The edited packet would exceed the 65535-byte IP length field.
    TooLong {
        /// The length it would have.
        len: usize,
    },
    /// A UOA that does not parse: an `opp` header with a bad version,
    /// reserved bits or length, a UOA option of another length than 8 or 20,
    /// or a malformed option list around it.
    UoaMalformed {
        /// Where the header or option starts.
        offset: usize,
    },
    /// The IPv4 header has no room for the option (options are at most 40 bytes).
    IpOptionsFull {
        /// Option bytes needed.
        need: usize,
        /// Option bytes left.
        available: usize,
    },
    /// A packet shape this codec does not handle.
    NotSupported {
        /// What it is.
        what: &'static str,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Truncated { layer, offset, need, available } => {
                write!(f, "truncated {layer} at offset {offset}: need {need} bytes, {available} available")
            }
            Error::UnknownIpVersion { version } => {
                write!(f, "ip version {version} is neither 4 nor 6")
            }
            Error::Ipv4HeaderLength { ihl } => {
                write!(f, "ipv4 header length {ihl} words is below the minimum of 5")
            }
            Error::IpLength { declared, min, available } => {
                write!(f, "ip length {declared} is invalid: header needs {min}, buffer holds {available}")
            }
            Error::Jumbogram => f.write_str("ipv6 jumbograms are not supported"),
            Error::Fragment { offset } => {
                write!(f, "ip fragment (header at offset {offset}): tcp header not parsed")
            }
            Error::NotTcp { protocol, offset } => {
                write!(f, "not tcp: protocol {protocol} at offset {offset}")
            }
            Error::NotUdp { protocol, offset } => {
                write!(f, "not udp: protocol {protocol} at offset {offset}")
            }
            Error::UdpLength { offset, declared, available } => write!(
                f,
                "udp length {declared} at offset {offset} is invalid: minimum 8, ip payload holds {available}"
            ),
            Error::DataOffset { offset, data_offset, available } => write!(
                f,
                "tcp data offset {data_offset} words at offset {offset} is invalid: segment holds {available} bytes"
            ),
            Error::OptionLength { offset, kind, len } => {
                write!(f, "tcp option kind {kind} at offset {offset} has length {len} (minimum 2)")
            }
            Error::OptionOverrun { offset, kind, len: Some(len), available } => write!(
                f,
                "tcp option kind {kind} at offset {offset} claims {len} bytes, only {available} left in the header"
            ),
            Error::OptionOverrun { offset, kind, len: None, .. } => {
                write!(f, "tcp option kind {kind} at offset {offset} is cut off before its length byte")
            }
            Error::ToaLength { offset, kind, len } => write!(
                f,
                "toa option kind {kind} at offset {offset} has length {len}, which no enabled format uses"
            ),
            Error::MssLength { offset, len } => {
                write!(f, "mss option at offset {offset} has length {len} (must be 4)")
            }
            Error::Unrepresentable { format } => {
                write!(f, "format {format} cannot carry this address")
            }
            Error::AddressFamily => f.write_str("address family does not match the packet's ip version"),
            Error::NoRoom { need, available } => {
                write!(f, "no room in the tcp header: need {need} option bytes, {available} available")
            }
            Error::Capacity { need, capacity } => {
                write!(f, "buffer too small: need {need} bytes, capacity {capacity}")
            }
            Error::TooLong { len } => write!(f, "packet would be {len} bytes, over 65535"),
            Error::UoaMalformed { offset } => write!(f, "malformed uoa at offset {offset}"),
            Error::IpOptionsFull { need, available } => {
                write!(f, "no room in the ipv4 options: need {need} bytes, {available} available")
            }
            Error::NotSupported { what } => write!(f, "not supported: {what}"),
        }
    }
}

impl core::error::Error for Error {}

impl Error {
    /// The byte offset the error points at, when it has one.
    ///
    /// ```
    /// let err = toa_core::Error::OptionLength { offset: 40, kind: 254, len: 0 };
    /// assert_eq!(err.offset(), Some(40));
    /// ```
    pub fn offset(&self) -> Option<usize> {
        match *self {
            Error::Truncated { offset, .. }
            | Error::Fragment { offset }
            | Error::NotTcp { offset, .. }
            | Error::NotUdp { offset, .. }
            | Error::UdpLength { offset, .. }
            | Error::DataOffset { offset, .. }
            | Error::OptionLength { offset, .. }
            | Error::OptionOverrun { offset, .. }
            | Error::ToaLength { offset, .. }
            | Error::MssLength { offset, .. }
            | Error::UoaMalformed { offset } => Some(offset),
            Error::UnknownIpVersion { .. }
            | Error::Ipv4HeaderLength { .. }
            | Error::IpLength { .. }
            | Error::Jumbogram => Some(0),
            Error::Unrepresentable { .. }
            | Error::AddressFamily
            | Error::NoRoom { .. }
            | Error::Capacity { .. }
            | Error::TooLong { .. }
            | Error::IpOptionsFull { .. }
            | Error::NotSupported { .. } => None,
        }
    }
}
