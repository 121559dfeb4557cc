//! The PROXY protocol end to end (root, in a namespace of its own): a raw
//! client on the LB end sends v1 and v2 headers (IPv4, IPv6, LOCAL, TLVs)
//! from a trusted load balancer and from a stranger, malformed, oversized and
//! half-sent ones, then data; std and tokio listeners name the client, hand
//! the data after the header over intact, refuse and count the rest, and a
//! slow sender delays no one else.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use toa_server_shim::{Config, PeerInfo, ProxyProtocol, StatsSnapshot, ToaListener, TrustPolicy};
use toa_testkit::bed::{Bed, LB_V4, LB_V6, SERVER_V4, SERVER_V6, STRANGER_V4, sock};
use toa_testkit::rawtcp::Conn;
use toa_testkit::require_root;

fn policy() -> TrustPolicy {
    let sources = ["huawei-elb", "2001:db8:64::/48"].iter().map(|s| s.parse().unwrap()).collect();
    TrustPolicy::new(sources).unwrap()
}

fn v1(line: &str) -> Vec<u8> {
    format!("{line}\r\n").into_bytes()
}

/// A v2 header: `command` 0 LOCAL / 1 PROXY, `family` (0x11 TCP4, 0x21 TCP6), then addresses and TLVs.
fn v2(command: u8, family: u8, src: SocketAddr, dst: SocketAddr, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) if family == 0x11 => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            body.extend_from_slice(&s.port().to_be_bytes());
            body.extend_from_slice(&d.port().to_be_bytes());
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) if family == 0x21 => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            body.extend_from_slice(&s.port().to_be_bytes());
            body.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => {}
    }
    for (kind, value) in tlvs {
        body.push(*kind);
        body.extend_from_slice(&(value.len() as u16).to_be_bytes());
        body.extend_from_slice(value);
    }
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | command);
    h.push(family);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&body);
    h
}

/// What the test servers answer: the peer, the authority TLV, and the first
/// line of data after the header (which must be intact).
fn answer(stream: &TcpStream, peer: &PeerInfo) -> String {
    let mut line = String::new();
    let _ = BufReader::new(stream).read_line(&mut line);
    let authority = peer
        .proxy
        .as_ref()
        .and_then(|h| h.tlv(0x02))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    format!("{peer} authority={authority} data={}\n", line.trim_end())
}

/// Serves until `stop` with the std listener, each connection on its own
/// thread (`accept_pending`, then `finish` there).
fn serve_std(listener: ToaListener, until: Instant) -> std::thread::JoinHandle<StatsSnapshot> {
    listener.get_ref().set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while Instant::now() < until {
            let pending = match listener.accept_pending() {
                Ok(p) => p,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            };
            std::thread::spawn(move || {
                if let Ok((mut stream, peer)) = pending.finish() {
                    stream.set_nonblocking(false).unwrap();
                    let text = answer(&stream, &peer);
                    let _ = stream.write_all(text.as_bytes());
                }
            });
        }
        listener.stats()
    })
}

/// The same with the tokio listener, until `until`.
fn serve_tokio(
    listener: TcpListener,
    config: Config,
    until: Instant,
) -> std::thread::JoinHandle<StatsSnapshot> {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let listener = toa_server_shim::tokio::ToaListener::from_tokio(listener, config).unwrap();
            ready_tx.send(()).unwrap();
            let deadline = tokio::time::Instant::from_std(until);
            while let Ok(accepted) = tokio::time::timeout_at(deadline, listener.accept()).await {
                let (stream, peer) = accepted.expect("accept");
                tokio::task::spawn_blocking(move || {
                    let stream = stream.into_std().unwrap();
                    stream.set_nonblocking(false).unwrap();
                    let text = answer(&stream, &peer);
                    let _ = (&stream).write_all(text.as_bytes());
                });
            }
            listener.stats()
        })
    });
    ready.recv().expect("the tokio listener starts");
    handle
}

struct Case {
    name: &'static str,
    conn: Conn,
    /// The answer, or None: refused (closed without an answer).
    expect: Option<String>,
}

fn with(src: SocketAddr, dst: SocketAddr, request: Vec<u8>) -> Conn {
    let mut conn = Conn::new(src, dst);
    conn.request = request;
    conn
}

/// `a.b.c.d:p` as a dual-stack (`[::]`) listener shows it.
fn m(addr: &str) -> String {
    let addr: SocketAddr = addr.parse().unwrap();
    match addr {
        SocketAddr::V4(v4) => format!("[{}]:{}", v4.ip().to_ipv6_mapped(), v4.port()),
        v6 => v6.to_string(),
    }
}

/// The cases, for a dual-stack listener on `port`.
fn cases(port: u16) -> Vec<Case> {
    let s4 = sock(SERVER_V4, port);
    let s6 = sock(SERVER_V6, port);
    let lb = |p| sock(LB_V4, p);
    let client4: SocketAddr = "203.0.113.7:40000".parse().unwrap();
    let client6: SocketAddr = "[2001:db8:c::7]:40000".parse().unwrap();
    let data = b"hello\n".as_slice();
    // A v2 header that declares 3000 bytes (over the 2048 limit): refused on its first 16.
    let mut oversized = v2(1, 0x11, client4, s4, &[(0x04, &[0u8; 100])]);
    oversized[14..16].copy_from_slice(&3000u16.to_be_bytes());
    vec![
        Case {
            name: "v1 TCP4",
            conn: with(
                lb(21001),
                s4,
                [v1("PROXY TCP4 203.0.113.7 192.0.2.10 40000 80"), data.to_vec()].concat(),
            ),
            expect: Some(format!(
                "client={} lb={} source=proxy-v1 authority= data=hello",
                m("203.0.113.7:40000"),
                m("100.125.0.1:21001")
            )),
        },
        Case {
            name: "v1 TCP6 over an IPv4 connection",
            conn: with(
                lb(21002),
                s4,
                [v1("PROXY TCP6 2001:db8:c::7 2001:db8:be::a 40000 80"), data.to_vec()].concat(),
            ),
            expect: Some(format!(
                "client={client6} lb={} source=proxy-v1 authority= data=hello",
                m("100.125.0.1:21002")
            )),
        },
        Case {
            name: "v2 IPv4 with TLVs",
            conn: with(
                lb(21003),
                s4,
                [v2(1, 0x11, client4, s4, &[(0x02, b"example.com"), (0xea, &[1, 2, 3])]), data.to_vec()]
                    .concat(),
            ),
            expect: Some(format!(
                "client={} lb={} source=proxy-v2 authority=example.com data=hello",
                m("203.0.113.7:40000"),
                m("100.125.0.1:21003")
            )),
        },
        Case {
            name: "v2 IPv6 on an IPv6 connection",
            conn: with(sock(LB_V6, 21004), s6, [v2(1, 0x21, client6, s6, &[]), data.to_vec()].concat()),
            expect: Some(format!(
                "client={client6} lb=[2001:db8:64::1]:21004 source=proxy-v2 authority= data=hello"
            )),
        },
        Case {
            name: "v2 LOCAL (a health check): the real peer",
            conn: with(lb(21005), s4, [v2(0, 0x00, client4, s4, &[]), data.to_vec()].concat()),
            expect: Some(format!(
                "client={0} lb={0} source=none authority= data=hello",
                m("100.125.0.1:21005")
            )),
        },
        Case {
            name: "a header from an untrusted peer",
            conn: with(
                sock(STRANGER_V4, 21006),
                s4,
                [v1("PROXY TCP4 203.0.113.7 192.0.2.10 40000 80"), data.to_vec()].concat(),
            ),
            expect: None,
        },
        Case {
            name: "a malformed v1 header",
            conn: with(lb(21007), s4, [v1("PROXY TCP4 203.0.113.999 x 1 2"), data.to_vec()].concat()),
            expect: None,
        },
        Case { name: "an oversized v2 header", conn: with(lb(21008), s4, oversized), expect: None },
        Case {
            name: "a wrong v2 version",
            conn: with(lb(21009), s4, {
                let mut h = v2(1, 0x11, client4, s4, &[]);
                h[12] = 0x11;
                h
            }),
            expect: None,
        },
    ]
}

fn check(bed: &Bed, cases: &[Case]) {
    let conns: Vec<Conn> = cases.iter().map(|c| c.conn.clone()).collect();
    let answers = bed.client().run(&conns, 64, Duration::from_secs(20));
    for (case, answer) in cases.iter().zip(answers) {
        match (&case.expect, answer) {
            (Some(expect), Ok(answer)) => {
                assert_eq!(String::from_utf8_lossy(&answer).trim_end(), expect, "{}", case.name)
            }
            (Some(_), Err(e)) => panic!("{}: {e}", case.name),
            (None, Ok(answer)) => {
                assert!(answer.is_empty(), "{}: refused, yet answered {answer:?}", case.name)
            }
            (None, Err(e)) => assert!(e.contains("reset"), "{}: {e}", case.name),
        }
    }
}

fn required() -> Config {
    Config::new(policy()).proxy_protocol(ProxyProtocol::Required).proxy_timeout(Duration::from_millis(800))
}

fn assert_counted(stats: StatsSnapshot) {
    assert_eq!((stats.proxy_v1, stats.proxy_v2, stats.proxy_local), (2, 3, 1), "{stats}");
    assert_eq!((stats.proxy_untrusted, stats.proxy_malformed), (1, 3), "{stats}");
}

#[test]
fn std_required() {
    require_root!();
    let bed = Bed::new("proxy-std");
    let listener = bed.ns.run(|| ToaListener::bind("[::]:8090", required())).unwrap();
    let server = serve_std(listener, Instant::now() + Duration::from_secs(8));
    check(&bed, &cases(8090));
    assert_counted(server.join().unwrap());
}

#[test]
fn tokio_required() {
    require_root!();
    let bed = Bed::new("proxy-tokio");
    let listener = bed.listen("[::]:8091".parse().unwrap());
    let server = serve_tokio(listener, required(), Instant::now() + Duration::from_secs(8));
    check(&bed, &cases(8091));
    assert_counted(server.join().unwrap());
}

#[test]
fn optional_serves_direct_clients_and_refuses_strangers_headers() {
    require_root!();
    let bed = Bed::new("proxy-opt");
    let config = Config::new(policy()).proxy_protocol(ProxyProtocol::Optional);
    let listener = bed.ns.run(|| ToaListener::bind("192.0.2.10:8092", config)).unwrap();
    let server = serve_std(listener, Instant::now() + Duration::from_secs(6));
    let s4 = sock(SERVER_V4, 8092);
    let header = v1("PROXY TCP4 203.0.113.7 192.0.2.10 40000 80");
    let cases = vec![
        Case {
            name: "trusted, no header",
            conn: with(sock(LB_V4, 22001), s4, b"GET / HTTP/1.0\n".to_vec()),
            expect: Some(
                "client=100.125.0.1:22001 lb=100.125.0.1:22001 source=none authority= data=GET / HTTP/1.0"
                    .into(),
            ),
        },
        Case {
            name: "untrusted, no header",
            conn: with(sock(STRANGER_V4, 22002), s4, b"PROXIMA\n".to_vec()),
            expect: Some(
                "client=198.51.100.9:22002 lb=198.51.100.9:22002 source=none authority= data=PROXIMA".into(),
            ),
        },
        Case {
            name: "untrusted, with a header",
            conn: with(sock(STRANGER_V4, 22003), s4, [header.clone(), b"x\n".to_vec()].concat()),
            expect: None,
        },
        Case {
            name: "trusted, with a header",
            conn: with(sock(LB_V4, 22004), s4, [header, b"x\n".to_vec()].concat()),
            expect: Some(
                "client=203.0.113.7:40000 lb=100.125.0.1:22004 source=proxy-v1 authority= data=x".into(),
            ),
        },
    ];
    check(&bed, &cases);
    let stats = server.join().unwrap();
    assert_eq!((stats.proxy_absent, stats.proxy_untrusted, stats.proxy_v1), (2, 1, 1), "{stats}");
}

/// A peer that sends half a header and stalls is closed at the timeout;
/// meanwhile 200 others are served (tokio: a task each; std: a thread each).
#[test]
fn a_slow_sender_delays_no_one() {
    require_root!();
    for tokio in [false, true] {
        let bed = Bed::new(if tokio { "proxy-slow-t" } else { "proxy-slow-s" });
        let config = required().proxy_timeout(Duration::from_secs(2));
        let until = Instant::now() + Duration::from_secs(8);
        let server = if tokio {
            serve_tokio(bed.listen("192.0.2.10:8093".parse().unwrap()), config, until)
        } else {
            serve_std(bed.ns.run(|| ToaListener::bind("192.0.2.10:8093", config)).unwrap(), until)
        };
        let s4 = sock(SERVER_V4, 8093);
        let header = v2(1, 0x11, "203.0.113.7:40000".parse().unwrap(), s4, &[]);
        let mut conns = vec![with(sock(LB_V4, 23000), s4, header[..10].to_vec())];
        for i in 1..=200u16 {
            let client =
                format!("PROXY TCP4 203.0.{}.{} 192.0.2.10 {} 80", 113 + i / 250, i % 250 + 1, 30000 + i);
            conns.push(with(sock(LB_V4, 23000 + i), s4, [v1(&client), b"hi\n".to_vec()].concat()));
        }
        let started = Instant::now();
        let answers = bed.client().run(&conns, 256, Duration::from_secs(10));
        for (i, answer) in answers.iter().enumerate().skip(1) {
            let text =
                String::from_utf8_lossy(answer.as_ref().unwrap_or_else(|e| panic!("connection {i}: {e}")))
                    .into_owned();
            let i = i as u16;
            let client = format!("203.0.{}.{}:{}", 113 + i / 250, i % 250 + 1, 30000 + i);
            assert!(text.starts_with(&format!("client={client} ")), "tokio={tokio} connection {i}: {text}");
        }
        // The stalled one is closed after the timeout, not before.
        assert!(answers[0].as_ref().map_or(true, |a| a.is_empty()), "{:?}", answers[0]);
        assert!(started.elapsed() >= Duration::from_secs(2), "the half header was closed before its timeout");
        let stats = server.join().unwrap();
        assert_eq!((stats.proxy_v1, stats.proxy_timeout), (200, 1), "tokio={tokio}: {stats}");
    }
}
