//! UDP: the view and endpoint rewriting, with etherparse as the checksum oracle.

use std::net::SocketAddr;

use proptest::prelude::*;
use toa_core::{Error, Layer, UdpPacket, rewrite_endpoints};

mod common;
use common::{datagram, oracle};

fn v4() -> impl Strategy<Value = SocketAddr> {
    (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((a, p)))
}

fn v6() -> impl Strategy<Value = SocketAddr> {
    (any::<[u8; 16]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((a, p)))
}

fn pair() -> impl Strategy<Value = [SocketAddr; 4]> {
    prop_oneof![[v4(), v4(), v4(), v4()], [v6(), v6(), v6(), v6()]]
}

proptest! {
    #[test]
    fn rewritten_datagrams_keep_checksums_valid(
        [src, dst, new_src, new_dst] in pair(),
        payload in prop::collection::vec(any::<u8>(), 0..1472),
    ) {
        let mut packet = datagram(src, dst, &payload);
        let len = packet.len();
        rewrite_endpoints(&mut packet, len, new_src, new_dst).unwrap();
        let view = UdpPacket::new_checked(&packet[..]).unwrap();
        prop_assert_eq!(view.src(), new_src);
        prop_assert_eq!(view.dst(), new_dst);
        prop_assert_eq!(view.payload(), &payload[..]);
        prop_assert!(view.checksums_valid());
        let (carried, expected) = oracle(&packet);
        // etherparse writes 0xffff for a computed 0, as RFC 768 asks; so do we.
        prop_assert_eq!(carried, expected);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..120)) {
        if let Ok(view) = UdpPacket::new_checked(&bytes[..]) {
            let _ = (view.src(), view.dst(), view.payload().len(), view.checksums_valid());
        }
        let mut buf = bytes.clone();
        let len = buf.len();
        let _ = rewrite_endpoints(&mut buf, len, "192.0.2.1:1".parse().unwrap(), "192.0.2.2:2".parse().unwrap());
    }
}

#[test]
fn ipv4_without_checksum_stays_without() {
    let mut packet = datagram("203.0.113.7:4000".parse().unwrap(), "203.0.113.10:53".parse().unwrap(), b"q");
    packet[26..28].copy_from_slice(&[0, 0]);
    let len = packet.len();
    rewrite_endpoints(
        &mut packet,
        len,
        "100.125.1.1:2000".parse().unwrap(),
        "100.125.2.1:53".parse().unwrap(),
    )
    .unwrap();
    assert_eq!(&packet[26..28], &[0, 0]);
    assert!(UdpPacket::new_checked(&packet[..]).unwrap().checksums_valid());
}

#[test]
fn malformed_datagrams_are_typed_errors() {
    let good = datagram("203.0.113.7:4000".parse().unwrap(), "203.0.113.10:53".parse().unwrap(), b"query");
    let mut short_len = good.clone();
    short_len[24..26].copy_from_slice(&7u16.to_be_bytes());
    assert_eq!(
        UdpPacket::new_checked(&short_len[..]).unwrap_err(),
        Error::UdpLength { offset: 20, declared: 7, available: 13 }
    );
    let mut long_len = good.clone();
    long_len[24..26].copy_from_slice(&14u16.to_be_bytes());
    assert_eq!(
        UdpPacket::new_checked(&long_len[..]).unwrap_err(),
        Error::UdpLength { offset: 20, declared: 14, available: 13 }
    );
    let mut cut = good[..24].to_vec();
    cut[2..4].copy_from_slice(&24u16.to_be_bytes());
    assert_eq!(
        UdpPacket::new_checked(&cut[..]).unwrap_err(),
        Error::Truncated { layer: Layer::Udp, offset: 20, need: 8, available: 4 }
    );
    let mut tcp = good.clone();
    tcp[9] = 6;
    assert_eq!(UdpPacket::new_checked(&tcp[..]).unwrap_err(), Error::NotUdp { protocol: 6, offset: 20 });
    let mut icmp = good;
    icmp[9] = 1;
    let len = icmp.len();
    let err =
        rewrite_endpoints(&mut icmp, len, "192.0.2.1:1".parse().unwrap(), "192.0.2.2:2".parse().unwrap());
    assert_eq!(err.unwrap_err(), Error::NotTcp { protocol: 1, offset: 20 });
}
