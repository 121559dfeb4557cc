//! Shared test helpers: an independent checksum oracle (etherparse) and packet builders.
#![allow(dead_code, unreachable_pub)]

use std::net::{IpAddr, SocketAddr};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

/// Asserts, with etherparse as an independent implementation, that the IPv4
/// header checksum (if any) and the TCP checksum of `packet` are valid.
pub fn assert_checksums_valid(packet: &[u8]) {
    let sliced = SlicedPacket::from_ip(packet)
        .unwrap_or_else(|e| panic!("etherparse cannot slice the packet: {e}\n{packet:02x?}"));
    let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
        panic!("etherparse finds no tcp in {packet:02x?}");
    };
    let expected = match sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            let header = ip.header();
            assert_eq!(
                header.header_checksum(),
                header.to_header().calc_header_checksum(),
                "ipv4 header checksum of {packet:02x?}"
            );
            tcp.calc_checksum_ipv4(header.source(), header.destination()).expect("length fits")
        }
        Some(NetSlice::Ipv6(ip)) => {
            let header = ip.header();
            tcp.calc_checksum_ipv6(header.source(), header.destination()).expect("length fits")
        }
        None => panic!("etherparse finds no ip header"),
    };
    assert_eq!(tcp.checksum(), expected, "tcp checksum of {packet:02x?}");
}

/// Sets the correct IPv4 header and TCP checksums of `packet` (built with
/// etherparse's arithmetic, not ours), so tests can craft inputs freely.
pub fn fix_checksums(packet: &mut [u8]) {
    let (tcp_offset, tcp_csum) = {
        let sliced = SlicedPacket::from_ip(packet).expect("slice");
        let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else { panic!("no tcp") };
        let offset = tcp.slice().as_ptr() as usize - packet.as_ptr() as usize;
        let csum = match &sliced.net {
            Some(NetSlice::Ipv4(ip)) => {
                let h = ip.header();
                tcp.calc_checksum_ipv4(h.source(), h.destination()).expect("fits")
            }
            Some(NetSlice::Ipv6(ip)) => {
                let h = ip.header();
                tcp.calc_checksum_ipv6(h.source(), h.destination()).expect("fits")
            }
            None => panic!("no ip"),
        };
        (offset, csum)
    };
    packet[tcp_offset + 16..tcp_offset + 18].copy_from_slice(&tcp_csum.to_be_bytes());
    if packet[0] >> 4 == 4 {
        let header = etherparse::Ipv4HeaderSlice::from_slice(packet).expect("ipv4").to_header();
        let csum = header.calc_header_checksum();
        packet[10..12].copy_from_slice(&csum.to_be_bytes());
    }
}

/// An IPv4 or IPv6 UDP datagram from `src` to `dst`, built by etherparse.
pub fn datagram(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let builder = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("one family"),
    }
    .udp(src.port(), dst.port());
    let mut out = Vec::new();
    builder.write(&mut out, payload).expect("build");
    out
}

/// The UDP checksum etherparse computes for `packet`, and the one it carries
/// (and the IPv4 header checksum checked on the way).
pub fn oracle(packet: &[u8]) -> (u16, u16) {
    let sliced = SlicedPacket::from_ip(packet).expect("slice");
    let Some(TransportSlice::Udp(udp)) = sliced.transport else { panic!("no udp") };
    let expected = match sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
            udp.to_header().calc_checksum_ipv4_raw(h.source(), h.destination(), udp.payload())
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            udp.to_header().calc_checksum_ipv6_raw(h.source(), h.destination(), udp.payload())
        }
        None => panic!("no ip"),
    };
    (udp.checksum(), expected.expect("length fits"))
}
