//! UOA (`ipo`, `opp`) on arbitrary bytes: find, strip and insert never panic;
//! an error leaves the buffer as it was; what is inserted reads back and
//! strips off to the bytes it was put into; a carrier built from any
//! datagram carries the client on an empty datagram.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use toa_core::uoa::{UoaFormat, find_uoa, insert_uoa, strip_uoa, uoa_carrier};

fuzz_target!(|data: &[u8]| {
    // First byte: format and client family; next 18: the client.
    let Some((&mode, rest)) = data.split_first() else { return };
    let (client_bytes, packet) = rest.split_at(rest.len().min(18));
    let mut a = [0u8; 18];
    a[..client_bytes.len()].copy_from_slice(client_bytes);
    let port = u16::from_be_bytes([a[16], a[17]]);
    let client = if mode & 1 == 0 {
        SocketAddr::new(IpAddr::from([a[0], a[1], a[2], a[3]]), port)
    } else {
        let mut v6 = [0u8; 16];
        v6.copy_from_slice(&a[..16]);
        SocketAddr::new(IpAddr::from(v6), port)
    };
    let format = if mode & 2 == 0 { UoaFormat::Ipo } else { UoaFormat::Opp };

    let _ = find_uoa(packet);
    let mut buf = packet.to_vec();
    let len = buf.len();
    match strip_uoa(&mut buf, len) {
        // (An opp header without a UOA option is removed as well.)
        Ok((n, None)) => assert!(n < len || (n == len && buf == packet)),
        Ok((n, Some(_))) => assert!(n < len),
        Err(_) => assert_eq!(buf, packet),
    }

    let mut buf = packet.to_vec();
    buf.resize(len + 64, 0);
    let before = buf.clone();
    match insert_uoa(&mut buf, len, client, format) {
        Ok(n) => {
            let found = find_uoa(&buf[..n]).expect("what was inserted parses").expect("and is found");
            assert_eq!((found.client, found.format), (client, format));
            let (back, _) = strip_uoa(&mut buf, n).expect("and strips");
            // The IPv4 header checksum is recomputed: compare past it.
            let skip = if packet[0] >> 4 == 4 { 12 } else { 0 };
            assert_eq!(&buf[skip..back], &packet[skip..back.min(packet.len())]);
        }
        Err(_) => assert_eq!(buf, before),
    }

    let mut carrier = [0u8; 128];
    if let Ok(n) = uoa_carrier(packet, client, format, &mut carrier) {
        let found = find_uoa(&carrier[..n]).expect("the carrier parses").expect("and carries the UOA");
        assert_eq!(found.client, client);
        let (plain, _) = strip_uoa(&mut carrier, n).expect("and strips");
        let udp = toa_core::UdpPacket::new_checked(&carrier[..plain]).expect("to a UDP datagram");
        assert!(udp.payload().is_empty());
    }
});
