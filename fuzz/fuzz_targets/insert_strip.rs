//! insert then strip on arbitrary packets: no panic, the TOA is found where it
//! was put, checksum validity is preserved, and strip undoes insert.
#![no_main]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use toa_core::{Error, Format, Formats, TcpPacket, Toa, insert, strip};

fn toa_from(selector: u8, seed: &[u8; 16]) -> Toa {
    let v4 = IpAddr::V4(Ipv4Addr::new(seed[0], seed[1], seed[2], seed[3]));
    let v6 = IpAddr::V6(Ipv6Addr::from(*seed));
    let port = u16::from_be_bytes([seed[4], seed[5]]);
    let made = match selector % 6 {
        0 => Toa::new(Format::Toa, SocketAddr::new(v4, port)),
        1 => Toa::new(Format::Toa6, SocketAddr::new(v6, port)),
        2 => Toa::new(Format::AliV6, SocketAddr::new(v6, port)),
        3 => Toa::new(Format::Tencent, SocketAddr::new(v4, port)),
        4 => Ok(Toa::ali_cdn(seed[6], v4)),
        _ => Ok(Toa::ali_cdn(seed[6], v6)),
    };
    made.expect("the family matches the format")
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let (head, packet) = data.split_at(17);
    let seed: [u8; 16] = head[1..17].try_into().expect("16 bytes");
    let toa = toa_from(head[0], &seed);
    let formats = Formats::ALL;

    let mut buf = packet.to_vec();
    buf.resize(packet.len() + 64, 0);
    let original = TcpPacket::new_checked(packet).ok();
    match insert(&mut buf, packet.len(), &toa, &formats) {
        Ok(len) => {
            let original = original.expect("insert accepted the packet, so it parses");
            let edited = TcpPacket::new_checked(&buf[..len]).expect("insert emits a valid packet");
            assert_eq!(original.checksums_valid(), edited.checksums_valid());
            // The inserted TOA comes first (a malformed one the client sent may follow).
            let found = edited.toas(&formats).next().expect("a toa").expect("well formed");
            assert_eq!(found.toa, toa);
            assert_eq!(found.offset, edited.tcp_offset() + 20);
            assert_eq!(edited.tcp().payload(), original.tcp().payload());

            let had_toa = original.toas(&formats).next().is_some()
                || original.tcp().options().any(|o| o.is_ok_and(|o| matches!(o.kind, 201 | 202)));
            let reclaimed = original.tcp().header_len() + toa.wire_len().next_multiple_of(4) > 60;
            let stripped = strip(&mut buf, len, &formats).expect("strip accepts what insert made");
            assert!(stripped.removed >= 1);
            let after = TcpPacket::new_checked(&buf[..stripped.len]).expect("strip emits a valid packet");
            assert_eq!(after.toas(&formats).count(), 0);
            assert_eq!(original.checksums_valid(), after.checksums_valid());
            if !had_toa && !reclaimed {
                // Byte for byte, except that a checksum field of 0xffff (one's-complement -0,
                // which no real sender computes) may come back as its equal, 0x0000.
                let mut expected = packet[..original.len()].to_vec();
                let v4 = matches!(original.version(), toa_core::IpVersion::V4);
                let fields = [Some(original.tcp_offset() + 16), v4.then_some(10)];
                for csum in fields.into_iter().flatten() {
                    if expected[csum..csum + 2] == [0xff, 0xff] {
                        expected[csum..csum + 2].copy_from_slice(&[0, 0]);
                    }
                }
                assert_eq!(&buf[..stripped.len], &expected[..], "strip undoes insert");
            }
        }
        Err(Error::NoRoom { .. }) => assert_eq!(&buf[..packet.len()], packet, "left intact"),
        Err(err) => {
            black_box(err);
            assert_eq!(&buf[..packet.len()], packet, "left intact");
        }
    }
});
