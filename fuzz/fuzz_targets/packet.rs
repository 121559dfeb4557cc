//! Packet parsing and every read-only accessor on arbitrary bytes.
#![no_main]

use std::hint::black_box;

use libfuzzer_sys::fuzz_target;
use toa_core::{Formats, TcpPacket, clamp_mss};

fuzz_target!(|data: &[u8]| {
    match TcpPacket::new_checked(data) {
        Ok(packet) => {
            assert!(packet.len() <= data.len());
            assert!(packet.tcp_offset() + 20 <= packet.len());
            black_box((packet.src(), packet.dst(), packet.checksums_valid()));
            let tcp = packet.tcp();
            black_box((tcp.flags(), tcp.seq_number(), tcp.ack_number(), tcp.window(), tcp.payload()));
            let _ = black_box(packet.toa(&Formats::ALL));
            let _ = black_box(packet.toas(&Formats::ALL).count());
            let _ = black_box(tcp.tencent_meta());
        }
        Err(err) => {
            black_box(err.to_string());
            black_box(err.offset());
        }
    }
    let mut buf = data.to_vec();
    if let Ok(Some(clamp)) = clamp_mss(&mut buf, data.len(), 40) {
        assert!(clamp.new <= clamp.old);
        let before = TcpPacket::new_checked(data).map(|p| p.checksums_valid());
        let after = TcpPacket::new_checked(&buf[..]).map(|p| p.checksums_valid());
        assert_eq!(before, after, "clamp_mss keeps a valid checksum valid and a bad one bad");
    }
});
