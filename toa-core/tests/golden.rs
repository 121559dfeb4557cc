//! Golden byte vectors: every TOA format in an IPv4 and an IPv6 SYN, written
//! out field by field, and the malformed cases as a table.
//!
//! Each `*_IN_*` packet is what `insert` must produce from `SYN_V4`/`SYN_V6`;
//! `strip` must turn it back into the SYN; and etherparse, an independent
//! implementation, must find its checksums valid.

mod common;

use common::{assert_checksums_valid, fix_checksums};
use toa_core::{Error, Format, Formats, Layer, MssClamp, TcpFlags, TcpPacket, Toa, clamp_mss, insert, strip};

/// A Linux IPv4 SYN from the LB to a backend, without TOA.
const SYN_V4: [u8; 60] = [
    // IPv4: version 4, IHL 5, total length 60, id, DF, TTL 64, TCP, header checksum
    0x45, 0x00, 0x00, 0x3c, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0xf7, 0xed,
    // 100.125.0.1 (the LB's SNAT address) -> 192.0.2.10 (the backend)
    0x64, 0x7d, 0x00, 0x01, 0xc0, 0x00, 0x02, 0x0a,
    // TCP: 40000 -> 80, seq 1000, ack 0, data offset 10 words, SYN, window 64240
    0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xfa, 0xf0,
    // TCP checksum 0xa3cc, urgent pointer 0
    0xa3, 0xcc, 0x00, 0x00, // MSS, SACK permitted, timestamps, NOP, window scale 7 (a Linux SYN)
    0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0xe2, 0x40, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x03, 0x03, 0x07,
];

/// A Linux IPv6 SYN from the LB to a backend, without TOA.
const SYN_V6: [u8; 80] = [
    // IPv6: version 6, payload length 40, next header TCP, hop limit 64
    0x60, 0x00, 0x00, 0x00, 0x00, 0x28, 0x06, 0x40,
    // 2001:db8:64::1 (the LB) -> 2001:db8:be::a (the backend)
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x20,
    0x01, 0x0d, 0xb8, 0x00, 0xbe, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a,
    // TCP: 40000 -> 80, seq 1000, ack 0, data offset 10 words, SYN, window 64240
    0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xfa, 0xf0,
    // TCP checksum 0x6dca, urgent pointer 0
    0x6d, 0xca, 0x00, 0x00, // MSS, SACK permitted, timestamps, NOP, window scale 7 (a Linux SYN)
    0x02, 0x04, 0x05, 0xa0, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0xe2, 0x40, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x03, 0x03, 0x07,
];

/// `toa` inserted into the IPv4 SYN.
const TOA_IN_V4: [u8; 68] = [
    // IPv4: version 4, IHL 5, total length 68, id, DF, TTL 64, TCP, header checksum
    0x45, 0x00, 0x00, 0x44, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0xf7, 0xe5,
    // 100.125.0.1 (the LB's SNAT address) -> 192.0.2.10 (the backend)
    0x64, 0x7d, 0x00, 0x01, 0xc0, 0x00, 0x02, 0x0a,
    // TCP: 40000 -> 80, seq 1000, ack 0, data offset 12 words, SYN, window 64240
    0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xc0, 0x02, 0xfa, 0xf0,
    // TCP checksum 0xad72, urgent pointer 0
    0xad, 0x72, 0x00, 0x00, // kind 254, length 8: port 40000, 203.0.113.7
    0xfe, 0x08, 0x9c, 0x40, 0xcb, 0x00, 0x71, 0x07,
    // MSS, SACK permitted, timestamps, NOP, window scale 7 (a Linux SYN)
    0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0xe2, 0x40, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x03, 0x03, 0x07,
];

/// `toa` inserted into the IPv6 SYN.
const TOA_IN_V6: [u8; 88] = [
    // IPv6: version 6, payload length 48, next header TCP, hop limit 64
    0x60, 0x00, 0x00, 0x00, 0x00, 0x30, 0x06, 0x40,
    // 2001:db8:64::1 (the LB) -> 2001:db8:be::a (the backend)
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x20,
    0x01, 0x0d, 0xb8, 0x00, 0xbe, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a,
    // TCP: 40000 -> 80, seq 1000, ack 0, data offset 12 words, SYN, window 64240
    0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xc0, 0x02, 0xfa, 0xf0,
    // TCP checksum 0x7770, urgent pointer 0
    0x77, 0x70, 0x00, 0x00, // kind 254, length 8: port 40000, 203.0.113.7
    0xfe, 0x08, 0x9c, 0x40, 0xcb, 0x00, 0x71, 0x07,
    // MSS, SACK permitted, timestamps, NOP, window scale 7 (a Linux SYN)
    0x02, 0x04, 0x05, 0xa0, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0xe2, 0x40, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x03, 0x03, 0x07,
];

/// `toa6` inserted into the IPv4 SYN.
const TOA6_IN_V4: [u8; 80] = [
    // IPv4: version 4, IHL 5, total length 80, id, DF, TTL 64, TCP, header checksum
    0x45, 0x00, 0x00, 0x50, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0xf7, 0xd9,
    // 100.125.0.1 (the LB's SNAT address) -> 192.0.2.10 (the backend)
    0x64, 0x7d, 0x00, 0x01, 0xc0, 0x00, 0x02, 0x0a,
    // TCP: 40000 -> 80, seq 1000, ack 0, data offset 15 words, SYN, window 64240
    0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xf0, 0x02, 0xfa, 0xf0,
    // TCP checksum 0x8ba2, urgent pointer 0
    0x8b, 0xa2, 0x00, 0x00, // kind 254, length 20: port 40000, 2001:db8::7
    0xfe, 0x14, 0x9c, 0x40, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x07, // MSS, SACK permitted, timestamps, NOP, window scale 7 (a Linux SYN)
    0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0xe2, 0x40, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x03, 0x03, 0x07,
];

/// `toa6` inserted into the IPv6 SYN.
const TOA6_IN_V6: [u8; 100] = [
    // IPv6: version 6, payload length 60, next header TCP, hop limit 64
    0x60, 0x00, 0x00, 0x00, 0x00, 0x3c, 0x06, 0x40,
    // 2001:db8:64::1 (the LB) -> 2001:db8:be::a (the backend)
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x20,
    0x01, 0x0d, 0xb8, 0x00, 0xbe, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a,
    // TCP: 40000 -> 80, seq 1000, ack 0, data offset 15 words, SYN, window 64240
    0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xf0, 0x02, 0xfa, 0xf0,
    // TCP checksum 0x55a0, urgent pointer 0
    0x55, 0xa0, 0x00, 0x00, // kind 254, length 20: port 40000, 2001:db8::7
    0xfe, 0x14, 0x9c, 0x40, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x07, // MSS, SACK permitted, timestamps, NOP, window scale 7 (a Linux SYN)
    0x02, 0x04, 0x05, 0xa0, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0xe2, 0x40, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x03, 0x03, 0x07,
];

/// `ali-v6` inserted into the IPv4 SYN.
const ALI_V6_IN_V4: [u8; 80] = [
    // IPv4: version 4, IHL 5, total length 80, id, DF, TTL 64, TCP, header checksum
    0x45, 0x00, 0x00, 0x50, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0xf7, 0xd9,
    // 100.125.0.1 (the LB's SNAT address) -> 192.0.2.10 (the backend)
    0x64, 0x7d, 0x00, 0x01, 0xc0, 0x00, 0x02, 0x0a,
    // TCP: 40000 -> 80, seq 1000, ack 0, data offset 15 words, SYN, window 64240
    0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xf0, 0x02, 0xfa, 0xf0,
    // TCP checksum 0x8ca2, urgent pointer 0
    0x8c, 0xa2, 0x00, 0x00, // kind 253, length 20: port 40000, 2001:db8::7
    0xfd, 0x14, 0x9c, 0x40, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x07, // MSS, SACK permitted, timestamps, NOP, window scale 7 (a Linux SYN)
    0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0xe2, 0x40, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x03, 0x03, 0x07,
];

/// `ali-v6` inserted into the IPv6 SYN.
const ALI_V6_IN_V6: [u8; 100] = [
    // IPv6: version 6, payload length 60, next header TCP, hop limit 64
    0x60, 0x00, 0x00, 0x00, 0x00, 0x3c, 0x06, 0x40,
    // 2001:db8:64::1 (the LB) -> 2001:db8:be::a (the backend)
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x20,
    0x01, 0x0d, 0xb8, 0x00, 0xbe, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a,
    // TCP: 40000 -> 80, seq 1000, ack 0, data offset 15 words, SYN, window 64240
    0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xf0, 0x02, 0xfa, 0xf0,
    // TCP checksum 0x56a0, urgent pointer 0
    0x56, 0xa0, 0x00, 0x00, // kind 253, length 20: port 40000, 2001:db8::7
    0xfd, 0x14, 0x9c, 0x40, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x07, // MSS, SACK permitted, timestamps, NOP, window scale 7 (a Linux SYN)
    0x02, 0x04, 0x05, 0xa0, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0xe2, 0x40, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x03, 0x03, 0x07,
];

/// `tencent` inserted into the IPv4 SYN.
const TENCENT_IN_V4: [u8; 68] = [
    // IPv4: version 4, IHL 5, total length 68, id, DF, TTL 64, TCP, header checksum
    0x45, 0x00, 0x00, 0x44, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0xf7, 0xe5,
    // 100.125.0.1 (the LB's SNAT address) -> 192.0.2.10 (the backend)
    0x64, 0x7d, 0x00, 0x01, 0xc0, 0x00, 0x02, 0x0a,
    // TCP: 40000 -> 80, seq 1000, ack 0, data offset 12 words, SYN, window 64240
    0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xc0, 0x02, 0xfa, 0xf0,
    // TCP checksum 0xe372, urgent pointer 0
    0xe3, 0x72, 0x00, 0x00, // kind 200, length 8: port 40000, 203.0.113.7
    0xc8, 0x08, 0x9c, 0x40, 0xcb, 0x00, 0x71, 0x07,
    // MSS, SACK permitted, timestamps, NOP, window scale 7 (a Linux SYN)
    0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0xe2, 0x40, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x03, 0x03, 0x07,
];

/// `tencent` inserted into the IPv6 SYN.
const TENCENT_IN_V6: [u8; 88] = [
    // IPv6: version 6, payload length 48, next header TCP, hop limit 64
    0x60, 0x00, 0x00, 0x00, 0x00, 0x30, 0x06, 0x40,
    // 2001:db8:64::1 (the LB) -> 2001:db8:be::a (the backend)
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x20,
    0x01, 0x0d, 0xb8, 0x00, 0xbe, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a,
    // TCP: 40000 -> 80, seq 1000, ack 0, data offset 12 words, SYN, window 64240
    0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xc0, 0x02, 0xfa, 0xf0,
    // TCP checksum 0xad70, urgent pointer 0
    0xad, 0x70, 0x00, 0x00, // kind 200, length 8: port 40000, 203.0.113.7
    0xc8, 0x08, 0x9c, 0x40, 0xcb, 0x00, 0x71, 0x07,
    // MSS, SACK permitted, timestamps, NOP, window scale 7 (a Linux SYN)
    0x02, 0x04, 0x05, 0xa0, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0xe2, 0x40, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x03, 0x03, 0x07,
];

/// `cdn4` inserted into the IPv4 SYN.
const ALI_CDN4_IN_V4: [u8; 68] = [
    // IPv4: version 4, IHL 5, total length 68, id, DF, TTL 64, TCP, header checksum
    0x45, 0x00, 0x00, 0x44, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0xf7, 0xe5,
    // 100.125.0.1 (the LB's SNAT address) -> 192.0.2.10 (the backend)
    0x64, 0x7d, 0x00, 0x01, 0xc0, 0x00, 0x02, 0x0a,
    // TCP: 40000 -> 80, seq 1000, ack 0, data offset 12 words, SYN, window 64240
    0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xc0, 0x02, 0xfa, 0xf0,
    // TCP checksum 0x5e80, urgent pointer 0
    0x5e, 0x80, 0x00, 0x00, // kind 28, length 7: version 1, 203.0.113.7, then one NOP of padding
    0x1c, 0x07, 0x01, 0xcb, 0x00, 0x71, 0x07, 0x01,
    // MSS, SACK permitted, timestamps, NOP, window scale 7 (a Linux SYN)
    0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0xe2, 0x40, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x03, 0x03, 0x07,
];

/// `cdn4` inserted into the IPv6 SYN.
const ALI_CDN4_IN_V6: [u8; 88] = [
    // IPv6: version 6, payload length 48, next header TCP, hop limit 64
    0x60, 0x00, 0x00, 0x00, 0x00, 0x30, 0x06, 0x40,
    // 2001:db8:64::1 (the LB) -> 2001:db8:be::a (the backend)
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x20,
    0x01, 0x0d, 0xb8, 0x00, 0xbe, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a,
    // TCP: 40000 -> 80, seq 1000, ack 0, data offset 12 words, SYN, window 64240
    0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xc0, 0x02, 0xfa, 0xf0,
    // TCP checksum 0x287e, urgent pointer 0
    0x28, 0x7e, 0x00, 0x00, // kind 28, length 7: version 1, 203.0.113.7, then one NOP of padding
    0x1c, 0x07, 0x01, 0xcb, 0x00, 0x71, 0x07, 0x01,
    // MSS, SACK permitted, timestamps, NOP, window scale 7 (a Linux SYN)
    0x02, 0x04, 0x05, 0xa0, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0xe2, 0x40, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x03, 0x03, 0x07,
];

/// `cdn6` inserted into the IPv4 SYN.
const ALI_CDN6_IN_V4: [u8; 80] = [
    // IPv4: version 4, IHL 5, total length 80, id, DF, TTL 64, TCP, header checksum
    0x45, 0x00, 0x00, 0x50, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0xf7, 0xd9,
    // 100.125.0.1 (the LB's SNAT address) -> 192.0.2.10 (the backend)
    0x64, 0x7d, 0x00, 0x01, 0xc0, 0x00, 0x02, 0x0a,
    // TCP: 40000 -> 80, seq 1000, ack 0, data offset 15 words, SYN, window 64240
    0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xf0, 0x02, 0xfa, 0xf0,
    // TCP checksum 0x7676, urgent pointer 0
    0x76, 0x76, 0x00, 0x00, // kind 28, length 19: version 1, 2001:db8::7, then one NOP of padding
    0x1c, 0x13, 0x01, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x07, 0x01, // MSS, SACK permitted, timestamps, NOP, window scale 7 (a Linux SYN)
    0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0xe2, 0x40, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x03, 0x03, 0x07,
];

/// `cdn6` inserted into the IPv6 SYN.
const ALI_CDN6_IN_V6: [u8; 100] = [
    // IPv6: version 6, payload length 60, next header TCP, hop limit 64
    0x60, 0x00, 0x00, 0x00, 0x00, 0x3c, 0x06, 0x40,
    // 2001:db8:64::1 (the LB) -> 2001:db8:be::a (the backend)
    0x20, 0x01, 0x0d, 0xb8, 0x00, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x20,
    0x01, 0x0d, 0xb8, 0x00, 0xbe, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a,
    // TCP: 40000 -> 80, seq 1000, ack 0, data offset 15 words, SYN, window 64240
    0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xf0, 0x02, 0xfa, 0xf0,
    // TCP checksum 0x4074, urgent pointer 0
    0x40, 0x74, 0x00, 0x00, // kind 28, length 19: version 1, 2001:db8::7, then one NOP of padding
    0x1c, 0x13, 0x01, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x07, 0x01, // MSS, SACK permitted, timestamps, NOP, window scale 7 (a Linux SYN)
    0x02, 0x04, 0x05, 0xa0, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01, 0xe2, 0x40, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x03, 0x03, 0x07,
];

fn v4_client() -> std::net::SocketAddr {
    "203.0.113.7:40000".parse().unwrap()
}

fn v6_client() -> std::net::SocketAddr {
    "[2001:db8::7]:40000".parse().unwrap()
}

/// (name, the TOA, its packets in the IPv4 and IPv6 SYN, the option's kind and length)
type Case = (&'static str, Toa, &'static [u8], &'static [u8], u8, u8);

fn cases() -> Vec<Case> {
    let cdn4 = Toa::ali_cdn(1, "203.0.113.7".parse().unwrap());
    let cdn6 = Toa::ali_cdn(1, "2001:db8::7".parse().unwrap());
    vec![
        ("toa", Toa::new(Format::Toa, v4_client()).unwrap(), &TOA_IN_V4, &TOA_IN_V6, 254, 8),
        ("toa6", Toa::new(Format::Toa6, v6_client()).unwrap(), &TOA6_IN_V4, &TOA6_IN_V6, 254, 20),
        ("ali-v6", Toa::new(Format::AliV6, v6_client()).unwrap(), &ALI_V6_IN_V4, &ALI_V6_IN_V6, 253, 20),
        ("tencent", Toa::new(Format::Tencent, v4_client()).unwrap(), &TENCENT_IN_V4, &TENCENT_IN_V6, 200, 8),
        ("ali-cdn v4", cdn4, &ALI_CDN4_IN_V4, &ALI_CDN4_IN_V6, 28, 7),
        ("ali-cdn v6", cdn6, &ALI_CDN6_IN_V4, &ALI_CDN6_IN_V6, 28, 19),
    ]
}

#[test]
fn base_syns_are_valid() {
    assert_checksums_valid(&SYN_V4);
    assert_checksums_valid(&SYN_V6);
    for syn in [&SYN_V4[..], &SYN_V6[..]] {
        let packet = TcpPacket::new_checked(syn).unwrap();
        assert_eq!(packet.toa(&Formats::ALL), Ok(None));
        assert!(packet.checksums_valid());
        assert_eq!(packet.tcp().flags(), TcpFlags::SYN);
    }
}

#[test]
fn golden_packets_parse() {
    for (name, toa, in_v4, in_v6, kind, len) in cases() {
        for (packet, tcp_offset) in [(in_v4, 20), (in_v6, 40)] {
            assert_checksums_valid(packet);
            let packet = TcpPacket::new_checked(packet).unwrap();
            assert!(packet.checksums_valid(), "{name}");
            let found = packet.toa(&Formats::ALL).unwrap().unwrap_or_else(|| panic!("{name}"));
            assert_eq!(found.toa, toa, "{name}");
            assert_eq!((found.kind, found.len), (kind, len), "{name}");
            assert_eq!(found.offset, tcp_offset + 20, "{name}: right after the base header");
            assert_eq!(packet.toas(&Formats::ALL).count(), 1, "{name}");
            // A format that is not enabled is invisible...
            assert_eq!(packet.toa(&Formats::NONE), Ok(None), "{name}");
            // ...unless another enabled format owns the kind: then a length it does not
            // use is malformed (kind 28 is shared with User Timeout and never is).
            let others = Formats::ALL.without(toa.format());
            let shared =
                Format::ALL.iter().any(|f| *f != toa.format() && f.default_kind() == kind && kind != 28);
            let expected =
                if shared { Err(Error::ToaLength { offset: tcp_offset + 20, kind, len }) } else { Ok(None) };
            assert_eq!(packet.toa(&others), expected, "{name}");
        }
    }
}

#[test]
fn golden_insert_and_strip() {
    for (name, toa, in_v4, in_v6, ..) in cases() {
        for (syn, expected) in [(&SYN_V4[..], in_v4), (&SYN_V6[..], in_v6)] {
            let mut buf = [0u8; 256];
            buf[..syn.len()].copy_from_slice(syn);
            let len = insert(&mut buf, syn.len(), &toa, &Formats::ALL).unwrap();
            assert_eq!(&buf[..len], expected, "{name}: insert");
            let stripped = strip(&mut buf, len, &Formats::ALL).unwrap();
            assert_eq!(stripped.removed, 1, "{name}");
            assert_eq!(&buf[..stripped.len], syn, "{name}: strip undoes insert");
        }
    }
}

#[test]
fn golden_toa_option_bytes() {
    let formats = Formats::ALL;
    let mut out = [0u8; 20];
    let toa = Toa::new(Format::Toa, v4_client()).unwrap();
    let n = toa.emit(formats.kind(Format::Toa), &mut out).unwrap();
    // kind 254, len 8, port 40000 (0x9c40), 203.0.113.7
    assert_eq!(out[..n], [0xfe, 0x08, 0x9c, 0x40, 0xcb, 0x00, 0x71, 0x07]);

    let toa6 = Toa::new(Format::Toa6, v6_client()).unwrap();
    let n = toa6.emit(formats.kind(Format::Toa6), &mut out).unwrap();
    // kind 254, len 20, port 40000, 2001:db8::7
    #[rustfmt::skip]
    assert_eq!(out[..n], [
        0xfe, 0x14, 0x9c, 0x40,
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07,
    ]);

    let cdn = Toa::ali_cdn(1, "203.0.113.7".parse().unwrap());
    let n = cdn.emit(formats.kind(Format::AliCdn), &mut out).unwrap();
    // kind 28, len 7, version 1, 203.0.113.7: no port
    assert_eq!(out[..n], [0x1c, 0x07, 0x01, 0xcb, 0x00, 0x71, 0x07]);
    assert_eq!(cdn.port(), None);
    assert_eq!(cdn.cdn_version(), Some(1));

    // Renumbered kinds.
    let renumbered = Formats::default().with_kind(Format::Toa, 30);
    let n = toa.emit(renumbered.kind(Format::Toa), &mut out).unwrap();
    assert_eq!(out[..2], [30, 8]);
    assert_eq!(n, 8);

    // Families that a format cannot carry.
    assert_eq!(Toa::new(Format::Toa, v6_client()), Err(Error::Unrepresentable { format: Format::Toa }));
    assert_eq!(Toa::new(Format::AliCdn, v4_client()), Err(Error::Unrepresentable { format: Format::AliCdn }));
    assert_eq!(toa.emit(254, &mut out[..7]), Err(Error::Capacity { need: 8, capacity: 7 }));
}

#[test]
fn tencent_companions_are_exposed_and_stripped() {
    // A Tencent CLB SYN: 200/8 client, 201/6 VPC id 7, 202/8 VIP 100.125.0.9:443, then NOP NOP.
    let mut packet = SYN_V4[..40].to_vec();
    #[rustfmt::skip]
    packet.extend_from_slice(&[
        200, 8, 0x9c, 0x40, 203, 0, 113, 7,
        201, 6, 0, 0, 0, 7,
        202, 8, 0x01, 0xbb, 100, 125, 0, 9,
        1, 1,
    ]);
    packet[2..4].copy_from_slice(&64u16.to_be_bytes());
    packet[32] = 11 << 4 | (packet[32] & 0x0f);
    fix_checksums(&mut packet);
    let formats = Formats::default().with(Format::Tencent);
    let view = TcpPacket::new_checked(&packet[..]).unwrap();
    let found = view.toa(&formats).unwrap().unwrap();
    assert_eq!(found.toa.socket_addr(), Some(v4_client()));
    let meta = view.tcp().tencent_meta().unwrap();
    assert_eq!(meta.vpc_id, Some(7));
    assert_eq!(meta.vip, Some("100.125.0.9:443".parse().unwrap()));

    let mut buf = packet.clone();
    let stripped = strip(&mut buf, packet.len(), &formats).unwrap();
    assert_eq!(stripped.removed, 3);
    assert_checksums_valid(&buf[..stripped.len]);
    // 22 bytes removed, plus the two NOPs that padded them: the header is back to 20 bytes.
    assert_eq!(stripped.len, 40);
}

#[test]
fn several_toas_first_wins() {
    let first = Toa::new(Format::Toa, v4_client()).unwrap();
    let second = Toa::new(Format::Toa, "198.51.100.1:1".parse().unwrap()).unwrap();
    let mut buf = [0u8; 256];
    buf[..60].copy_from_slice(&SYN_V4);
    let len = insert(&mut buf, 60, &second, &Formats::default()).unwrap();
    let len = insert(&mut buf, len, &first, &Formats::default()).unwrap();
    let packet = TcpPacket::new_checked(&buf[..len]).unwrap();
    let all: Vec<_> = packet.toas(&Formats::default()).map(|t| t.unwrap().toa).collect();
    assert_eq!(all, [first, second]);
    assert_eq!(packet.toa(&Formats::default()).unwrap().unwrap().toa, first);
    let stripped = strip(&mut buf, len, &Formats::default()).unwrap();
    assert_eq!(stripped.removed, 2);
    assert_eq!(&buf[..stripped.len], &SYN_V4);
}

#[test]
fn insert_reclaims_nops_then_reports_no_room() {
    // 40 option bytes: MSS, NOP NOP SACK-permitted, NOP NOP timestamps, NOP window scale,
    // NOP NOP SACK-permitted again (a contrived but legal header) and 12 NOPs.
    let mut packet = SYN_V4[..40].to_vec();
    #[rustfmt::skip]
    packet.extend_from_slice(&[
        2, 4, 0x05, 0xb4,
        1, 1, 4, 2,
        1, 1, 8, 10, 0, 1, 0xe2, 0x40, 0, 0, 0, 0,
        1, 3, 3, 7,
        1, 1, 4, 2,
        1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    ]);
    packet[2..4].copy_from_slice(&80u16.to_be_bytes());
    packet[32] = 15 << 4 | (packet[32] & 0x0f);
    fix_checksums(&mut packet);

    // 19 NOPs reclaimed: 21 option bytes remain, so an 8-byte toa fits (29, padded to 32).
    let toa = Toa::new(Format::Toa, v4_client()).unwrap();
    let mut buf = [0u8; 256];
    buf[..80].copy_from_slice(&packet);
    let len = insert(&mut buf, 80, &toa, &Formats::default()).unwrap();
    assert_eq!(len, 72);
    assert_checksums_valid(&buf[..len]);
    let view = TcpPacket::new_checked(&buf[..len]).unwrap();
    assert_eq!(view.toa(&Formats::default()).unwrap().unwrap().offset, 40);
    let kinds: Vec<u8> = view.tcp().options().map(|o| o.unwrap().kind).collect();
    assert_eq!(kinds, [254, 2, 4, 8, 3, 4, 0], "toa, then every option but the NOPs, then EOL pad");

    // A 20-byte toa6 does not fit in the 19 bytes left.
    let toa6 = Toa::new(Format::Toa6, v6_client()).unwrap();
    let mut buf = [0u8; 256];
    buf[..80].copy_from_slice(&packet);
    let before = buf;
    assert_eq!(
        insert(&mut buf, 80, &toa6, &Formats::default()),
        Err(Error::NoRoom { need: 20, available: 19 })
    );
    assert_eq!(buf, before, "the packet is left intact");
}

#[test]
fn insert_checks_capacity_and_ip_length() {
    let toa = Toa::new(Format::Toa, v4_client()).unwrap();
    let mut buf = SYN_V4;
    assert_eq!(
        insert(&mut buf, 60, &toa, &Formats::default()),
        Err(Error::Capacity { need: 68, capacity: 60 })
    );
    assert_eq!(buf, SYN_V4);
    assert_eq!(
        insert(&mut buf, 61, &toa, &Formats::default()),
        Err(Error::Capacity { need: 61, capacity: 60 })
    );
}

#[test]
fn link_padding_after_the_ip_packet_is_ignored() {
    // A 60-byte SYN in a buffer with 4 bytes of trailing (e.g. Ethernet) padding.
    let mut buf = [0u8; 128];
    buf[..60].copy_from_slice(&SYN_V4);
    buf[60..64].copy_from_slice(&[0xee; 4]);
    let toa = Toa::new(Format::Toa, v4_client()).unwrap();
    let len = insert(&mut buf, 64, &toa, &Formats::default()).unwrap();
    assert_eq!(&buf[..len], &TOA_IN_V4);
}

#[test]
fn ipv6_extension_headers_are_skipped() {
    // The IPv6 SYN with a hop-by-hop header (8 bytes of PadN) and a destination-options
    // header (8 bytes) before TCP.
    let mut packet = SYN_V6[..40].to_vec();
    packet[6] = 0; // next header: hop-by-hop
    packet[4..6].copy_from_slice(&(40u16 + 16).to_be_bytes());
    packet.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]); // next: dest options; PadN
    packet.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]); // next: TCP; PadN
    packet.extend_from_slice(&SYN_V6[40..]);
    fix_checksums(&mut packet);
    let view = TcpPacket::new_checked(&packet[..]).unwrap();
    assert_eq!(view.tcp_offset(), 56);
    assert!(view.checksums_valid());

    let toa = Toa::new(Format::Toa6, v6_client()).unwrap();
    let mut buf = [0u8; 256];
    buf[..packet.len()].copy_from_slice(&packet);
    let len = insert(&mut buf, packet.len(), &toa, &Formats::default()).unwrap();
    assert_checksums_valid(&buf[..len]);
    let view = TcpPacket::new_checked(&buf[..len]).unwrap();
    assert_eq!(view.toa(&Formats::default()).unwrap().unwrap().offset, 76);
    assert_eq!(u16::from_be_bytes([buf[4], buf[5]]) as usize, len - 40);
}

#[test]
fn ipv4_options_are_skipped() {
    // IHL 6: one 4-byte IP option (NOP NOP NOP EOL) before TCP.
    let mut packet = vec![0x46];
    packet.extend_from_slice(&SYN_V4[1..20]);
    packet.extend_from_slice(&[1, 1, 1, 0]);
    packet.extend_from_slice(&SYN_V4[20..]);
    packet[2..4].copy_from_slice(&64u16.to_be_bytes());
    fix_checksums(&mut packet);
    let toa = Toa::new(Format::Toa, v4_client()).unwrap();
    let mut buf = [0u8; 256];
    buf[..64].copy_from_slice(&packet);
    let len = insert(&mut buf, 64, &toa, &Formats::default()).unwrap();
    assert_checksums_valid(&buf[..len]);
    let view = TcpPacket::new_checked(&buf[..len]).unwrap();
    assert_eq!(view.tcp_offset(), 24);
    assert_eq!(view.toa(&Formats::default()).unwrap().unwrap().offset, 44);
}

#[test]
fn clamp_mss_golden() {
    // The SYN's MSS 1460 lowered by 8 (an 8-byte toa).
    let mut buf = SYN_V4;
    assert_eq!(clamp_mss(&mut buf, 60, 8), Ok(Some(MssClamp { old: 1460, new: 1452 })));
    assert_eq!(buf[40..44], [2, 4, 0x05, 0xac]);
    assert_checksums_valid(&buf);
    // IPv6, by 20 (a toa6).
    let mut buf = SYN_V6;
    assert_eq!(clamp_mss(&mut buf, 80, 20), Ok(Some(MssClamp { old: 1440, new: 1420 })));
    assert_checksums_valid(&buf);
    // Never below the floor, never on a segment without SYN.
    let mut buf = SYN_V4;
    assert_eq!(clamp_mss(&mut buf, 60, 5000), Ok(Some(MssClamp { old: 1460, new: 48 })));
    let mut ack = SYN_V4;
    ack[33] = 0x10;
    fix_checksums(&mut ack);
    assert_eq!(clamp_mss(&mut ack, 60, 8), Ok(None));
}

#[test]
fn clamp_mss_at_an_odd_offset() {
    // NOP, MSS 1460, NOP NOP NOP: the MSS value sits at odd TCP offsets 23..25.
    let mut packet = SYN_V4[..40].to_vec();
    packet.extend_from_slice(&[1, 2, 4, 0x05, 0xb4, 1, 1, 1]);
    packet[2..4].copy_from_slice(&48u16.to_be_bytes());
    packet[32] = 7 << 4 | (packet[32] & 0x0f);
    fix_checksums(&mut packet);
    assert_eq!(clamp_mss(&mut packet, 48, 100), Ok(Some(MssClamp { old: 1460, new: 1360 })));
    assert_checksums_valid(&packet);
}

#[test]
fn bad_checksums_stay_bad() {
    // An edit must not launder a corrupted segment into a valid one.
    let mut corrupt = SYN_V4;
    corrupt[36] ^= 0x55;
    let mut buf = [0u8; 128];
    buf[..60].copy_from_slice(&corrupt);
    let toa = Toa::new(Format::Toa, v4_client()).unwrap();
    let len = insert(&mut buf, 60, &toa, &Formats::default()).unwrap();
    assert!(!TcpPacket::new_checked(&buf[..len]).unwrap().checksums_valid());
}

/// Builds the malformed-input table: (what, packet, the error every function must return).
fn malformed() -> Vec<(&'static str, Vec<u8>, Error)> {
    let v4 = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut p = SYN_V4.to_vec();
        f(&mut p);
        p
    };
    let v6 = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut p = SYN_V6.to_vec();
        f(&mut p);
        p
    };
    // Replaces the 20 option bytes of the v4 SYN (TCP options start at byte 40).
    let v4_options = |opts: [u8; 20]| v4(&|p| p[40..60].copy_from_slice(&opts));
    let mut opts_len0 = [1u8; 20];
    opts_len0[4..6].copy_from_slice(&[254, 0]);
    let mut opts_len1 = [1u8; 20];
    opts_len1[4..6].copy_from_slice(&[5, 1]);
    let mut opts_overrun = [1u8; 20];
    opts_overrun[12..14].copy_from_slice(&[8, 10]);
    let mut opts_no_len = [1u8; 20];
    opts_no_len[19] = 254;
    let mut opts_bad_toa = [1u8; 20];
    opts_bad_toa[0..10].copy_from_slice(&[254, 10, 0, 80, 1, 2, 3, 4, 5, 6]);
    let trunc = |layer, offset, need, available| Error::Truncated { layer, offset, need, available };
    vec![
        ("empty buffer", vec![], trunc(Layer::Ipv4, 0, 20, 0)),
        ("19 bytes of ipv4", SYN_V4[..19].to_vec(), trunc(Layer::Ipv4, 0, 20, 19)),
        ("ip version 5", v4(&|p| p[0] = 0x55), Error::UnknownIpVersion { version: 5 }),
        ("ipv4 ihl 4", v4(&|p| p[0] = 0x44), Error::Ipv4HeaderLength { ihl: 4 }),
        (
            "ipv4 ihl past buffer",
            v4(&|p| {
                p[0] = 0x4f;
                p.truncate(40)
            }),
            trunc(Layer::Ipv4, 0, 60, 40),
        ),
        (
            "ipv4 total length past buffer",
            v4(&|p| p[2..4].copy_from_slice(&61u16.to_be_bytes())),
            Error::IpLength { declared: 61, min: 20, available: 60 },
        ),
        (
            "ipv4 total length below header",
            v4(&|p| p[2..4].copy_from_slice(&19u16.to_be_bytes())),
            Error::IpLength { declared: 19, min: 20, available: 60 },
        ),
        ("ipv4 more fragments", v4(&|p| p[6] = 0x20), Error::Fragment { offset: 0 }),
        ("ipv4 fragment offset", v4(&|p| p[7] = 0x01), Error::Fragment { offset: 0 }),
        ("ipv4 udp", v4(&|p| p[9] = 17), Error::NotTcp { protocol: 17, offset: 20 }),
        (
            "tcp shorter than 20 bytes",
            v4(&|p| p[2..4].copy_from_slice(&30u16.to_be_bytes())),
            trunc(Layer::Tcp, 20, 20, 10),
        ),
        (
            "tcp data offset 4",
            v4(&|p| p[32] = 0x42),
            Error::DataOffset { offset: 20, data_offset: 4, available: 40 },
        ),
        (
            "tcp data offset past segment",
            v4(&|p| p[32] = 0xf2),
            Error::DataOffset { offset: 20, data_offset: 15, available: 40 },
        ),
        ("option length 0", v4_options(opts_len0), Error::OptionLength { offset: 44, kind: 254, len: 0 }),
        ("option length 1", v4_options(opts_len1), Error::OptionLength { offset: 44, kind: 5, len: 1 }),
        (
            "option past header end",
            v4_options(opts_overrun),
            Error::OptionOverrun { offset: 52, kind: 8, len: Some(10), available: 8 },
        ),
        (
            "option kind without length",
            v4_options(opts_no_len),
            Error::OptionOverrun { offset: 59, kind: 254, len: None, available: 1 },
        ),
        (
            "toa kind, wrong length",
            v4_options(opts_bad_toa),
            Error::ToaLength { offset: 40, kind: 254, len: 10 },
        ),
        ("39 bytes of ipv6", SYN_V6[..39].to_vec(), trunc(Layer::Ipv6, 0, 40, 39)),
        (
            "ipv6 payload length past buffer",
            v6(&|p| p[4..6].copy_from_slice(&41u16.to_be_bytes())),
            Error::IpLength { declared: 81, min: 40, available: 80 },
        ),
        (
            "ipv6 jumbogram",
            v6(&|p| {
                p[4] = 0;
                p[5] = 0;
                p[6] = 0
            }),
            Error::Jumbogram,
        ),
        ("ipv6 fragment header", v6(&|p| p[6] = 44), Error::Fragment { offset: 40 }),
        ("ipv6 udp", v6(&|p| p[6] = 17), Error::NotTcp { protocol: 17, offset: 40 }),
        (
            "ipv6 extension header past payload",
            // Hop-by-hop claiming 256 bytes.
            v6(&|p| {
                p[6] = 0;
                p[41] = 31
            }),
            trunc(Layer::Ipv6Extension, 40, 256, 40),
        ),
        (
            "ipv6 extension header cut before its length",
            v6(&|p| {
                p[6] = 60;
                p[4..6].copy_from_slice(&1u16.to_be_bytes());
                p.truncate(41)
            }),
            trunc(Layer::Ipv6Extension, 40, 8, 1),
        ),
    ]
}

#[test]
fn malformed_table() {
    let toa = Toa::new(Format::Toa, v4_client()).unwrap();
    for (what, packet, expected) in malformed() {
        let parsed = TcpPacket::new_checked(&packet[..]).and_then(|p| p.toa(&Formats::ALL));
        assert_eq!(parsed, Err(expected), "{what}: parse");
        assert!(!expected.to_string().is_empty());
        assert!(expected.offset().is_some(), "{what}: errors on input carry an offset");

        let mut buf = packet.clone();
        buf.resize(packet.len() + 64, 0xaa);
        if let Error::ToaLength { .. } = expected {
            // Structurally sound, but a forged or broken TOA: strip removes it.
            fix_checksums(&mut buf[..packet.len()]);
            let stripped = strip(&mut buf, packet.len(), &Formats::ALL).unwrap();
            assert_eq!(stripped.removed, 1, "{what}: strip");
            assert_checksums_valid(&buf[..stripped.len]);
            continue;
        }
        // Every edit rejects the packet with the same error and leaves the buffer alone.
        let before = buf.clone();
        assert_eq!(insert(&mut buf, packet.len(), &toa, &Formats::ALL), Err(expected), "{what}: insert");
        assert_eq!(
            strip(&mut buf, packet.len(), &Formats::ALL).map(|s| s.len),
            Err(expected),
            "{what}: strip"
        );
        assert_eq!(clamp_mss(&mut buf, packet.len(), 8), Err(expected), "{what}: clamp_mss");
        assert_eq!(buf, before, "{what}: buffer untouched");
    }
}

#[test]
fn malformed_mss_length() {
    let mut packet = SYN_V4;
    packet[41] = 6; // MSS claiming 6 bytes: still inside the header, but not an MSS.
    assert_eq!(clamp_mss(&mut packet, 60, 8), Err(Error::MssLength { offset: 40, len: 6 }));
}
