//! The LB engine fed arbitrary packet sequences: no panic, the flow table
//! stays bounded, and every packet it forwards is a valid TCP or UDP packet.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use toa_core::{Format, TcpPacket, UdpPacket};
use toa_lb_injector::{
    Backend, Engine, EngineConfig, ListenerConfig, MssClamp, ObtainClientIp, Placement, Protocol, Scheduler,
    Shard, Timeouts, Verdict,
};

fn engine() -> Engine {
    let listener = |vip: &str, backend: &str, protocol| ListenerConfig {
        vip: vip.parse().expect("vip"),
        protocol,
        backends: vec![Backend { addr: backend.parse().expect("backend"), weight: 1 }],
        scheduler: Scheduler::RoundRobin,
        obtain_client_ip: match protocol {
            Protocol::Tcp => ObtainClientIp::Toa(Format::Toa),
            // UOA in the first datagrams, so that the fuzzer reaches insert and strip too.
            Protocol::Udp => ObtainClientIp::Uoa { format: toa_core::uoa::UoaFormat::Ipo, datagrams: 3 },
        },
        placement: Placement { syn: true, handshake_ack: true, data: true },
        // Data placement clamps anyway; said here so that the fuzzer reaches it whatever the default.
        mss_clamp: MssClamp::On,
    };
    Engine::new(EngineConfig {
        listeners: vec![
            listener("198.51.100.10:80", "192.0.2.10:8080", Protocol::Tcp),
            listener("[2001:db8:f::10]:80", "[2001:db8:be::a]:80", Protocol::Tcp),
            listener("198.51.100.10:80", "192.0.2.10:8080", Protocol::Udp),
        ],
        snat: vec!["100.125.0.1".parse().expect("ip"), "2001:db8:64::1".parse().expect("ip")],
        snat_ports: 1024..=1100,
        max_flows: 16,
        timeouts: Timeouts::default(),
        snat_seed: 0,
        shard: Shard::default(),
        // Small, so that datagrams of fuzzed sizes also run out of room (carriers).
        mtu: 160,
    })
    .expect("valid config")
}

fuzz_target!(|data: &[u8]| {
    let mut engine = engine();
    // Packets are length-prefixed (one byte); the first byte of each also advances the clock.
    let mut rest = data;
    let mut now = Duration::ZERO;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (packet, tail) = tail.split_at(len);
        rest = tail;
        now += Duration::from_millis(u64::from(packet.first().copied().unwrap_or(0)) * 50);
        let mut buf = packet.to_vec();
        buf.resize(packet.len() + 64, 0);
        match engine.handle_packet(now, &mut buf, packet.len()) {
            Verdict::ToBackend { len, .. } | Verdict::ToClient { len, .. } => {
                let out = &buf[..len];
                let valid = TcpPacket::new_checked(out).is_ok()
                    || UdpPacket::new_checked(out).is_ok()
                    || toa_core::uoa::find_uoa(out).is_ok_and(|f| f.is_some());
                assert!(valid, "forwarded an invalid packet");
                if let Some(carrier) = engine.take_carrier() {
                    let found = toa_core::uoa::find_uoa(&carrier).expect("a carrier parses");
                    assert!(found.is_some(), "a carrier without a UOA");
                }
            }
            Verdict::Drop(_) | Verdict::NotMine => {}
        }
        assert!(engine.flow_count() <= 16);
        engine.poll_expired(now);
    }
});
