//! A zero-copy view of IPv4/IPv6 UDP datagrams, for load balancers that also
//! carry UDP (TOA itself is TCP-only).

use core::net::{IpAddr, SocketAddr};

use crate::Error;
use crate::checksum::Accumulator;
use crate::error::Layer;
use crate::packet::field::{ipv4, ipv6, udp};
use crate::packet::{IpVersion, ip_addr, parse_ip, read_u16};

/// A view of a whole IPv4 or IPv6 packet carrying a UDP datagram.
///
/// `new_checked` validates the IP header as [`TcpPacket`](crate::TcpPacket)
/// does (IPv6 extension headers walked, fragments reported) and the UDP
/// length field against the IP payload.
///
/// ```
/// use toa_core::UdpPacket;
///
/// let packet: &[u8] = &[
///     0x45, 0, 0, 32, 0, 0, 0x40, 0, 64, 17, 0, 0, // IPv4, 32 bytes, UDP
///     203, 0, 113, 7, 203, 0, 113, 10,            // 203.0.113.7 -> 203.0.113.10
///     0x9c, 0x40, 0x00, 0x35, 0, 12, 0, 0,        // 40000 -> 53, length 12, no checksum
///     b'p', b'i', b'n', b'g',
/// ];
/// let packet = UdpPacket::new_checked(packet)?;
/// assert_eq!(packet.src().to_string(), "203.0.113.7:40000");
/// assert_eq!(packet.dst().to_string(), "203.0.113.10:53");
/// assert_eq!(packet.payload(), b"ping");
/// # Ok::<_, toa_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct UdpPacket<T> {
    buffer: T,
    version: IpVersion,
    udp_offset: usize,
    /// The end of the datagram as the UDP length declares it.
    udp_end: usize,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Checks `buffer` as an IP packet carrying a whole UDP header.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let buf = buffer.as_ref();
        let (version, offset, len, protocol) = parse_ip(buf)?;
        if protocol != udp::PROTOCOL {
            return Err(Error::NotUdp { protocol, offset });
        }
        let available = len - offset;
        if available < udp::HEADER_LEN {
            let need = udp::HEADER_LEN;
            return Err(Error::Truncated { layer: Layer::Udp, offset, need, available });
        }
        let declared = usize::from(read_u16(buf, offset + udp::LENGTH.start..offset + udp::LENGTH.end));
        if declared < udp::HEADER_LEN || declared > available {
            return Err(Error::UdpLength { offset, declared, available });
        }
        Ok(Self { buffer, version, udp_offset: offset, udp_end: offset + declared })
    }

    fn buf(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// The IP version.
    pub fn version(&self) -> IpVersion {
        self.version
    }

    /// Where the UDP header starts.
    pub fn udp_offset(&self) -> usize {
        self.udp_offset
    }

    /// The source address and port.
    pub fn src(&self) -> SocketAddr {
        SocketAddr::new(self.addr(ipv4::SRC, ipv6::SRC), self.port(udp::SRC_PORT))
    }

    /// The destination address and port.
    pub fn dst(&self) -> SocketAddr {
        SocketAddr::new(self.addr(ipv4::DST, ipv6::DST), self.port(udp::DST_PORT))
    }

    /// The datagram's payload, as long as the UDP length says.
    pub fn payload(&self) -> &[u8] {
        &self.buf()[self.udp_offset + udp::HEADER_LEN..self.udp_end]
    }

    /// The checksum field; 0 in IPv4 means "not computed".
    pub fn checksum(&self) -> u16 {
        self.port(udp::CHECKSUM)
    }

    /// Whether the IPv4 header checksum (if any) and the UDP checksum are
    /// valid. An IPv4 datagram without a UDP checksum (0) passes; an IPv6 one
    /// does not (RFC 8200 makes it mandatory).
    pub fn checksums_valid(&self) -> bool {
        let buf = self.buf();
        let datagram = &buf[self.udp_offset..self.udp_end];
        let mut acc = Accumulator::new();
        let ip_ok = match (self.addr(ipv4::SRC, ipv6::SRC), self.addr(ipv4::DST, ipv6::DST)) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let ihl = usize::from(buf[ipv4::VER_IHL] & 0x0f) * 4;
                if self.checksum() == 0 {
                    return crate::checksum::compute(&buf[..ihl]) == 0;
                }
                acc.add_ipv4_pseudo_header(src, dst, udp::PROTOCOL, datagram.len() as u16);
                crate::checksum::compute(&buf[..ihl]) == 0
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                acc.add_ipv6_pseudo_header(src, dst, udp::PROTOCOL, datagram.len() as u32);
                self.checksum() != 0
            }
            _ => unreachable!("source and destination share the packet's version"),
        };
        acc.add_bytes(datagram);
        ip_ok && acc.finish() == 0
    }

    fn port(&self, range: core::ops::Range<usize>) -> u16 {
        read_u16(self.buf(), self.udp_offset + range.start..self.udp_offset + range.end)
    }

    fn addr(&self, v4: core::ops::Range<usize>, v6: core::ops::Range<usize>) -> IpAddr {
        ip_addr(self.buf(), self.version, v4, v6)
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}
