//! Rewriting a TCP or UDP packet's endpoints, as a FULLNAT load balancer does.

use core::net::{IpAddr, SocketAddr};

use crate::Error;
use crate::checksum::{self, Accumulator};
use crate::packet::field::{ipv4, ipv6, tcp, udp};
use crate::packet::{IpVersion, TcpPacket, read_u16};
use crate::udp::UdpPacket;

/// Sets the source and destination of the TCP or UDP packet in `buf[..len]`
/// to `src` and `dst` (addresses and ports), updating the IPv4 header checksum
/// and the TCP or UDP checksum incrementally (RFC 1624). The addresses must be
/// of the packet's IP version ([`Error::AddressFamily`] otherwise, with the
/// buffer untouched). An IPv4 UDP datagram sent without a checksum (0) stays
/// without one; a UDP checksum that comes out as 0 is sent as 0xffff (RFC 768).
/// Any other protocol is [`Error::NotTcp`].
///
/// ```
/// use toa_core::{rewrite_endpoints, TcpPacket};
///
/// let mut syn = [
///     0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0xcc, 0x50, 100, 125, 0, 1, 10, 0, 0, 2,
///     0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0xa4, 0xd1, 0, 0,
/// ];
/// rewrite_endpoints(&mut syn, 40, "100.125.0.9:5000".parse()?, "10.0.0.7:8080".parse()?)?;
/// let packet = TcpPacket::new_checked(&syn[..])?;
/// assert_eq!(packet.src().to_string(), "100.125.0.9:5000");
/// assert_eq!(packet.dst().to_string(), "10.0.0.7:8080");
/// assert!(packet.checksums_valid());
/// # Ok::<_, Box<dyn core::error::Error>>(())
/// ```
pub fn rewrite_endpoints(buf: &mut [u8], len: usize, src: SocketAddr, dst: SocketAddr) -> Result<(), Error> {
    let packet = buf.get(..len).ok_or(Error::Capacity { need: len, capacity: buf.len() })?;
    let (version, l4_start, csum_field) = match TcpPacket::new_checked(packet) {
        Ok(tcp) => (tcp.version(), tcp.tcp_offset(), tcp::CHECKSUM),
        Err(Error::NotTcp { protocol: udp::PROTOCOL, .. }) => {
            let udp = UdpPacket::new_checked(packet)?;
            (udp.version(), udp.udp_offset(), udp::CHECKSUM)
        }
        Err(e) => return Err(e),
    };
    let is_udp = csum_field == udp::CHECKSUM;
    let fits = |a: &SocketAddr| {
        matches!((a.ip(), version), (IpAddr::V4(_), IpVersion::V4) | (IpAddr::V6(_), IpVersion::V6))
    };
    if !fits(&src) || !fits(&dst) {
        return Err(Error::AddressFamily);
    }

    let mut removed = Accumulator::new();
    let mut added = Accumulator::new();
    let mut ip_removed = Accumulator::new();
    let mut ip_added = Accumulator::new();
    let (src_range, dst_range) = match version {
        IpVersion::V4 => (ipv4::SRC, ipv4::DST),
        IpVersion::V6 => (ipv6::SRC, ipv6::DST),
    };
    for (range, ip) in [(src_range, src.ip()), (dst_range, dst.ip())] {
        // Both address fields start at even offsets of the IP header.
        removed.add_bytes(&buf[range.clone()]);
        ip_removed.add_bytes(&buf[range.clone()]);
        match ip {
            IpAddr::V4(ip) => buf[range.clone()].copy_from_slice(&ip.octets()),
            IpAddr::V6(ip) => buf[range.clone()].copy_from_slice(&ip.octets()),
        }
        added.add_bytes(&buf[range.clone()]);
        ip_added.add_bytes(&buf[range]);
    }
    // TCP and UDP both start with the source and destination ports.
    let ports = l4_start + tcp::SRC_PORT.start..l4_start + tcp::DST_PORT.end;
    removed.add_bytes(&buf[ports.clone()]);
    buf[ports.start..ports.start + 2].copy_from_slice(&src.port().to_be_bytes());
    buf[ports.start + 2..ports.end].copy_from_slice(&dst.port().to_be_bytes());
    added.add_bytes(&buf[ports]);

    let csum = l4_start + csum_field.start..l4_start + csum_field.end;
    let old = read_u16(buf, csum.clone());
    // 0 in an IPv4 UDP header means "no checksum": there is nothing to update.
    if !(is_udp && old == 0) {
        let mut updated = checksum::update(old, removed, added);
        if is_udp && updated == 0 {
            updated = 0xffff;
        }
        buf[csum].copy_from_slice(&updated.to_be_bytes());
    }
    if version == IpVersion::V4 {
        let updated = checksum::update(read_u16(buf, ipv4::CHECKSUM), ip_removed, ip_added);
        buf[ipv4::CHECKSUM].copy_from_slice(&updated.to_be_bytes());
    }
    Ok(())
}
