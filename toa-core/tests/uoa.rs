//! UOA (`ipo` and `opp`) with etherparse as the oracle: after an insert the
//! IP header parses and its checksum is right, the UOA reads back; after a
//! strip the datagram is byte for byte what it was, and its UDP checksum
//! still verifies. Arbitrary bytes never panic, and errors leave the buffer alone.

use std::net::SocketAddr;

use etherparse::Ipv4HeaderSlice;
use proptest::prelude::*;
use toa_core::uoa::{UoaFormat, find_uoa, insert_uoa, strip_uoa, uoa_carrier};
use toa_core::{Error, checksum};

mod common;
use common::{datagram, oracle};

/// Adds `options` (a multiple of 4 bytes) to an IPv4 datagram's header.
fn with_ip_options(packet: &[u8], options: &[u8]) -> Vec<u8> {
    let mut out = packet[..20].to_vec();
    out.extend_from_slice(options);
    out.extend_from_slice(&packet[20..]);
    out[0] = 0x40 | ((20 + options.len()) / 4) as u8;
    let total = out.len() as u16;
    out[2..4].copy_from_slice(&total.to_be_bytes());
    out[10..12].copy_from_slice(&[0, 0]);
    let sum = checksum::compute(&out[..20 + options.len()]);
    out[10..12].copy_from_slice(&sum.to_be_bytes());
    out
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((a, p))),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((a, p))),
    ]
}

fn endpoints() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<[u8; 4]>(), any::<u16>(), any::<u16>())
            .prop_map(|(a, b, p, q)| (SocketAddr::from((a, p)), SocketAddr::from((b, q)))),
        (any::<[u8; 16]>(), any::<[u8; 16]>(), any::<u16>(), any::<u16>())
            .prop_map(|(a, b, p, q)| (SocketAddr::from((a, p)), SocketAddr::from((b, q)))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn insert_find_strip_round_trip(
        (src, dst) in endpoints(),
        client in addr(),
        payload in prop::collection::vec(any::<u8>(), 0..1400),
        nops in 0usize..=9,
        opp in any::<bool>(),
    ) {
        let mut original = datagram(src, dst, &payload);
        if src.is_ipv4() && nops > 0 {
            original = with_ip_options(&original, &vec![1u8; nops * 4]);
        }
        let format = if opp { UoaFormat::Opp } else { UoaFormat::Ipo };
        let mut buf = original.clone();
        buf.resize(original.len() + 64, 0);
        let result = insert_uoa(&mut buf, original.len(), client, format);
        let option = if client.is_ipv4() { 8 } else { 20 };
        match result {
            Ok(len) => {
                prop_assert_eq!(len, original.len() + option + if opp { 4 } else { 0 });
                if src.is_ipv4() {
                    let ip = Ipv4HeaderSlice::from_slice(&buf[..len]).expect("etherparse parses the header");
                    prop_assert_eq!(ip.total_len() as usize, len);
                    prop_assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum());
                    prop_assert_eq!(ip.protocol().0, if opp { 248 } else { 17 });
                }
                let found = find_uoa(&buf[..len]).unwrap().expect("the UOA reads back");
                prop_assert_eq!((found.client, found.format), (client, format));
                let (back, removed) = strip_uoa(&mut buf, len).unwrap();
                prop_assert_eq!(removed.map(|f| f.client), Some(client));
                prop_assert_eq!(&buf[..back], &original[..]);
                let (carried, expected) = oracle(&buf[..back]);
                prop_assert_eq!(carried, expected);
            }
            Err(e) => {
                // Only these refusals exist for a valid datagram, and they change nothing.
                let ipo_v6 = !opp && src.is_ipv6();
                let full = !opp && src.is_ipv4() && nops * 4 + option > 40;
                prop_assert!(ipo_v6 || full, "{e} for {src} ipo={} nops={nops}", !opp);
                let expected_kind = matches!(e, Error::NotSupported { .. } | Error::IpOptionsFull { .. });
                prop_assert!(expected_kind, "unexpected error {}", e);
                prop_assert_eq!(&buf[..original.len()], &original[..]);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..200), client in addr(), opp in any::<bool>()) {
        let len = bytes.len();
        let _ = find_uoa(&bytes);
        let before = bytes.clone();
        match strip_uoa(&mut bytes, len) {
            Ok((n, None)) => prop_assert!(n < len || (n == len && bytes == before)),
            Ok((n, Some(_))) => prop_assert!(n < len),
            Err(_) => prop_assert_eq!(&bytes, &before),
        }
        bytes.resize(len + 64, 0);
        let before = bytes.clone();
        let format = if opp { UoaFormat::Opp } else { UoaFormat::Ipo };
        if insert_uoa(&mut bytes, len, client, format).is_err() {
            prop_assert_eq!(&bytes, &before);
        }
    }

    /// Flipping bytes of a packet with a UOA: never a panic, and what is
    /// found still names a client of the right family for its option length.
    #[test]
    fn mutated_uoa_packets(
        (src, dst) in endpoints(),
        client in addr(),
        flips in prop::collection::vec((0usize..80, any::<u8>()), 1..4),
        opp in any::<bool>(),
    ) {
        let original = datagram(src, dst, b"ping");
        let mut buf = original.clone();
        buf.resize(original.len() + 64, 0);
        let format = if opp || src.is_ipv6() { UoaFormat::Opp } else { UoaFormat::Ipo };
        let len = insert_uoa(&mut buf, original.len(), client, format).unwrap();
        for (at, byte) in flips {
            buf[at % len] = byte;
        }
        if let Ok(Some(found)) = find_uoa(&buf[..len]) {
            let option_len = buf[found.offset + 1];
            prop_assert_eq!(found.client.is_ipv4(), option_len == 8);
        }
        let _ = strip_uoa(&mut buf, len);
    }

    /// The empty carrier of any datagram: the same flow (addresses, ports),
    /// no payload, IP and UDP checksums right (etherparse), the UOA on it;
    /// stripped, a plain empty UDP datagram of that flow.
    #[test]
    fn carriers_are_empty_datagrams_of_the_flow(
        (src, dst) in endpoints(),
        client in addr(),
        payload in prop::collection::vec(any::<u8>(), 0..1400),
        nops in 0usize..=10,
        opp in any::<bool>(),
    ) {
        let mut original = datagram(src, dst, &payload);
        if src.is_ipv4() && nops > 0 {
            original = with_ip_options(&original, &vec![1u8; nops * 4]); // no room left for ipo at 10
        }
        let format = if opp || src.is_ipv6() { UoaFormat::Opp } else { UoaFormat::Ipo };
        let mut out = [0u8; 128];
        let len = uoa_carrier(&original, client, format, &mut out).expect("a carrier");
        let found = find_uoa(&out[..len]).unwrap().expect("the UOA is on it");
        prop_assert_eq!((found.client, found.format), (client, format));
        let (plain, _) = strip_uoa(&mut out, len).unwrap();
        prop_assert_eq!(plain, if src.is_ipv4() { 28 } else { 48 });
        let udp = toa_core::UdpPacket::new_checked(&out[..plain]).expect("UDP");
        prop_assert_eq!((udp.src(), udp.dst(), udp.payload().len()), (src, dst, 0));
        let (carried, expected) = oracle(&out[..plain]);
        prop_assert_eq!(carried, expected);
        // Too small a buffer is an error, not a panic.
        prop_assert!(uoa_carrier(&original, client, format, &mut out[..40]).is_err());
    }
}
