//! UOA, "UDP Option of Address": the client of a UDP flow under FULLNAT, as
//! DPVS carries it (`include/uoa.h`), in two formats:
//!
//! - **`ipo`**: an IPv4 option, code 31 (`31 | IPOPT_CONTROL`, 0x1f):
//!   `code(1) len(1) port(2) addr(4 or 16)`, length 8 for an IPv4 client,
//!   20 for an IPv6 one. IPv4 packets only (IPv6 has no header options).
//! - **`opp`**: a private IP protocol, 248, between the IP header and the UDP
//!   header: `version(4 bits: 1 IPv4 client, 2 IPv6 client) reserved(4 bits)
//!   protocol(1: 17) length(2: the header and its options)`, then options
//!   in the IPv4 option format holding the same UOA option. Many switches
//!   drop IPv4 options or punt them to a CPU; an unknown protocol they
//!   forward.
//!
//! [`find_uoa`] reads either; [`insert_uoa`] writes one into a UDP datagram;
//! [`strip_uoa`] turns a datagram back into plain UDP. The UDP checksum never
//! changes: its pseudo-header holds neither IP options nor the protocol 248.
//! The IPv4 header checksum is recomputed.
//!
//! ```
//! use toa_core::uoa::{find_uoa, insert_uoa, strip_uoa, UoaFormat};
//!
//! let datagram = [
//!     0x45, 0, 0, 32, 0, 0, 0x40, 0, 64, 17, 0, 0, // IPv4, 32 bytes, UDP (checksum below)
//!     100, 125, 1, 1, 100, 125, 2, 1,             // 100.125.1.1 -> 100.125.2.1
//!     0x9c, 0x40, 0x00, 0x35, 0, 12, 0, 0,        // 40000 -> 53, length 12
//!     b'p', b'i', b'n', b'g',
//! ];
//! let mut buf = [0u8; 64];
//! buf[..32].copy_from_slice(&datagram);
//! let client = "203.0.113.7:40000".parse().unwrap();
//! let len = insert_uoa(&mut buf, 32, client, UoaFormat::Opp).unwrap();
//! assert_eq!(len, 44); // 4 bytes of opp header, 8 of UOA option
//! let found = find_uoa(&buf[..len]).unwrap().unwrap();
//! assert_eq!((found.client, found.format), (client, UoaFormat::Opp));
//! let (len, _) = strip_uoa(&mut buf, len).unwrap();
//! assert_eq!(&buf[12..len], &datagram[12..]); // as it was, but for the (recomputed) IP checksum
//! ```

use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::Error;
use crate::checksum;
use crate::packet::field::{ipv4, ipv6, udp};
use crate::packet::{parse_ip, read_u16};

/// The IPv4 option code of UOA (`31 | IPOPT_CONTROL`).
pub const IPOPT_UOA: u8 = 0x1f;
/// The private IP protocol number of the `opp` format.
pub const IPPROTO_OPT: u8 = 248;
/// The `opp` header's fixed part.
pub const OPP_HEADER_LEN: usize = 4;

/// The two ways UOA travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UoaFormat {
    /// An IPv4 header option (IPv4 packets only).
    Ipo,
    /// A private protocol (248) header before the UDP header.
    Opp,
}

impl UoaFormat {
    /// `ipo` or `opp`.
    pub const fn name(self) -> &'static str {
        match self {
            UoaFormat::Ipo => "ipo",
            UoaFormat::Opp => "opp",
        }
    }
}

impl fmt::Display for UoaFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for UoaFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "ipo" => Ok(UoaFormat::Ipo),
            "opp" => Ok(UoaFormat::Opp),
            _ => Err(Error::NotSupported { what: "a UOA format other than ipo and opp" }),
        }
    }
}

/// A UOA found in a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UoaFound {
    /// The client's address and port.
    pub client: SocketAddr,
    /// How it travelled.
    pub format: UoaFormat,
    /// Where the UOA option starts (inside the IPv4 options or the opp header).
    pub offset: usize,
}

/// The UOA option's length for a client of this family.
const fn option_len(client: &SocketAddr) -> usize {
    match client {
        SocketAddr::V4(_) => 8,
        SocketAddr::V6(_) => 20,
    }
}

/// Writes the UOA option for `client` at `out[..option_len]`.
fn write_option(out: &mut [u8], client: &SocketAddr) {
    out[0] = IPOPT_UOA;
    out[1] = option_len(client) as u8;
    out[2..4].copy_from_slice(&client.port().to_be_bytes());
    match client.ip() {
        IpAddr::V4(ip) => out[4..8].copy_from_slice(&ip.octets()),
        IpAddr::V6(ip) => out[4..20].copy_from_slice(&ip.octets()),
    }
}

/// Walks an IPv4-format option list `opts` (at `base` in the packet) for the
/// UOA option. A malformed list or UOA option is an error.
fn find_in_options(opts: &[u8], base: usize) -> Result<Option<(SocketAddr, usize)>, Error> {
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => break,
            1 => i += 1,
            code => {
                let Some(&len) = opts.get(i + 1) else {
                    return Err(Error::UoaMalformed { offset: base + i });
                };
                let len = usize::from(len);
                if len < 2 || i + len > opts.len() {
                    return Err(Error::UoaMalformed { offset: base + i });
                }
                if code == IPOPT_UOA {
                    if len != 8 && len != 20 {
                        return Err(Error::UoaMalformed { offset: base + i });
                    }
                    let body = &opts[i + 2..i + len];
                    let port = u16::from_be_bytes([body[0], body[1]]);
                    let ip = match len {
                        8 => IpAddr::V4(Ipv4Addr::new(body[2], body[3], body[4], body[5])),
                        20 => {
                            let mut b = [0u8; 16];
                            b.copy_from_slice(&body[2..18]);
                            IpAddr::V6(Ipv6Addr::from(b))
                        }
                        _ => return Err(Error::UoaMalformed { offset: base + i }),
                    };
                    return Ok(Some((SocketAddr::new(ip, port), base + i)));
                }
                i += len;
            }
        }
    }
    Ok(None)
}

/// The UOA in an IPv4 options area (what `IP_RECVOPTS` hands a UDP socket),
/// or `None`; a malformed area is an error (offsets count from its start).
///
/// ```
/// let opts = [0x1f, 8, 0x9c, 0x40, 203, 0, 113, 7];
/// let client = toa_core::uoa::find_uoa_in_options(&opts).unwrap();
/// assert_eq!(client, Some("203.0.113.7:40000".parse().unwrap()));
/// ```
pub fn find_uoa_in_options(opts: &[u8]) -> Result<Option<SocketAddr>, Error> {
    Ok(find_in_options(opts, 0)?.map(|(client, _)| client))
}

/// The opp header at `at`: (its length, the next protocol). Checked: version
/// 1 or 2, reserved bits zero, a length that covers the fixed part and fits.
fn opp_header(buf: &[u8], at: usize, end: usize) -> Result<(usize, u8), Error> {
    if at + OPP_HEADER_LEN > end {
        return Err(Error::UoaMalformed { offset: at });
    }
    let (version, reserved) = (buf[at] >> 4, buf[at] & 0x0f);
    let len = usize::from(u16::from_be_bytes([buf[at + 2], buf[at + 3]]));
    if !(1..=2).contains(&version) || reserved != 0 || len < OPP_HEADER_LEN || at + len > end {
        return Err(Error::UoaMalformed { offset: at });
    }
    Ok((len, buf[at + 1]))
}

/// The UOA of an IP packet, in either format, or `None`.
///
/// An `ipo` option is looked for in IPv4 options; an `opp` header when the
/// IPv4 protocol, or the IPv6 next header of the fixed header, is 248.
pub fn find_uoa(packet: &[u8]) -> Result<Option<UoaFound>, Error> {
    let (version, l4, len, protocol) = parse_ip(packet)?;
    locate(packet, version, l4, len, protocol)
}

/// [`find_uoa`] on a packet whose IP header `parse_ip` has checked: the
/// version, the upper-layer offset, the packet length and the protocol.
fn locate(
    packet: &[u8],
    version: crate::IpVersion,
    l4: usize,
    len: usize,
    protocol: u8,
) -> Result<Option<UoaFound>, Error> {
    if version == crate::IpVersion::V4 {
        if let Some((client, offset)) = find_in_options(&packet[ipv4::MIN_LEN..l4], ipv4::MIN_LEN)? {
            return Ok(Some(UoaFound { client, format: UoaFormat::Ipo, offset }));
        }
    }
    if protocol != IPPROTO_OPT {
        return Ok(None);
    }
    if version == crate::IpVersion::V6 && l4 != ipv6::LEN {
        return Err(Error::NotSupported { what: "IPv6 extension headers before an opp header" });
    }
    let (opp_len, _) = opp_header(packet, l4, len)?;
    let found = find_in_options(&packet[l4 + OPP_HEADER_LEN..l4 + opp_len], l4 + OPP_HEADER_LEN)?;
    Ok(found.map(|(client, offset)| UoaFound { client, format: UoaFormat::Opp, offset }))
}

/// Recomputes the IPv4 header checksum of `buf[..header_len]`.
fn fix_ipv4_checksum(buf: &mut [u8], header_len: usize) {
    buf[ipv4::CHECKSUM].copy_from_slice(&[0, 0]);
    let sum = checksum::compute(&buf[..header_len]);
    buf[ipv4::CHECKSUM].copy_from_slice(&sum.to_be_bytes());
}

/// Writes the IP length of a packet now `len` bytes long.
fn set_ip_length(buf: &mut [u8], v4: bool, len: usize) {
    if v4 {
        buf[ipv4::TOTAL_LEN].copy_from_slice(&(len as u16).to_be_bytes());
    } else {
        buf[ipv6::PAYLOAD_LEN].copy_from_slice(&((len - ipv6::LEN) as u16).to_be_bytes());
    }
}

/// Inserts a UOA naming `client` into the UDP datagram `buf[..len]`; returns
/// the new length. `ipo` needs an IPv4 packet with room for the option in
/// its header (at most 40 bytes of options); `opp` needs UDP right after the
/// fixed IPv6 header. A packet that already carries a UOA is refused: strip it first.
/// On any error `buf` is left as it was.
pub fn insert_uoa(buf: &mut [u8], len: usize, client: SocketAddr, format: UoaFormat) -> Result<usize, Error> {
    let packet = buf.get(..len).ok_or(Error::Capacity { need: len, capacity: buf.len() })?;
    let udp_packet = crate::UdpPacket::new_checked(packet)?;
    let v4 = udp_packet.version() == crate::IpVersion::V4;
    let l4 = udp_packet.udp_offset();
    // The packet's own length (a buffer may hold more).
    let len = if v4 {
        usize::from(read_u16(buf, ipv4::TOTAL_LEN))
    } else {
        ipv6::LEN + usize::from(read_u16(buf, ipv6::PAYLOAD_LEN))
    };
    // UDP, so only an ipo option can be there.
    if locate(&buf[..len], udp_packet.version(), l4, len, udp::PROTOCOL)?.is_some() {
        return Err(Error::NotSupported { what: "a second UOA (strip the one there first)" });
    }
    let option = option_len(&client);
    let grow = match format {
        UoaFormat::Ipo if !v4 => return Err(Error::NotSupported { what: "ipo in an IPv6 packet (use opp)" }),
        UoaFormat::Ipo => {
            if l4 + option > ipv4::MIN_LEN + 40 {
                return Err(Error::IpOptionsFull { need: option, available: ipv4::MIN_LEN + 40 - l4 });
            }
            option
        }
        UoaFormat::Opp if !v4 && l4 != ipv6::LEN => {
            return Err(Error::NotSupported { what: "IPv6 extension headers before UDP (opp)" });
        }
        UoaFormat::Opp => OPP_HEADER_LEN + option,
    };
    let new_len = len + grow;
    if new_len - if v4 { 0 } else { ipv6::LEN } > usize::from(u16::MAX) {
        return Err(Error::TooLong { len: new_len });
    }
    if buf.len() < new_len {
        return Err(Error::Capacity { need: new_len, capacity: buf.len() });
    }
    match format {
        UoaFormat::Ipo => {
            // First among the options: after an EOL it would be padding.
            let at = ipv4::MIN_LEN;
            buf.copy_within(at..len, at + grow);
            write_option(&mut buf[at..at + grow], &client);
            buf[ipv4::VER_IHL] = 0x40 | (((l4 + grow) / 4) as u8);
            set_ip_length(buf, true, new_len);
            fix_ipv4_checksum(buf, l4 + grow);
        }
        UoaFormat::Opp => {
            buf.copy_within(l4..len, l4 + grow);
            let version = if client.is_ipv4() { 1 } else { 2 };
            buf[l4] = version << 4;
            buf[l4 + 1] = udp::PROTOCOL;
            buf[l4 + 2..l4 + 4].copy_from_slice(&(grow as u16).to_be_bytes());
            write_option(&mut buf[l4 + OPP_HEADER_LEN..l4 + grow], &client);
            set_ip_length(buf, v4, new_len);
            if v4 {
                buf[ipv4::PROTOCOL] = IPPROTO_OPT;
                fix_ipv4_checksum(buf, l4);
            } else {
                buf[ipv6::NEXT_HEADER] = IPPROTO_OPT;
            }
        }
    }
    Ok(new_len)
}

/// Removes the UOA from `buf[..len]`: the `ipo` option, or the whole `opp`
/// header (the packet becomes plain UDP again, as the IP stack expects).
/// Returns the new length and the UOA that was removed. An `opp` header
/// without a UOA option is removed too (a shorter length, `None`); with
/// neither, `buf` is untouched and the length is `len`. On any error `buf`
/// is left as it was.
pub fn strip_uoa(buf: &mut [u8], len: usize) -> Result<(usize, Option<UoaFound>), Error> {
    let packet = buf.get(..len).ok_or(Error::Capacity { need: len, capacity: buf.len() })?;
    let (version, l4, ip_len, protocol) = parse_ip(packet)?;
    let v4 = version == crate::IpVersion::V4;
    let found = locate(packet, version, l4, ip_len, protocol)?;
    if let Some(found @ UoaFound { format: UoaFormat::Ipo, offset, .. }) = found {
        let option = usize::from(buf[offset + 1]);
        buf.copy_within(offset + option..ip_len, offset);
        let new_len = ip_len - option;
        buf[ipv4::VER_IHL] = 0x40 | (((l4 - option) / 4) as u8);
        set_ip_length(buf, true, new_len);
        fix_ipv4_checksum(buf, l4 - option);
        return Ok((new_len, Some(found)));
    }
    if protocol != IPPROTO_OPT {
        return Ok((len, None));
    }
    // find_uoa has checked the opp header (and that IPv6 has no extension headers).
    let (opp_len, next) = opp_header(buf, l4, ip_len)?;
    buf.copy_within(l4 + opp_len..ip_len, l4);
    let new_len = ip_len - opp_len;
    set_ip_length(buf, v4, new_len);
    if v4 {
        buf[ipv4::PROTOCOL] = next;
        fix_ipv4_checksum(buf, l4);
    } else {
        buf[ipv6::NEXT_HEADER] = next;
    }
    Ok((new_len, found))
}

/// The carrier DPVS sends ahead of a datagram with no room for the UOA: an
/// empty datagram of the same flow (the addresses, ports, TTL and, for
/// IPv6, traffic class and flow label of `datagram`, no IPv4 options, no
/// payload) that carries the UOA naming `client`. Written to `out`; returns
/// its length (at most 20 + 20 + 8 bytes for IPv4, 40 + 24 + 8 for IPv6).
/// The backend's UOA reader records it and never hands it to the
/// application (`toa-shim`'s helper drops it, a `UoaSocket` skips it).
///
/// ```
/// use toa_core::uoa::{UoaFormat, find_uoa, uoa_carrier};
///
/// let datagram = [
///     0x45, 0, 0, 32, 0, 0, 0x40, 0, 64, 17, 0xb4, 0x33, 100, 125, 1, 1, 100, 125, 2, 1,
///     0x9c, 0x40, 0x00, 0x35, 0, 12, 0, 0, b'p', b'i', b'n', b'g',
/// ];
/// let mut out = [0u8; 64];
/// let client = "203.0.113.7:40000".parse().unwrap();
/// let len = uoa_carrier(&datagram, client, UoaFormat::Ipo, &mut out).unwrap();
/// assert_eq!(len, 20 + 8 + 8); // IP header, UOA option, UDP header
/// assert_eq!(find_uoa(&out[..len]).unwrap().unwrap().client, client);
/// ```
pub fn uoa_carrier(
    datagram: &[u8],
    client: SocketAddr,
    format: UoaFormat,
    out: &mut [u8],
) -> Result<usize, Error> {
    let packet = crate::UdpPacket::new_checked(datagram)?;
    let l4 = packet.udp_offset();
    let (src, dst) = (packet.src(), packet.dst());
    let header = match packet.version() {
        crate::IpVersion::V4 => ipv4::MIN_LEN,
        crate::IpVersion::V6 if l4 == ipv6::LEN => ipv6::LEN,
        crate::IpVersion::V6 => {
            return Err(Error::NotSupported { what: "IPv6 extension headers before UDP (no carrier)" });
        }
    };
    let len = header + udp::HEADER_LEN;
    let need = len + OPP_HEADER_LEN + 20;
    if out.len() < need {
        return Err(Error::Capacity { need, capacity: out.len() });
    }
    out[..header].copy_from_slice(&datagram[..header]);
    out[header..len].fill(0);
    out[header..header + 2].copy_from_slice(&src.port().to_be_bytes());
    out[header + 2..header + 4].copy_from_slice(&dst.port().to_be_bytes());
    out[header + 4..header + 6].copy_from_slice(&(udp::HEADER_LEN as u16).to_be_bytes());
    let mut sum = checksum::Accumulator::new();
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out[ipv4::VER_IHL] = 0x45;
            out[ipv4::FLAGS_FRAG].copy_from_slice(&[0x40, 0]); // DF, not a fragment
            out[ipv4::PROTOCOL] = udp::PROTOCOL;
            set_ip_length(out, true, len);
            fix_ipv4_checksum(out, header);
            sum.add_ipv4_pseudo_header(s, d, udp::PROTOCOL, udp::HEADER_LEN as u16);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out[ipv6::NEXT_HEADER] = udp::PROTOCOL;
            set_ip_length(out, false, len);
            sum.add_ipv6_pseudo_header(s, d, udp::PROTOCOL, udp::HEADER_LEN as u32);
        }
        _ => unreachable!("one IP version per packet"),
    }
    sum.add_bytes(&out[header..len]);
    // A computed zero goes as all ones (zero means "no checksum" to IPv4, and is refused by IPv6).
    let sum = match sum.finish() {
        0 => 0xffff,
        s => s,
    };
    out[header + 6..header + 8].copy_from_slice(&sum.to_be_bytes());
    insert_uoa(out, len, client, format)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IPv4 UDP 100.125.1.1:40000 -> 100.125.2.1:53, "ping", checksums right.
    fn v4_datagram() -> [u8; 32] {
        let mut p = [
            0x45, 0, 0, 32, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 100, 125, 1, 1, 100, 125, 2, 1, 0x9c, 0x40,
            0x00, 0x35, 0, 12, 0, 0, b'p', b'i', b'n', b'g',
        ];
        fix_ipv4_checksum(&mut p, 20);
        p
    }

    #[test]
    fn golden_ipo_v4_client() {
        let mut buf = [0u8; 128];
        buf[..32].copy_from_slice(&v4_datagram());
        let len = insert_uoa(&mut buf, 32, "203.0.113.7:40000".parse().unwrap(), UoaFormat::Ipo).unwrap();
        assert_eq!(len, 40);
        assert_eq!(buf[0], 0x47, "IHL 7 words");
        assert_eq!(&buf[2..4], &[0, 40], "total length");
        assert_eq!(buf[9], 17, "still UDP");
        // code 0x1f, length 8, port 40000, 203.0.113.7
        assert_eq!(&buf[20..28], &[0x1f, 8, 0x9c, 0x40, 203, 0, 113, 7]);
        assert_eq!(&buf[28..40], &v4_datagram()[20..32], "UDP header and payload unchanged");
        assert_eq!(checksum::compute(&buf[..28]), 0, "IPv4 header checksum");
        let found = find_uoa(&buf[..len]).unwrap().unwrap();
        assert_eq!(
            found,
            UoaFound { client: "203.0.113.7:40000".parse().unwrap(), format: UoaFormat::Ipo, offset: 20 }
        );
        let (len, removed) = strip_uoa(&mut buf, len).unwrap();
        assert_eq!((len, removed), (32, Some(found)));
        assert_eq!(buf[..32], v4_datagram());
    }

    #[test]
    fn golden_opp_v4_and_v6_clients() {
        let mut buf = [0u8; 128];
        buf[..32].copy_from_slice(&v4_datagram());
        let len = insert_uoa(&mut buf, 32, "[2001:db8::7]:40000".parse().unwrap(), UoaFormat::Opp).unwrap();
        assert_eq!(len, 32 + 4 + 20);
        assert_eq!(buf[9], 248, "protocol 248");
        // version 2 (IPv6 client), reserved 0, next protocol 17, length 24
        assert_eq!(&buf[20..24], &[0x20, 17, 0, 24]);
        assert_eq!(&buf[24..28], &[0x1f, 20, 0x9c, 0x40]);
        assert_eq!(&buf[28..44], &"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(&buf[44..56], &v4_datagram()[20..32]);
        assert_eq!(checksum::compute(&buf[..20]), 0);
        assert_eq!(strip_uoa(&mut buf, len).unwrap().0, 32);
        assert_eq!(buf[..32], v4_datagram());

        // IPv6 packet, IPv4 client: version 1, option length 8.
        let mut v6 = [0u8; 60];
        v6[0] = 0x60;
        v6[4..6].copy_from_slice(&12u16.to_be_bytes());
        v6[6] = 17;
        v6[7] = 64;
        v6[8..24].copy_from_slice(&"2001:db8:64::1:1".parse::<Ipv6Addr>().unwrap().octets());
        v6[24..40].copy_from_slice(&"2001:db8:64::2:1".parse::<Ipv6Addr>().unwrap().octets());
        v6[40..52].copy_from_slice(&[0x9c, 0x40, 0, 0x35, 0, 12, 0x12, 0x34, b'p', b'i', b'n', b'g']);
        let original = v6;
        let mut buf = [0u8; 128];
        buf[..52].copy_from_slice(&v6[..52]);
        let len = insert_uoa(&mut buf, 52, "203.0.113.7:40000".parse().unwrap(), UoaFormat::Opp).unwrap();
        assert_eq!(len, 52 + 12);
        assert_eq!((buf[6], &buf[4..6]), (248, &[0u8, 24][..]));
        assert_eq!(&buf[40..52], &[0x10, 17, 0, 12, 0x1f, 8, 0x9c, 0x40, 203, 0, 113, 7]);
        assert_eq!(find_uoa(&buf[..len]).unwrap().unwrap().client, "203.0.113.7:40000".parse().unwrap());
        assert_eq!(strip_uoa(&mut buf, len).unwrap().0, 52);
        assert_eq!(buf[..52], original[..52]);
        // ipo has no place in IPv6.
        assert_eq!(
            insert_uoa(&mut buf, 52, "203.0.113.7:1".parse().unwrap(), UoaFormat::Ipo),
            Err(Error::NotSupported { what: "ipo in an IPv6 packet (use opp)" })
        );
    }

    #[test]
    fn malformed_and_full() {
        // An opp header with version 3, or a length past the packet.
        let mut buf = [0u8; 128];
        buf[..32].copy_from_slice(&v4_datagram());
        let len = insert_uoa(&mut buf, 32, "203.0.113.7:40000".parse().unwrap(), UoaFormat::Opp).unwrap();
        let mut bad = buf;
        bad[20] = 0x30;
        assert_eq!(find_uoa(&bad[..len]), Err(Error::UoaMalformed { offset: 20 }));
        let mut bad = buf;
        bad[23] = 200;
        assert_eq!(find_uoa(&bad[..len]), Err(Error::UoaMalformed { offset: 20 }));
        // A UOA option of length 9.
        let mut bad = buf;
        bad[25] = 9;
        assert!(matches!(find_uoa(&bad[..len]), Err(Error::UoaMalformed { .. })));
        let before = bad;
        assert!(strip_uoa(&mut bad, len).is_err());
        assert_eq!(bad, before, "an error leaves the buffer alone");
        // IPv4 options already 36 bytes: no room for 8 more.
        let mut full = [0u8; 128];
        full[..20].copy_from_slice(&v4_datagram()[..20]);
        full[0] = 0x4e;
        full[20..56].fill(1);
        full[56..68].copy_from_slice(&v4_datagram()[20..32]);
        full[2..4].copy_from_slice(&68u16.to_be_bytes());
        fix_ipv4_checksum(&mut full, 56);
        assert_eq!(
            insert_uoa(&mut full, 68, "203.0.113.7:1".parse().unwrap(), UoaFormat::Ipo),
            Err(Error::IpOptionsFull { need: 8, available: 4 })
        );
        // Not UDP, or no buffer room.
        let mut small = [0u8; 34];
        small[..32].copy_from_slice(&v4_datagram());
        assert_eq!(
            insert_uoa(&mut small, 32, "203.0.113.7:1".parse().unwrap(), UoaFormat::Ipo),
            Err(Error::Capacity { need: 40, capacity: 34 })
        );
        // A packet without UOA: nothing found, nothing stripped.
        let mut plain = v4_datagram();
        assert_eq!(find_uoa(&plain), Ok(None));
        assert_eq!(strip_uoa(&mut plain, 32), Ok((32, None)));
    }
}
