//! The sample captures: what TOA load balancers put on the wire.
//!
//! | file | link type | what it shows |
//! |---|---|---|
//! | `handshake-v4.pcap` | Ethernet | a Huawei-ELB-style handshake from 100.125.0.1 (TOA in SYN and ACK), a forged TOA from an untrusted host, a malformed option, and frames that are not TCP |
//! | `handshake-v6.pcap` | Linux cooked v2 | the same over IPv6 with `toa6` |
//! | `vendors.pcapng` | raw IP (pcapng) | one SYN per vendor format, NAT64 `toa6` in IPv4, Tencent's companions, two TOAs in one header |

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use etherparse::PacketBuilder;
use pcap_file::DataLink;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionBlock;
use toa_core::{Format, Formats, Toa};

/// The capture files: (file name, contents).
pub fn all() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("handshake-v4.pcap", handshake_v4()),
        ("handshake-v6.pcap", handshake_v6()),
        ("vendors.pcapng", vendors()),
    ]
}

const LB_V4: [u8; 4] = [100, 125, 0, 1];
const BACKEND_V4: [u8; 4] = [192, 0, 2, 10];
const LB_V6: &str = "2001:db8:64::1";
const BACKEND_V6: &str = "2001:db8:be::a";
/// MSS 1460, SACK permitted, timestamps, NOP, window scale 7: a Linux SYN.
const SYN_OPTIONS: [u8; 20] = [2, 4, 5, 180, 4, 2, 8, 10, 0, 1, 226, 64, 0, 0, 0, 0, 1, 3, 3, 7];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];

fn sock(text: &str) -> SocketAddr {
    text.parse().expect("literal address")
}

fn v6(text: &str) -> [u8; 16] {
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => ip.octets(),
        _ => panic!("literal IPv6 address {text}"),
    }
}

/// Which TCP segment of a handshake to build.
#[derive(Clone, Copy)]
enum Step {
    Syn,
    SynAck,
    Ack,
    Data,
}

/// Builds one IPv4 or IPv6 TCP packet between `src` and `dst` (port 40000 <-> 80).
fn segment(src: &[u8], dst: &[u8], step: Step) -> Vec<u8> {
    let builder = match (src.len(), <[u8; 4]>::try_from(src), <[u8; 4]>::try_from(dst)) {
        (4, Ok(s), Ok(d)) => PacketBuilder::ipv4(s, d, 64),
        _ => {
            let s: [u8; 16] = src.try_into().expect("16-byte address");
            let d: [u8; 16] = dst.try_into().expect("16-byte address");
            PacketBuilder::ipv6(s, d, 64)
        }
    };
    let (sport, dport) = match step {
        Step::SynAck => (80, 40000),
        _ => (40000, 80),
    };
    let tcp = builder.tcp(sport, dport, if matches!(step, Step::SynAck) { 5000 } else { 1000 }, 64240);
    let (tcp, payload): (_, &[u8]) = match step {
        Step::Syn => (tcp.syn(), &[]),
        Step::SynAck => (tcp.syn().ack(1001), &[]),
        Step::Ack => (tcp.ack(5001), &[]),
        Step::Data => (tcp.ack(5001).psh(), b"GET / HTTP/1.0\r\n\r\n"),
    };
    let tcp = match step {
        Step::Syn | Step::SynAck => tcp.options_raw(&SYN_OPTIONS).expect("20 option bytes fit"),
        Step::Ack | Step::Data => tcp,
    };
    let mut out = Vec::new();
    tcp.write(&mut out, payload).expect("writing to a Vec");
    out
}

/// `packet` with `toas` inserted (the last one ends up first).
fn with_toa(packet: Vec<u8>, toas: &[Toa]) -> Vec<u8> {
    let mut buf = packet.clone();
    buf.resize(packet.len() + 64, 0);
    let mut len = packet.len();
    for toa in toas {
        len = toa_core::insert(&mut buf, len, toa, &Formats::ALL).expect("room for the toa");
    }
    buf.truncate(len);
    buf
}

fn ethernet(src: [u8; 6], dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A Linux cooked v2 header (protocol, interface index 2, ARPHRD_ETHER, outgoing).
fn sll2(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x86, 0xdd, 0, 0, 0, 0, 0, 2, 0, 1, 4, 6];
    frame.extend_from_slice(&LB_MAC);
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    frame
}

fn pcap(datalink: DataLink, frames: &[Vec<u8>]) -> Vec<u8> {
    let header = PcapHeader { datalink, ..Default::default() };
    let mut writer = PcapWriter::with_header(Vec::new(), header).expect("writing to a Vec");
    for (i, frame) in frames.iter().enumerate() {
        let at = Duration::from_secs(1_767_225_600) + Duration::from_millis(i as u64);
        let packet = PcapPacket::new(at, frame.len() as u32, frame);
        writer.write_packet(&packet).expect("writing to a Vec");
    }
    writer.into_writer()
}

/// The IPv4 handshake a Huawei ELB sends, and what an operator must tell apart from it.
pub fn handshake_v4() -> Vec<u8> {
    let client = Toa::new(Format::Toa, sock("203.0.113.7:40000")).expect("v4 toa");
    let forged = Toa::new(Format::Toa, sock("203.0.113.66:1234")).expect("v4 toa");
    let ipv4 = 0x0800;
    let to_backend = |ip: &[u8]| ethernet(LB_MAC, BACKEND_MAC, ipv4, ip);
    let to_lb = |ip: &[u8]| ethernet(BACKEND_MAC, LB_MAC, ipv4, ip);

    let mut malformed = segment(&LB_V4, &BACKEND_V4, Step::Syn);
    malformed[44..46].copy_from_slice(&[254, 0]); // SACK-permitted replaced by a zero-length option
    let udp = {
        let builder = PacketBuilder::ipv4(LB_V4, BACKEND_V4, 64).udp(5353, 53);
        let mut out = Vec::new();
        builder.write(&mut out, &[0; 12]).expect("writing to a Vec");
        out
    };
    let arp = ethernet(LB_MAC, [0xff; 6], 0x0806, &[0, 1, 8, 0, 6, 4, 0, 1]);
    let frames = vec![
        to_backend(&with_toa(segment(&LB_V4, &BACKEND_V4, Step::Syn), &[client])),
        to_lb(&segment(&BACKEND_V4, &LB_V4, Step::SynAck)),
        to_backend(&with_toa(segment(&LB_V4, &BACKEND_V4, Step::Ack), &[client])),
        to_backend(&segment(&LB_V4, &BACKEND_V4, Step::Data)),
        // A host outside the LB range claiming to speak for 203.0.113.66.
        to_backend(&with_toa(segment(&[198, 51, 100, 9], &BACKEND_V4, Step::Syn), &[forged])),
        to_backend(&malformed),
        to_backend(&udp),
        arp,
    ];
    pcap(DataLink::ETHERNET, &frames)
}

/// The IPv6 handshake with `toa6`, as `tcpdump -i any` records it.
pub fn handshake_v6() -> Vec<u8> {
    let client = Toa::new(Format::Toa6, sock("[2001:db8:c::7]:40000")).expect("v6 toa");
    let (lb, backend) = (v6(LB_V6), v6(BACKEND_V6));
    let frames = vec![
        sll2(&with_toa(segment(&lb, &backend, Step::Syn), &[client])),
        sll2(&segment(&backend, &lb, Step::SynAck)),
        sll2(&with_toa(segment(&lb, &backend, Step::Ack), &[client])),
    ];
    pcap(DataLink::LINUX_SLL2, &frames)
}

/// One SYN per vendor format, as a pcapng file with a raw-IP interface.
pub fn vendors() -> Vec<u8> {
    let v4_client = sock("203.0.113.7:40000");
    let v6_client = sock("[2001:db8:c::7]:40000");
    let (lb6, backend6) = (v6(LB_V6), v6(BACKEND_V6));
    let syn4 = || segment(&LB_V4, &BACKEND_V4, Step::Syn);
    let syn6 = || segment(&lb6, &backend6, Step::Syn);
    let toa = |format, addr| Toa::new(format, addr).expect("family matches");
    #[rustfmt::skip]
    let tencent = syn_with_options(&[
        200, 8, 0x9c, 0x40, 203, 0, 113, 7,      // tencent: 203.0.113.7:40000
        201, 6, 0, 0, 0x30, 0x39,                // VPC id 12345
        202, 8, 0x01, 0xbb, 100, 125, 0, 9,      // VIP 100.125.0.9:443
        2, 4, 5, 180, 1, 1,                      // MSS 1460, NOP NOP
    ]);
    let packets = [
        with_toa(syn4(), &[toa(Format::Toa, v4_client)]),
        // NAT64: an IPv6 client behind an IPv4 connection (DPVS).
        with_toa(syn4(), &[toa(Format::Toa6, v6_client)]),
        with_toa(syn6(), &[toa(Format::Toa6, v6_client)]),
        with_toa(syn6(), &[toa(Format::AliV6, v6_client)]),
        tencent,
        with_toa(syn4(), &[Toa::ali_cdn(1, v4_client.ip())]),
        with_toa(syn6(), &[Toa::ali_cdn(1, v6_client.ip())]),
        // Two TOAs: the first one wins.
        with_toa(syn4(), &[toa(Format::Toa, sock("198.51.100.1:1")), toa(Format::Toa, v4_client)]),
    ];
    let mut writer = PcapNgWriter::new(Vec::new()).expect("writing to a Vec");
    let interface = InterfaceDescriptionBlock { linktype: DataLink::RAW, snaplen: 0xffff, options: vec![] };
    writer.write_pcapng_block(interface).expect("writing to a Vec");
    for (i, packet) in packets.iter().enumerate() {
        let block = EnhancedPacketBlock {
            interface_id: 0,
            timestamp: Duration::from_secs(1_767_225_600) + Duration::from_millis(i as u64),
            original_len: packet.len() as u32,
            data: Cow::Borrowed(packet),
            options: vec![],
        };
        writer.write_pcapng_block(block).expect("writing to a Vec");
    }
    writer.into_inner()
}

/// An IPv4 SYN from the LB with exactly these TCP options.
fn syn_with_options(options: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ipv4(LB_V4, BACKEND_V4, 64).tcp(40000, 80, 1000, 64240).syn();
    let builder = builder.options_raw(options).expect("options fit");
    let mut out = Vec::new();
    builder.write(&mut out, &[]).expect("writing to a Vec");
    out
}
