//! The engine driven by packet sequences, without root: every packet it emits
//! is checked with etherparse (checksums, addresses) and for its TOA.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use toa_core::{Format, Formats, TcpFlags, TcpPacket, UdpPacket};
use toa_lb_injector::engine::listeners::BackendError;
use toa_lb_injector::{
    Backend, ConfigError, DropReason, Engine, EngineConfig, ListenerConfig, MssClamp, ObtainClientIp,
    Placement, Protocol, Scheduler, Shard, Timeouts, Verdict,
};

const CLIENT: &str = "203.0.113.7:40000";
const VIP: &str = "198.51.100.10:80";
const CLIENT6: &str = "[2001:db8:c::7]:40000";
const VIP6: &str = "[2001:db8:f::10]:80";

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn config(mode: ObtainClientIp, placement: Placement, backends: &[&str]) -> EngineConfig {
    let backends: Vec<Backend> = backends.iter().map(|b| Backend { addr: sock(b), weight: 1 }).collect();
    let backends6 = vec![Backend { addr: sock("[2001:db8:be::a]:8080"), weight: 1 }];
    EngineConfig {
        listeners: vec![
            ListenerConfig {
                vip: sock(VIP),
                protocol: Protocol::Tcp,
                backends,
                scheduler: Scheduler::RoundRobin,
                obtain_client_ip: mode,
                placement,
                mss_clamp: MssClamp::default(),
            },
            ListenerConfig {
                vip: sock(VIP6),
                protocol: Protocol::Tcp,
                backends: backends6,
                scheduler: Scheduler::RoundRobin,
                obtain_client_ip: mode,
                placement,
                mss_clamp: MssClamp::default(),
            },
        ],
        snat: vec![
            "100.125.0.1".parse().unwrap(),
            "100.125.0.2".parse().unwrap(),
            "2001:db8:64::1".parse().unwrap(),
        ],
        snat_ports: 1024..=65535,
        max_flows: 1000,
        timeouts: Timeouts::default(),
        snat_seed: 0,
        shard: Shard::default(),
        mtu: 1500,
    }
}

fn engine(mode: ObtainClientIp) -> Engine {
    Engine::new(config(mode, Placement::default(), &["192.0.2.10:8080"])).unwrap()
}

/// Builds a TCP segment with sequence number 1000; `options` go first in the header.
fn segment(src: SocketAddr, dst: SocketAddr, flags: TcpFlags, options: &[u8], payload: &[u8]) -> Vec<u8> {
    segment_at(1000, src, dst, flags, options, payload)
}

/// Builds a TCP segment with sequence number `seq`.
fn segment_at(
    seq: u32,
    src: SocketAddr,
    dst: SocketAddr,
    flags: TcpFlags,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let builder = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed families"),
    };
    let mut tcp = builder.tcp(src.port(), dst.port(), seq, 64240);
    if flags.contains(TcpFlags::SYN) {
        tcp = tcp.syn();
    }
    if flags.contains(TcpFlags::ACK) {
        tcp = tcp.ack(1);
    }
    if flags.contains(TcpFlags::FIN) {
        tcp = tcp.fin();
    }
    if flags.contains(TcpFlags::RST) {
        tcp = tcp.rst();
    }
    let mut all = options.to_vec();
    if flags.contains(TcpFlags::SYN) {
        all.extend_from_slice(&[2, 4, 0x05, 0xb4]);
    }
    while all.len() % 4 != 0 {
        all.push(1);
    }
    let tcp = tcp.options_raw(&all).unwrap();
    let mut out = Vec::new();
    tcp.write(&mut out, payload).unwrap();
    out
}

/// Runs `packet` through the engine with room to grow; returns the verdict and the bytes.
fn handle(engine: &mut Engine, at: u64, packet: &[u8]) -> (Verdict, Vec<u8>) {
    let mut buf = packet.to_vec();
    buf.resize(packet.len() + 64, 0);
    let verdict = engine.handle_packet(Duration::from_secs(at), &mut buf, packet.len());
    let len = match verdict {
        Verdict::ToBackend { len, .. } | Verdict::ToClient { len, .. } => len,
        _ => packet.len(),
    };
    buf.truncate(len);
    (verdict, buf)
}

/// Checks an emitted packet with etherparse; returns (src, dst, first TOA).
fn inspect(packet: &[u8]) -> (SocketAddr, SocketAddr, Option<SocketAddr>) {
    let sliced = SlicedPacket::from_ip(packet).expect("etherparse parses the output");
    let Some(TransportSlice::Tcp(tcp)) = sliced.transport else { panic!("tcp") };
    let expected = match sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum(), "ipv4 checksum");
            tcp.calc_checksum_ipv4(h.source(), h.destination()).unwrap()
        }
        Some(NetSlice::Ipv6(ip)) => {
            tcp.calc_checksum_ipv6(ip.header().source(), ip.header().destination()).unwrap()
        }
        None => panic!("ip"),
    };
    assert_eq!(tcp.checksum(), expected, "tcp checksum");
    let view = TcpPacket::new_checked(packet).unwrap();
    let toa = view.toa(&Formats::ALL).unwrap().and_then(|t| t.toa.socket_addr());
    (view.src(), view.dst(), toa)
}

#[test]
fn handshake_with_toa_in_syn_and_ack() {
    let mut e = engine(ObtainClientIp::Toa(Format::Toa));
    let (client, vip) = (sock(CLIENT), sock(VIP));

    let (v, syn) = handle(&mut e, 0, &segment(client, vip, TcpFlags::SYN, &[], &[]));
    let (src, dst, toa) = inspect(&syn);
    assert!(matches!(v, Verdict::ToBackend { next_hop, .. } if next_hop == dst.ip()), "{v:?}");
    assert_eq!(dst, sock("192.0.2.10:8080"));
    assert!(src.ip().to_string().starts_with("100.125.0."), "FULLNAT from the SNAT pool: {src}");
    assert_eq!(toa, Some(client), "TOA in the SYN");

    let synack = segment(dst, src, TcpFlags::SYN.union(TcpFlags::ACK), &[], &[]);
    let (v, back) = handle(&mut e, 0, &synack);
    let (bsrc, bdst, _) = inspect(&back);
    assert!(matches!(v, Verdict::ToClient { next_hop, .. } if next_hop == client.ip()), "{v:?}");
    assert_eq!((bsrc, bdst), (vip, client));
    assert_eq!(mss_of(&back), Some(1460), "mss_clamp auto: no data segment will grow");

    let (_, ack) = handle(&mut e, 0, &segment(client, vip, TcpFlags::ACK, &[], &[]));
    assert_eq!(inspect(&ack).2, Some(client), "TOA in the handshake ACK");
    let (_, data) =
        handle(&mut e, 0, &segment(client, vip, TcpFlags::ACK.union(TcpFlags::PSH), &[], b"GET /"));
    assert_eq!(inspect(&data).2, None, "not in data by default");

    let c = *e.counters(0).unwrap();
    assert_eq!((c.flows, c.injected, c.mss_clamped, c.to_backend, c.to_client), (1, 2, 0, 3, 1));

    // RST ends the flow.
    handle(&mut e, 0, &segment(client, vip, TcpFlags::RST, &[], &[]));
    assert_eq!(e.flow_count(), 0);
}

fn mss_of(packet: &[u8]) -> Option<u16> {
    TcpPacket::new_checked(packet).unwrap().tcp().options().find_map(|o| {
        let o = o.unwrap();
        (o.kind == 2).then(|| u16::from_be_bytes([o.data[0], o.data[1]]))
    })
}

/// The backend's SYN-ACK MSS goes down by the option's size (8 bytes, 20 for
/// an IPv6 client) with `mss_clamp = "on"`, and with "auto" when data
/// segments carry the TOA; the flow keeps what it started with.
#[test]
fn mss_clamp_makes_room_when_data_will_grow() {
    let data = Placement { syn: false, handshake_ack: false, data: true };
    for (clamp, placement, room) in [
        (MssClamp::Auto, Placement::default(), 0),
        (MssClamp::Auto, data, 8),
        (MssClamp::On, Placement::default(), 8),
        (MssClamp::Off, data, 0),
    ] {
        let mut c = config(ObtainClientIp::Toa(Format::Toa), placement, &["192.0.2.10:8080"]);
        for l in &mut c.listeners {
            l.mss_clamp = clamp;
        }
        let mut e = Engine::new(c).unwrap();
        for (client, vip) in [(CLIENT, VIP), (CLIENT6, VIP6)] {
            let (client, vip) = (sock(client), sock(vip));
            let (_, syn) = handle(&mut e, 0, &segment(client, vip, TcpFlags::SYN, &[], &[]));
            let (snat, backend, _) = inspect(&syn);
            let synack = segment(backend, snat, TcpFlags::SYN.union(TcpFlags::ACK), &[], &[]);
            let (_, back) = handle(&mut e, 0, &synack);
            let room = if client.is_ipv6() { room * 20 / 8 } else { room };
            assert_eq!(mss_of(&back), Some(1460 - room), "{clamp:?} {placement:?} {client}");
        }
        let clamped = e.counters(0).unwrap().mss_clamped + e.counters(1).unwrap().mss_clamped;
        assert_eq!(clamped, if room > 0 { 2 } else { 0 }, "{clamp:?} {placement:?}");
    }
}

/// Without the clamp a full-sized data segment has no room under the MTU:
/// it goes on intact, without the option, counted; a smaller one gets it.
#[test]
fn a_segment_the_option_would_push_past_the_mtu_goes_without() {
    let data = Placement { syn: false, handshake_ack: false, data: true };
    let mut c = config(ObtainClientIp::Toa(Format::Toa), data, &["192.0.2.10:8080"]);
    c.listeners[0].mss_clamp = MssClamp::Off;
    let mut e = Engine::new(c).unwrap();
    let (client, vip) = (sock(CLIENT), sock(VIP));
    let (_, syn) = handle(&mut e, 0, &segment(client, vip, TcpFlags::SYN, &[], &[]));
    let (snat, backend, _) = inspect(&syn);
    handle(&mut e, 0, &segment(backend, snat, TcpFlags::SYN.union(TcpFlags::ACK), &[], &[]));
    let psh = TcpFlags::ACK.union(TcpFlags::PSH);
    // 20 + 20 + 1460 = 1500 bytes: the MTU.
    let full = segment(client, vip, psh, &[], &[7u8; 1460]);
    assert_eq!(full.len(), 1500);
    let (v, out) = handle(&mut e, 0, &full);
    assert!(matches!(v, Verdict::ToBackend { len: 1500, .. }), "{v:?}");
    assert_eq!(inspect(&out).2, None);
    assert_eq!(&out[40..], &[7u8; 1460][..], "the payload intact");
    let (_, small) = handle(&mut e, 0, &segment(client, vip, psh, &[], &[7u8; 1452]));
    assert_eq!((small.len(), inspect(&small).2), (1500, Some(client)), "8 bytes under: room");
    let c = e.counters(0).unwrap();
    assert_eq!((c.no_room, c.injected), (1, 1));
}

#[test]
fn forged_toas_are_stripped_in_every_mode() {
    let forged = [254, 8, 0x04, 0xd2, 10, 9, 9, 9];
    for mode in [ObtainClientIp::Off, ObtainClientIp::Toa(Format::Toa)] {
        let mut e = engine(mode);
        let syn = segment(sock(CLIENT), sock(VIP), TcpFlags::SYN, &forged, &[]);
        let (_, out) = handle(&mut e, 0, &syn);
        let (_, _, toa) = inspect(&out);
        let expected = (mode != ObtainClientIp::Off).then(|| sock(CLIENT));
        assert_eq!(toa, expected, "{mode:?}: the forged 10.9.9.9 is gone");
        let view = TcpPacket::new_checked(&out[..]).unwrap();
        assert!(view.toas(&Formats::ALL).all(|t| t.unwrap().toa.ip().to_string() != "10.9.9.9"));
        assert_eq!(e.counters(0).unwrap().stripped, 1);
    }
}

#[test]
fn data_placement_until_the_backend_speaks() {
    let placement = Placement { syn: false, handshake_ack: false, data: true };
    let mut e =
        Engine::new(config(ObtainClientIp::Toa(Format::Toa), placement, &["192.0.2.10:8080"])).unwrap();
    let (client, vip) = (sock(CLIENT), sock(VIP));
    let (_, syn) = handle(&mut e, 0, &segment(client, vip, TcpFlags::SYN, &[], &[]));
    let (snat, backend, toa) = inspect(&syn);
    assert_eq!(toa, None);
    handle(&mut e, 0, &segment(backend, snat, TcpFlags::SYN.union(TcpFlags::ACK), &[], &[]));
    let psh = TcpFlags::ACK.union(TcpFlags::PSH);
    let (_, d1) = handle(&mut e, 0, &segment(client, vip, psh, &[], b"one"));
    assert_eq!(inspect(&d1).2, Some(client));
    let (_, d2) = handle(&mut e, 0, &segment(client, vip, psh, &[], b"two"));
    assert_eq!(inspect(&d2).2, Some(client), "still: the backend has not sent data");
    handle(&mut e, 0, &segment(backend, snat, psh, &[], b"hello"));
    let (_, d3) = handle(&mut e, 0, &segment(client, vip, psh, &[], b"three"));
    assert_eq!(inspect(&d3).2, None, "the backend spoke: stop");
}

#[test]
fn retransmitted_syn_keeps_its_flow_and_out_of_order_ack_gets_no_toa() {
    let mut e = engine(ObtainClientIp::Toa(Format::Toa));
    let (client, vip) = (sock(CLIENT), sock(VIP));
    let (_, first) = handle(&mut e, 0, &segment(client, vip, TcpFlags::SYN, &[], &[]));
    let (_, again) = handle(&mut e, 1, &segment(client, vip, TcpFlags::SYN, &[], &[]));
    assert_eq!(inspect(&first).0, inspect(&again).0, "same SNAT address and port");
    assert_eq!(e.flow_count(), 1);
    // An ACK before the backend's SYN-ACK is forwarded, but it completes no handshake.
    let (v, ack) = handle(&mut e, 1, &segment(client, vip, TcpFlags::ACK, &[], &[]));
    assert!(matches!(v, Verdict::ToBackend { .. }));
    assert_eq!(inspect(&ack).2, None);
    // The backend's SYN-ACK crosses a third copy: that one still goes to the same
    // backend from the same address (a new flow there would answer the client's
    // ACK with a reset), and with the TOA.
    let (snat, backend, _) = inspect(&first);
    handle(&mut e, 1, &segment(backend, snat, TcpFlags::SYN.union(TcpFlags::ACK), &[], &[]));
    let (_, third) = handle(&mut e, 1, &segment(client, vip, TcpFlags::SYN, &[], &[]));
    assert_eq!(inspect(&third), (snat, backend, Some(client)));
    assert_eq!((e.flow_count(), e.counters(0).unwrap().flows), (1, 1));
    // A stray segment of an unknown connection is dropped and counted.
    let stray = segment(sock("203.0.113.8:1"), vip, TcpFlags::ACK, &[], &[]);
    assert_eq!(handle(&mut e, 1, &stray).0, Verdict::Drop(DropReason::NoFlow));
    assert_eq!(e.counters(0).unwrap().dropped_no_flow, 1);
}

#[test]
fn no_room_forwards_without_the_option() {
    let mut e = engine(ObtainClientIp::Toa(Format::Toa));
    // 36 option bytes without NOPs (plus the MSS the builder adds: 40) leave no room.
    let mut options = vec![8, 10, 0, 0, 0, 1, 0, 0, 0, 0];
    options.extend([30, 26]);
    options.extend([0u8; 24]);
    let syn = segment(sock(CLIENT), sock(VIP), TcpFlags::SYN, &options, &[]);
    let (v, out) = handle(&mut e, 0, &syn);
    assert!(matches!(v, Verdict::ToBackend { .. }));
    assert_eq!(inspect(&out).2, None);
    assert_eq!(e.counters(0).unwrap().no_room, 1);
}

#[test]
fn ipv6_clients_get_toa6() {
    let mut e = engine(ObtainClientIp::Toa(Format::Toa));
    let (client, vip) = (sock(CLIENT6), sock(VIP6));
    let (_, syn) = handle(&mut e, 0, &segment(client, vip, TcpFlags::SYN, &[], &[]));
    let (src, dst, toa) = inspect(&syn);
    assert_eq!((src.ip().to_string(), dst), ("2001:db8:64::1".to_owned(), sock("[2001:db8:be::a]:8080")));
    assert_eq!(toa, Some(client));
    let view = TcpPacket::new_checked(&syn[..]).unwrap();
    assert_eq!(view.toa(&Formats::ALL).unwrap().unwrap().toa.format(), Format::Toa6);
}

#[test]
fn syn_flood_stays_bounded_and_legitimate_clients_get_through() {
    let mut cfg = config(ObtainClientIp::Toa(Format::Toa), Placement::default(), &["192.0.2.10:8080"]);
    cfg.max_flows = 100;
    let mut e = Engine::new(cfg).unwrap();
    let vip = sock(VIP);
    for i in 0..5000u32 {
        let src = SocketAddr::new(
            IpAddr::V4(std::net::Ipv4Addr::from(0xcb00_7100 + (i % 200))),
            1024 + (i / 200) as u16,
        );
        handle(&mut e, 0, &segment(src, vip, TcpFlags::SYN, &[], &[]));
        assert!(e.flow_count() <= 100);
    }
    let c = *e.counters(0).unwrap();
    assert_eq!(c.flows, 5000);
    assert_eq!(c.evicted, 4900);
    // A real client completes its handshake amid the flood.
    let client = sock(CLIENT);
    let (_, syn) = handle(&mut e, 1, &segment(client, vip, TcpFlags::SYN, &[], &[]));
    let (snat, backend, _) = inspect(&syn);
    handle(&mut e, 1, &segment(backend, snat, TcpFlags::SYN.union(TcpFlags::ACK), &[], &[]));
    let (_, ack) = handle(&mut e, 1, &segment(client, vip, TcpFlags::ACK, &[], &[]));
    assert_eq!(inspect(&ack).2, Some(client));
    // Half-open flows time out after the SYN timeout; the established one stays.
    assert_eq!(e.poll_expired(Duration::from_secs(1 + 6)), 99);
    assert_eq!(e.flow_count(), 1);
    assert_eq!(e.poll_expired(Duration::from_secs(1 + 901)), 1);
}

#[test]
fn round_robin_spreads_flows_and_mode_switches_apply_to_new_flows() {
    let backends = ["192.0.2.10:8080", "192.0.2.11:8080", "192.0.2.12:8080"];
    let mut e =
        Engine::new(config(ObtainClientIp::Toa(Format::Toa), Placement::default(), &backends)).unwrap();
    let vip = sock(VIP);
    let mut seen = std::collections::HashMap::new();
    for port in 0..30u16 {
        let (_, syn) = handle(
            &mut e,
            0,
            &segment(sock(&format!("203.0.113.7:{}", 2000 + port)), vip, TcpFlags::SYN, &[], &[]),
        );
        *seen.entry(inspect(&syn).1).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3);
    assert!(seen.values().all(|&n| n == 10), "{seen:?}");

    // An existing flow keeps TOA after the listener is switched off; a new one does not get it.
    let old = sock("203.0.113.7:2000");
    e.set_obtain_client_ip(0, ObtainClientIp::Off).unwrap();
    let (_, retrans) = handle(&mut e, 0, &segment(old, vip, TcpFlags::SYN, &[], &[]));
    assert_eq!(inspect(&retrans).2, Some(old));
    let (_, fresh) = handle(&mut e, 0, &segment(sock("203.0.113.9:1"), vip, TcpFlags::SYN, &[], &[]));
    assert_eq!(inspect(&fresh).2, None);
}

#[test]
fn backends_marked_down_get_no_new_flows() {
    let backends = ["192.0.2.10:8080", "192.0.2.11:8080"];
    let mut e = Engine::new(config(ObtainClientIp::Off, Placement::default(), &backends)).unwrap();
    let vip = sock(VIP);
    let (_, first) = handle(&mut e, 0, &segment(sock("203.0.113.7:1"), vip, TcpFlags::SYN, &[], &[]));
    assert_eq!(inspect(&first).1, sock("192.0.2.10:8080"));
    assert!(e.set_backend_up(0, sock("192.0.2.10:8080"), false));
    assert!(!e.set_backend_up(0, sock("192.0.2.10:8080"), false), "no change");
    for port in 2..10 {
        let (_, syn) =
            handle(&mut e, 0, &segment(sock(&format!("203.0.113.7:{port}")), vip, TcpFlags::SYN, &[], &[]));
        assert_eq!(inspect(&syn).1, sock("192.0.2.11:8080"));
    }
    // The flow that was on the down backend is kept.
    let (v, _) = handle(&mut e, 0, &segment(sock("203.0.113.7:1"), vip, TcpFlags::ACK, &[], &[]));
    assert!(matches!(v, Verdict::ToBackend { .. }));
    e.set_backend_up(0, sock("192.0.2.11:8080"), false);
    let none = segment(sock("203.0.113.7:99"), vip, TcpFlags::SYN, &[], &[]);
    assert_eq!(handle(&mut e, 0, &none).0, Verdict::Drop(DropReason::NoBackend));
    let c = *e.counters(0).unwrap();
    assert_eq!((c.health_changes, c.dropped_no_backend), (2, 1));
}

#[test]
fn transparent_mode_keeps_the_client_source() {
    let mut e = engine(ObtainClientIp::Transparent);
    let (client, vip) = (sock(CLIENT), sock(VIP));
    let (_, syn) = handle(&mut e, 0, &segment(client, vip, TcpFlags::SYN, &[], &[]));
    let (src, dst, toa) = inspect(&syn);
    assert_eq!((src, dst, toa), (client, sock("192.0.2.10:8080"), None), "DNAT only, no TOA");
    let (v, back) = handle(&mut e, 0, &segment(dst, client, TcpFlags::SYN.union(TcpFlags::ACK), &[], &[]));
    assert!(matches!(v, Verdict::ToClient { .. }));
    assert_eq!(inspect(&back).0, vip, "the reply comes from the VIP");
    handle(&mut e, 0, &segment(client, vip, TcpFlags::RST, &[], &[]));
    assert_eq!(e.flow_count(), 0);
}

#[test]
fn backends_added_removed_and_drained_live() {
    let mut e = Engine::new(config(ObtainClientIp::Off, Placement::default(), &["192.0.2.10:8080"])).unwrap();
    let vip = sock(VIP);
    let mut next = 1u16;
    let mut pick = |e: &mut Engine| {
        next += 1;
        let (_, syn) =
            handle(e, 0, &segment(sock(&format!("203.0.113.7:{next}")), vip, TcpFlags::SYN, &[], &[]));
        inspect(&syn).1
    };
    let added = Backend { addr: sock("192.0.2.11:8080"), weight: 1 };
    e.add_backend(0, added).unwrap();
    assert_eq!(e.add_backend(0, added), Err(BackendError::Duplicate(added.addr)));
    let seen: std::collections::HashSet<_> = (0..4).map(|_| pick(&mut e)).collect();
    assert_eq!(seen.len(), 2, "the added backend takes flows");
    e.drain_backend(0, sock("192.0.2.10:8080"), true).unwrap();
    assert!(e.listeners().get(0).unwrap().draining(sock("192.0.2.10:8080")));
    assert!((0..4).all(|_| pick(&mut e) == sock("192.0.2.11:8080")), "a draining backend gets no new flow");
    e.drain_backend(0, sock("192.0.2.10:8080"), false).unwrap();
    e.remove_backend(0, sock("192.0.2.11:8080")).unwrap();
    assert!((0..4).all(|_| pick(&mut e) == sock("192.0.2.10:8080")));
    assert_eq!(e.remove_backend(0, sock("192.0.2.10:8080")), Err(BackendError::Last));
}

#[test]
fn a_reused_client_port_starts_a_new_flow_with_the_current_mode() {
    let mut e = engine(ObtainClientIp::Toa(Format::Toa));
    let (client, vip) = (sock(CLIENT), sock(VIP));
    let (_, syn) = handle(&mut e, 0, &segment(client, vip, TcpFlags::SYN, &[], &[]));
    let (snat, backend, _) = inspect(&syn);
    handle(&mut e, 0, &segment(backend, snat, TcpFlags::SYN.union(TcpFlags::ACK), &[], &[]));
    handle(&mut e, 0, &segment(client, vip, TcpFlags::ACK, &[], &[]));
    handle(&mut e, 0, &segment(backend, snat, TcpFlags::FIN.union(TcpFlags::ACK), &[], &[]));
    e.set_obtain_client_ip(0, ObtainClientIp::Off).unwrap();
    // The same client port connects again while the old flow is closing.
    let (_, again) = handle(&mut e, 1, &segment(client, vip, TcpFlags::SYN, &[], &[]));
    assert_eq!(inspect(&again).2, None, "the new connection follows the new mode");
    assert_eq!(e.flow_count(), 1);
    assert_eq!(e.counters(0).unwrap().flows, 2);
    // A SYN with another ISN during the handshake: the client gave up on the
    // first connection and opened a new one from the same port.
    let (_, other) = handle(&mut e, 2, &segment_at(7000, client, vip, TcpFlags::SYN, &[], &[]));
    assert_ne!(inspect(&other).0, inspect(&again).0, "a SNAT port of its own");
    assert_eq!((e.flow_count(), e.counters(0).unwrap().flows), (1, 3));
}

#[test]
fn bad_configurations_are_named() {
    let mut cfg = config(ObtainClientIp::Off, Placement::default(), &["192.0.2.10:8080"]);
    cfg.listeners[0].backends.clear();
    assert_eq!(Engine::new(cfg).unwrap_err().to_string(), "listener 198.51.100.10:80 has no backends");
    let mut cfg = config(ObtainClientIp::Off, Placement::default(), &["192.0.2.10:8080"]);
    cfg.listeners[1].vip = cfg.listeners[0].vip;
    cfg.listeners[1].backends = cfg.listeners[0].backends.clone();
    assert!(Engine::new(cfg).unwrap_err().to_string().contains("configured twice"));
    let mut cfg = config(ObtainClientIp::Off, Placement::default(), &["192.0.2.10:8080"]);
    cfg.snat.retain(|a| a.is_ipv6());
    assert!(Engine::new(cfg).unwrap_err().to_string().contains("no IPv4 address"));
}

#[test]
fn garbage_is_dropped_not_panicked_on() {
    let mut e = engine(ObtainClientIp::Toa(Format::Toa));
    for len in 0..80 {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
        let mut buf = bytes.clone();
        buf.resize(len as usize + 64, 0);
        let _ = e.handle_packet(Duration::ZERO, &mut buf, len as usize);
    }
    // A SYN to the VIP with malformed options is dropped and counted.
    let bad = segment(sock(CLIENT), sock(VIP), TcpFlags::SYN, &[254, 0, 0, 0], &[]);
    assert_eq!(handle(&mut e, 0, &bad).0, Verdict::Drop(DropReason::Malformed));
    assert_eq!(e.counters(0).unwrap().dropped_malformed, 1);
}

/// A UDP datagram built by etherparse.
fn datagram(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let builder = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed families"),
    };
    let mut out = Vec::new();
    builder.udp(src.port(), dst.port()).write(&mut out, payload).unwrap();
    out
}

/// Checks an emitted datagram with etherparse; returns (src, dst, payload).
fn inspect_udp(packet: &[u8]) -> (SocketAddr, SocketAddr, Vec<u8>) {
    let sliced = SlicedPacket::from_ip(packet).expect("etherparse parses the output");
    let Some(TransportSlice::Udp(udp)) = sliced.transport else { panic!("udp") };
    let expected = match sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum(), "ipv4 checksum");
            udp.to_header().calc_checksum_ipv4_raw(h.source(), h.destination(), udp.payload()).unwrap()
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            udp.to_header().calc_checksum_ipv6_raw(h.source(), h.destination(), udp.payload()).unwrap()
        }
        None => panic!("ip"),
    };
    assert_eq!(udp.checksum(), expected, "udp checksum");
    let view = UdpPacket::new_checked(packet).unwrap();
    (view.src(), view.dst(), view.payload().to_vec())
}

fn udp_config(mode: ObtainClientIp) -> EngineConfig {
    let mut c = config(ObtainClientIp::Toa(Format::Toa), Placement::default(), &["192.0.2.10:8080"]);
    c.listeners.push(ListenerConfig {
        vip: sock("198.51.100.10:53"),
        protocol: Protocol::Udp,
        backends: vec![Backend { addr: sock("192.0.2.10:5353"), weight: 1 }],
        scheduler: Scheduler::RoundRobin,
        obtain_client_ip: mode,
        placement: Placement::default(),
        mss_clamp: MssClamp::default(),
    });
    c
}

#[test]
fn udp_flows_in_off_and_transparent_modes() {
    for mode in [ObtainClientIp::Off, ObtainClientIp::Transparent] {
        let mut e = Engine::new(udp_config(mode)).unwrap();
        let (client, vip) = (sock(CLIENT), sock("198.51.100.10:53"));
        // Of any size up to an Ethernet MTU, unchanged.
        let payload: Vec<u8> = (0..1472u32).map(|i| i as u8).collect();
        let (v, out) = handle(&mut e, 0, &datagram(client, vip, &payload));
        let (src, dst, body) = inspect_udp(&out);
        assert!(matches!(v, Verdict::ToBackend { .. }), "{v:?}");
        assert_eq!(dst, sock("192.0.2.10:5353"));
        assert_eq!(body, payload);
        match mode {
            ObtainClientIp::Transparent => assert_eq!(src, client, "the client's own address is kept"),
            _ => assert!(src.ip().to_string().starts_with("100.125.0."), "FULLNAT: {src}"),
        }
        // The reply goes back from the VIP; a second datagram keeps the flow.
        let (v, back) = handle(&mut e, 1, &datagram(dst, src, b"answer"));
        assert!(matches!(v, Verdict::ToClient { next_hop, .. } if next_hop == client.ip()), "{v:?}");
        assert_eq!(inspect_udp(&back), (vip, client, b"answer".to_vec()));
        let (_, again) = handle(&mut e, 2, &datagram(client, vip, b"more"));
        assert_eq!(inspect_udp(&again).0, src, "same flow, same SNAT address");
        assert_eq!(e.flow_count(), 1);
        // A TCP segment to the UDP port is not this listener's.
        let (v, _) = handle(&mut e, 2, &segment(client, vip, TcpFlags::SYN, &[], &[]));
        assert_eq!(v, Verdict::NotMine);
        // Idle past the UDP timeout: gone.
        e.poll_expired(Duration::from_secs(2 + 61));
        assert_eq!(e.flow_count(), 0);
        let c = e.counters(2).unwrap();
        assert_eq!((c.flows, c.to_backend, c.to_client, c.expired), (1, 2, 1, 1));
        assert_eq!(c.bytes_to_client, back.len() as u64);
    }
}

#[test]
fn udp_listeners_refuse_toa() {
    let err = Engine::new(udp_config(ObtainClientIp::Toa(Format::Toa))).unwrap_err();
    assert_eq!(err, ConfigError::ToaOnUdp(sock("198.51.100.10:53")));
    let mut e = Engine::new(udp_config(ObtainClientIp::Off)).unwrap();
    assert!(e.set_obtain_client_ip(2, ObtainClientIp::Toa(Format::Toa)).is_err());
    assert_eq!(e.listeners().get(2).unwrap().config.obtain_client_ip, ObtainClientIp::Off);
}

#[test]
fn shards_allocate_disjoint_snat_ports() {
    for index in 0..3u16 {
        let mut c = config(ObtainClientIp::Off, Placement::default(), &["192.0.2.10:8080"]);
        c.shard = Shard { index, count: 3 };
        c.snat_seed = 12345;
        let mut e = Engine::new(c).unwrap();
        let mut wrong = 0;
        for port in 0..200u16 {
            let client = SocketAddr::from(([203, 0, 113, 7], 1000 + port));
            let (v, syn) = handle(&mut e, 0, &segment(client, sock(VIP), TcpFlags::SYN, &[], &[]));
            // A client port steered to another engine makes no flow here.
            if Shard::steer(client.port()) % 3 != u32::from(index) {
                assert_eq!(v, Verdict::Drop(DropReason::WrongEngine));
                wrong += 1;
                continue;
            }
            let snat = inspect(&syn).0;
            let owner = Shard::steer(snat.port()) % 3;
            assert_eq!(owner, u32::from(index), "engine {index} of 3 used SNAT port {}", snat.port());
        }
        let c = e.counters(0).unwrap();
        assert!(wrong > 100, "{wrong}");
        assert_eq!((c.flows, c.dropped_wrong_engine), (200 - wrong, wrong));
    }
    let mut bad = config(ObtainClientIp::Off, Placement::default(), &["192.0.2.10:8080"]);
    bad.shard = Shard { index: 3, count: 3 };
    assert!(Engine::new(bad).is_err());
}

#[test]
fn reconfigure_keeps_flows_and_their_mode() {
    let mut e = engine(ObtainClientIp::Toa(Format::Toa));
    let (client, vip) = (sock(CLIENT), sock(VIP));
    let (_, syn) = handle(&mut e, 0, &segment(client, vip, TcpFlags::SYN, &[], &[]));
    let (snat, backend, _) = inspect(&syn);
    let gone_client = sock(CLIENT6);
    handle(&mut e, 0, &segment(gone_client, sock(VIP6), TcpFlags::SYN, &[], &[]));
    assert_eq!(e.flow_count(), 2);

    // The new file: TOA off, another backend, and the IPv6 listener removed.
    let mut new = config(ObtainClientIp::Off, Placement::default(), &["192.0.2.11:8080"]);
    new.listeners.remove(1);
    // A bad one first: nothing changes.
    let mut bad = new.clone();
    bad.listeners[0].backends.clear();
    assert_eq!(e.reconfigure(bad), Err(ConfigError::NoBackends(vip)));
    assert_eq!(e.listeners().all().len(), 2);
    assert_eq!(e.flow_count(), 2);

    e.reconfigure(new).unwrap();
    assert_eq!(e.listeners().all().len(), 1);
    assert_eq!(e.flow_count(), 1, "the removed listener's flow is gone");
    assert_eq!(e.counters(0).unwrap().flows, 1, "counters follow the listener");
    // The old flow keeps its backend, SNAT address and TOA.
    let (_, synack) =
        handle(&mut e, 1, &segment(backend, snat, TcpFlags::SYN.union(TcpFlags::ACK), &[], &[]));
    assert_eq!(inspect(&synack).1, client);
    let (_, ack) = handle(&mut e, 1, &segment(client, vip, TcpFlags::ACK, &[], &[]));
    assert_eq!(inspect(&ack), (snat, backend, Some(client)));
    // A new flow follows the new configuration.
    let (_, fresh) = handle(&mut e, 2, &segment(sock("203.0.113.9:1"), vip, TcpFlags::SYN, &[], &[]));
    let (_, to, toa) = inspect(&fresh);
    assert_eq!((to, toa), (sock("192.0.2.11:8080"), None));
}

#[test]
fn udp_flood_stays_bounded_and_answered_flows_survive() {
    let mut c = udp_config(ObtainClientIp::Off);
    c.max_flows = 100;
    let mut e = Engine::new(c).unwrap();
    let vip = sock("198.51.100.10:53");
    // A real client, answered by its backend: no longer evictable.
    let real = sock("203.0.113.5:5000");
    let (_, out) = handle(&mut e, 0, &datagram(real, vip, b"q"));
    let (snat, backend, _) = inspect_udp(&out);
    handle(&mut e, 0, &datagram(backend, snat, b"a"));
    // A flood of one-datagram flows from spoofed ports.
    for port in 0..1000u16 {
        let (v, _) =
            handle(&mut e, 1, &datagram(SocketAddr::from(([203, 0, 113, 66], 10_000 + port)), vip, b"x"));
        assert!(matches!(v, Verdict::ToBackend { .. }), "{v:?}");
    }
    assert!(e.flow_count() <= 100);
    assert!(e.counters(2).unwrap().evicted >= 900);
    // The answered flow is still there, with its SNAT address.
    let (_, again) = handle(&mut e, 2, &datagram(real, vip, b"q2"));
    assert_eq!(inspect_udp(&again).0, snat);
}

/// UOA: the first `datagrams` datagrams of a flow carry the client, in the
/// configured format (opp always for IPv6); a client's own UOA is stripped in
/// both formats; past the MTU a datagram goes without, counted; the mode is
/// switched live for new flows; TCP listeners refuse it.
#[test]
fn udp_uoa_first_datagrams_carry_the_client() {
    use toa_core::uoa::{IPPROTO_OPT, UoaFormat, find_uoa, insert_uoa};
    for format in [UoaFormat::Opp, UoaFormat::Ipo] {
        let mode = ObtainClientIp::Uoa { format, datagrams: 3 };
        let mut e = Engine::new(udp_config(mode)).unwrap();
        let (client, vip) = (sock(CLIENT), sock("198.51.100.10:53"));
        for i in 0..5u64 {
            let (v, out) = handle(&mut e, i, &datagram(client, vip, b"ping"));
            assert!(matches!(v, Verdict::ToBackend { .. }), "{v:?}");
            let found = find_uoa(&out).unwrap();
            if i < 3 {
                let found = found.unwrap_or_else(|| panic!("datagram {i} has no UOA"));
                assert_eq!((found.client, found.format), (client, format));
                // And it is still the datagram underneath: strip, then etherparse.
                let mut plain = out.clone();
                let (n, _) = toa_core::uoa::strip_uoa(&mut plain, out.len()).unwrap();
                let (_, dst, body) = inspect_udp(&plain[..n]);
                assert_eq!((dst, body), (sock("192.0.2.10:5353"), b"ping".to_vec()));
            } else {
                assert_eq!(found, None, "datagram {i} carries a UOA");
                inspect_udp(&out);
            }
            if format == UoaFormat::Opp && i < 3 {
                assert_eq!(out[9], IPPROTO_OPT);
            }
        }
        let c = e.counters(2).unwrap();
        assert_eq!((c.uoa_injected, c.uoa_no_room, c.uoa_stripped), (3, 0, 0));

        // A client that sends its own UOA (either format) is stripped before ours.
        let forged: SocketAddr = "192.0.2.66:1".parse().unwrap();
        for own in [UoaFormat::Ipo, UoaFormat::Opp] {
            let client2 = sock(&format!("203.0.113.9:{}", 41000 + own as u16));
            let mut buf = datagram(client2, vip, b"x");
            let len = buf.len();
            buf.resize(len + 64, 0);
            let len = insert_uoa(&mut buf, len, forged, own).unwrap();
            let (v, out) = handle(&mut e, 10, &buf[..len]);
            assert!(matches!(v, Verdict::ToBackend { .. }), "{own:?}: {v:?}");
            assert_eq!(find_uoa(&out).unwrap().map(|f| f.client), Some(client2), "{own:?}");
        }
        assert_eq!(e.counters(2).unwrap().uoa_stripped, 2);

        // A full-sized datagram has no room under the MTU: it goes as it is,
        // and an empty datagram of its flow carries the UOA ahead of it.
        assert_eq!(e.take_carrier(), None, "no carrier where the UOA fitted");
        let big: Vec<u8> = vec![7; 1472];
        let client3 = sock("203.0.113.9:42000");
        let (_, out) = handle(&mut e, 20, &datagram(client3, vip, &big));
        assert_eq!((out.len(), find_uoa(&out).unwrap()), (1500, None));
        let carrier = e.take_carrier().expect("a carrier");
        let found = find_uoa(&carrier).unwrap().expect("the carrier's UOA");
        assert_eq!((found.client, found.format), (client3, format));
        let mut plain = carrier.clone();
        let (n, _) = toa_core::uoa::strip_uoa(&mut plain, carrier.len()).unwrap();
        let (snat, backend, body) = inspect_udp(&plain[..n]);
        assert_eq!((snat, backend, body.len()), (inspect_udp(&out).0, inspect_udp(&out).1, 0));
        assert_eq!(e.take_carrier(), None, "taken once");
        let c = e.counters(2).unwrap();
        assert_eq!((c.uoa_no_room, c.uoa_carriers), (1, 1));
        // The carrier counted as one of the flow's 3: two more datagrams carry it.
        let small: Vec<Vec<u8>> =
            (0..3).map(|i| handle(&mut e, 21 + i, &datagram(client3, vip, b"s")).1).collect();
        let carried: Vec<bool> = small.iter().map(|o| find_uoa(o).unwrap().is_some()).collect();
        assert_eq!(carried, [true, true, false]);
    }
    // IPv6: opp whatever the format (ipo does not exist there). A v6 UDP listener:
    let mut c = udp_config(ObtainClientIp::Uoa { format: UoaFormat::Ipo, datagrams: 1 });
    c.listeners.push(ListenerConfig {
        vip: sock("[2001:db8::53]:53"),
        protocol: Protocol::Udp,
        backends: vec![Backend { addr: sock("[2001:db8:be::a]:5353"), weight: 1 }],
        scheduler: Scheduler::RoundRobin,
        obtain_client_ip: ObtainClientIp::Uoa { format: UoaFormat::Ipo, datagrams: 1 },
        placement: Placement::default(),
        mss_clamp: MssClamp::default(),
    });
    let mut e = Engine::new(c).unwrap();
    let client6 = sock("[2001:db8:c::7]:40000");
    let (_, out) = handle(&mut e, 0, &datagram(client6, sock("[2001:db8::53]:53"), b"ping"));
    let found = find_uoa(&out).unwrap().unwrap();
    assert_eq!((found.client, found.format), (client6, UoaFormat::Opp));
    // Live switch: off for new flows; TCP listeners refuse UOA.
    let mut e = Engine::new(udp_config(ObtainClientIp::Off)).unwrap();
    e.set_obtain_client_ip(2, ObtainClientIp::Uoa { format: UoaFormat::Opp, datagrams: 3 }).unwrap();
    let (_, out) = handle(&mut e, 0, &datagram(sock(CLIENT), sock("198.51.100.10:53"), b"ping"));
    assert!(find_uoa(&out).unwrap().is_some());
    assert!(e.set_obtain_client_ip(0, ObtainClientIp::Uoa { format: UoaFormat::Opp, datagrams: 3 }).is_err());
}
