//! Property tests: round trips, checksums checked by an independent
//! implementation (etherparse), and no panics on arbitrary input.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use common::{assert_checksums_valid, fix_checksums};
use proptest::prelude::*;
use toa_core::{Error, Format, Formats, Options, TcpPacket, Toa, clamp_mss, insert, kind, strip};

fn ip_v4() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from_bits)
}

fn ip_v6() -> impl Strategy<Value = Ipv6Addr> {
    any::<u128>().prop_map(Ipv6Addr::from_bits)
}

fn sock_v4() -> impl Strategy<Value = SocketAddr> {
    (ip_v4(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(ip), port))
}

fn sock_v6() -> impl Strategy<Value = SocketAddr> {
    (ip_v6(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(ip), port))
}

/// Any TOA of any format.
fn toa() -> impl Strategy<Value = Toa> {
    prop_oneof![
        sock_v4().prop_map(|a| Toa::new(Format::Toa, a).unwrap()),
        sock_v4().prop_map(|a| Toa::new(Format::Tencent, a).unwrap()),
        sock_v6().prop_map(|a| Toa::new(Format::Toa6, a).unwrap()),
        sock_v6().prop_map(|a| Toa::new(Format::AliV6, a).unwrap()),
        (any::<u8>(), ip_v4()).prop_map(|(v, ip)| Toa::ali_cdn(v, IpAddr::V4(ip))),
        (any::<u8>(), ip_v6()).prop_map(|(v, ip)| Toa::ali_cdn(v, IpAddr::V6(ip))),
    ]
}

/// One well-formed, non-TOA option.
fn plain_option() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(vec![kind::NOP]),
        any::<u16>().prop_map(|mss| {
            let [a, b] = mss.to_be_bytes();
            vec![2, 4, a, b]
        }),
        (0u8..15).prop_map(|ws| vec![3, 3, ws]),
        Just(vec![4, 2]),
        any::<[u8; 8]>().prop_map(|ts| {
            let mut o = vec![8, 10];
            o.extend(ts);
            o
        }),
        // RFC 5482 User Timeout: kind 28, length 4, which ali-cdn must leave alone.
        any::<u16>().prop_map(|t| {
            let [a, b] = t.to_be_bytes();
            vec![28, 4, a, b]
        }),
        // Some other kind with a body.
        (prop_oneof![5u8..=27, 30u8..=199], prop::collection::vec(any::<u8>(), 0..8)).prop_map(
            |(k, body)| {
                let mut o = vec![k, body.len() as u8 + 2];
                o.extend(body);
                o
            }
        ),
    ]
}

/// An options area of at most 40 bytes, padded to a multiple of 4.
fn options_area() -> impl Strategy<Value = Vec<u8>> {
    (prop::collection::vec(plain_option(), 0..8), any::<bool>()).prop_map(|(opts, eol_pad)| {
        let mut area = Vec::new();
        for o in opts {
            if area.len() + o.len() <= 40 {
                area.extend(o);
            }
        }
        while area.len() % 4 != 0 {
            area.push(if eol_pad { kind::EOL } else { kind::NOP });
        }
        area
    })
}

#[derive(Debug, Clone)]
struct Shape {
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    ip_options: usize,
    options: Vec<u8>,
    flags: u8,
    payload: Vec<u8>,
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        any::<bool>(),
        any::<[u8; 16]>(),
        any::<[u8; 16]>(),
        0usize..3,
        options_area(),
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..1500),
    )
        .prop_map(|(v6, src, dst, ip_options, options, flags, payload)| Shape {
            v6,
            src,
            dst,
            ip_options,
            options,
            flags,
            payload,
        })
}

/// Builds a valid IPv4 (with `ip_options` words of IP options) or IPv6 (with
/// `ip_options` 8-byte destination-options headers) TCP packet.
fn build(s: &Shape) -> Vec<u8> {
    let tcp_len = 20 + s.options.len() + s.payload.len();
    let mut p = Vec::new();
    if s.v6 {
        let ext = 8 * s.ip_options;
        p.extend_from_slice(&[0x60, 0, 0, 0]);
        p.extend_from_slice(&((ext + tcp_len) as u16).to_be_bytes());
        p.push(if s.ip_options > 0 { 60 } else { 6 });
        p.push(64);
        p.extend_from_slice(&s.src);
        p.extend_from_slice(&s.dst);
        for i in 0..s.ip_options {
            let next = if i + 1 == s.ip_options { 6 } else { 60 };
            p.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
        }
    } else {
        let ihl = 5 + s.ip_options;
        p.push(0x40 | ihl as u8);
        p.push(0);
        p.extend_from_slice(&((ihl * 4 + tcp_len) as u16).to_be_bytes());
        p.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
        p.extend_from_slice(&s.src[..4]);
        p.extend_from_slice(&s.dst[..4]);
        p.extend(std::iter::repeat_n(1u8, s.ip_options * 4)); // IP NOP options
    }
    p.extend_from_slice(&[0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0]);
    p.push((((20 + s.options.len()) / 4) as u8) << 4);
    p.push(s.flags);
    p.extend_from_slice(&[0xfa, 0xf0, 0, 0, 0, 0]);
    p.extend_from_slice(&s.options);
    p.extend_from_slice(&s.payload);
    fix_checksums(&mut p);
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn emit_parse_round_trip(toa in toa(), kind in 2u8..=255) {
        let formats = Formats::NONE.with(toa.format()).with_kind(toa.format(), kind);
        let mut out = [0u8; 20];
        let len = toa.emit(kind, &mut out).unwrap();
        prop_assert_eq!(len, toa.wire_len());
        let found = Options::new(&out[..len], 0).first_toa(&formats).unwrap().unwrap();
        prop_assert_eq!(found.toa, toa);
        prop_assert_eq!(found.offset, 0);
    }

    #[test]
    fn insert_strip_round_trip(shape in shape(), toa in toa()) {
        let packet = build(&shape);
        assert_checksums_valid(&packet);
        let formats = Formats::ALL;
        let mut buf = packet.clone();
        buf.resize(packet.len() + 64, 0);
        let reclaim = 20 + shape.options.len() + toa.wire_len().next_multiple_of(4) > 60;
        match insert(&mut buf, packet.len(), &toa, &formats) {
            Ok(len) => {
                assert_checksums_valid(&buf[..len]);
                let view = TcpPacket::new_checked(&buf[..len]).unwrap();
                let found = view.toa(&formats).unwrap().unwrap();
                prop_assert_eq!(found.toa, toa);
                prop_assert_eq!(found.offset, view.tcp_offset() + 20);
                let tcp = view.tcp();
                prop_assert_eq!(tcp.payload(), &shape.payload[..]);
                let stripped = strip(&mut buf, len, &formats).unwrap();
                prop_assert_eq!(stripped.removed, 1);
                assert_checksums_valid(&buf[..stripped.len]);
                if !reclaim {
                    prop_assert_eq!(&buf[..stripped.len], &packet[..]);
                }
            }
            Err(Error::NoRoom { need, available }) => {
                prop_assert!(reclaim);
                prop_assert!(need > available);
                prop_assert_eq!(&buf[..packet.len()], &packet[..], "left intact");
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn strip_removes_every_toa(shape in shape(), toas in prop::collection::vec(toa(), 1..3)) {
        let mut packet = build(&shape);
        packet.resize(packet.len() + 64, 0);
        let mut len = packet.len() - 64;
        for toa in &toas {
            if let Ok(n) = insert(&mut packet, len, toa, &Formats::ALL) {
                len = n;
            }
        }
        let stripped = strip(&mut packet, len, &Formats::ALL).unwrap();
        assert_checksums_valid(&packet[..stripped.len]);
        let view = TcpPacket::new_checked(&packet[..stripped.len]).unwrap();
        prop_assert_eq!(view.toas(&Formats::ALL).count(), 0);
        let tcp = view.tcp();
        prop_assert_eq!(tcp.payload(), &shape.payload[..]);
        prop_assert_eq!(tcp.header_len() % 4, 0);
    }

    #[test]
    fn clamp_keeps_checksums_valid(shape in shape(), by in any::<u16>()) {
        let mut packet = build(&shape);
        let len = packet.len();
        match clamp_mss(&mut packet, len, by).unwrap() {
            Some(clamp) => {
                prop_assert!(clamp.new <= clamp.old);
                prop_assert!(clamp.new >= toa_core::MIN_MSS.min(clamp.old));
            }
            None => prop_assert_eq!(&packet, &build(&shape)),
        }
        assert_checksums_valid(&packet);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        exercise(&bytes);
    }

    #[test]
    fn mutated_packets_never_panic(
        shape in shape(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut packet = build(&shape);
        for (at, byte) in flips {
            let i = at.index(packet.len());
            packet[i] = byte;
        }
        let end = cut.index(packet.len() + 1);
        exercise(&packet[..end.max(packet.len().min(end + 40))]);
    }
}

/// Runs every packet-facing function on `bytes`; only panics fail.
fn exercise(bytes: &[u8]) {
    if let Ok(packet) = TcpPacket::new_checked(bytes) {
        let _ = packet.toa(&Formats::ALL);
        let _ = packet.toas(&Formats::ALL).count();
        let _ = packet.tcp().tencent_meta();
        let _ = packet.checksums_valid();
    }
    let _ = Options::new(bytes, 0).first_toa(&Formats::ALL);
    let toa = Toa::new(Format::Toa6, "[2001:db8::1]:1".parse().unwrap()).unwrap();
    let mut buf = bytes.to_vec();
    buf.resize(bytes.len() + 64, 0);
    let _ = insert(&mut buf, bytes.len(), &toa, &Formats::ALL);
    let mut buf = bytes.to_vec();
    let _ = strip(&mut buf, bytes.len(), &Formats::ALL);
    let _ = clamp_mss(&mut buf, bytes.len(), 20);
    // A length beyond the buffer is an error too, not a panic.
    let _ = insert(&mut buf, bytes.len() + 1, &toa, &Formats::ALL);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn rewritten_endpoints_keep_checksums_valid(shape in shape(), a in any::<[u8; 16]>(), b in any::<[u8; 16]>(), p in any::<(u16, u16)>()) {
        let mut packet = build(&shape);
        let len = packet.len();
        let (src, dst) = if shape.v6 {
            (SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), p.0), SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), p.1))
        } else {
            let (a4, b4) = ([a[0], a[1], a[2], a[3]], [b[0], b[1], b[2], b[3]]);
            (SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a4)), p.0), SocketAddr::new(IpAddr::V4(Ipv4Addr::from(b4)), p.1))
        };
        toa_core::rewrite_endpoints(&mut packet, len, src, dst).unwrap();
        assert_checksums_valid(&packet);
        let view = TcpPacket::new_checked(&packet[..]).unwrap();
        prop_assert_eq!((view.src(), view.dst()), (src, dst));
        // The other family is refused and leaves the packet alone.
        let other: SocketAddr = if shape.v6 { "192.0.2.1:1".parse().unwrap() } else { "[2001:db8::1]:1".parse().unwrap() };
        let before = packet.clone();
        prop_assert!(toa_core::rewrite_endpoints(&mut packet, len, other, dst).is_err());
        prop_assert_eq!(packet, before);
    }
}
