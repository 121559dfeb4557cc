//! `ToaListener` end to end: a raw client on the LB end of a private testbed
//! sends real handshakes with TOA options where each case wants them; the
//! listener (std or tokio, IPv4, IPv6 or dual-stack) names the client.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::Duration;

use toa_core::{Format, Toa};
use toa_server_shim::{Config, Mode, StatsSnapshot, TcpListenerExt, ToaListener, TrustPolicy};
use toa_testkit::bed::{Bed, LB_V4, LB_V6, SERVER_V4, SERVER_V6, STRANGER_V4, sock};
use toa_testkit::rawtcp::Conn;
use toa_testkit::require_root;

fn policy() -> TrustPolicy {
    let sources = ["huawei-elb", "2001:db8:64::/48"].iter().map(|s| s.parse().unwrap()).collect();
    TrustPolicy::new(sources).unwrap()
}

/// The saved-SYN path alone (`auto` would add capture mode as root).
fn saved_syn() -> Config {
    Config::new(policy()).mode(Mode::SavedSyn)
}

fn toa(format: Format, addr: &str) -> Toa {
    Toa::new(format, addr.parse().unwrap()).unwrap()
}

/// One case: a connection and the line whoami must answer with.
struct Case {
    name: &'static str,
    conn: Conn,
    expect: String,
}

/// Serves `n` connections on a std listener, each answered with its PeerInfo line.
fn serve_std(listener: ToaListener, n: usize) -> std::thread::JoinHandle<StatsSnapshot> {
    std::thread::spawn(move || {
        for _ in 0..n {
            let (mut stream, peer) = listener.accept().expect("accept");
            let _ = writeln!(stream, "{peer}");
        }
        listener.stats()
    })
}

/// Serves `n` connections on the tokio listener; returns once it is ready
/// (TCP_SAVE_SYN set), so that no SYN of the test arrives before.
fn serve_tokio(listener: TcpListener, config: Config, n: usize) -> std::thread::JoinHandle<StatsSnapshot> {
    serve_tokio_in(None, listener, config, n)
}

/// The same, the listener made inside the network namespace `netns` (capture
/// mode's packet socket sees the namespace it was opened in).
fn serve_tokio_in(
    netns: Option<String>,
    listener: TcpListener,
    config: Config,
    n: usize,
) -> std::thread::JoinHandle<StatsSnapshot> {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let serve = move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            serve_tokio_body(runtime, listener, config, n, ready_tx)
        };
        match netns {
            Some(name) => toa_testkit::netns::run_in(&name, serve),
            None => serve(),
        }
    });
    ready.recv().expect("the tokio listener starts");
    handle
}

fn serve_tokio_body(
    runtime: tokio::runtime::Runtime,
    listener: TcpListener,
    config: Config,
    n: usize,
    ready_tx: std::sync::mpsc::Sender<()>,
) -> StatsSnapshot {
    {
        runtime.block_on(async move {
            use tokio::io::AsyncWriteExt;
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let listener = toa_server_shim::tokio::ToaListener::from_tokio(listener, config).unwrap();
            ready_tx.send(()).unwrap();
            for _ in 0..n {
                let (mut stream, peer) = listener.accept().await.expect("accept");
                let _ = stream.write_all(format!("{peer}\n").as_bytes()).await;
            }
            listener.stats()
        })
    }
}

/// The cases for a listener at `server`; `dual` when it is `[::]` and v4 clients come mapped.
fn cases(server: SocketAddr, dual: bool) -> Vec<Case> {
    let v6 = server.is_ipv6() && !dual;
    let (lb_ip, client_toa, client) = if v6 {
        (IpAddr::V6(LB_V6), toa(Format::Toa6, "[2001:db8:c::7]:40000"), "[2001:db8:c::7]:40000".to_owned())
    } else {
        let client = if dual { "[::ffff:203.0.113.7]:40000" } else { "203.0.113.7:40000" };
        (IpAddr::V4(LB_V4), toa(Format::Toa, "203.0.113.7:40000"), client.to_owned())
    };
    let server = if dual { sock(SERVER_V4, server.port()) } else { server };
    let shown = |addr: SocketAddr| -> String {
        match (addr.ip(), dual) {
            (IpAddr::V4(ip), true) => format!("[{}]:{}", ip.to_ipv6_mapped(), addr.port()),
            _ => addr.to_string(),
        }
    };
    let lb = |port| sock(lb_ip, port);
    let direct = |addr: SocketAddr| format!("client={0} lb={0} source=none", shown(addr));
    let via = |client: &str, port| format!("client={client} lb={} source=saved-syn", shown(lb(port)));
    // The second TOA is an 8-byte `toa` either way: two toa6 would not fit beside the MSS.
    let other = toa(Format::Toa, "198.51.100.1:1");
    let mut malformed = Conn::new(lb(10005), server);
    malformed.syn_options = vec![254, 0, 0, 0];
    let mut list = vec![
        Case {
            name: "toa in syn",
            conn: Conn::new(lb(10001), server).toa_in_syn(&client_toa),
            expect: via(&client, 10001),
        },
        Case {
            name: "toa in syn and ack",
            conn: Conn::new(lb(10002), server).toa_in_syn(&client_toa).toa_in_ack(&client_toa),
            expect: via(&client, 10002),
        },
        Case {
            name: "toa in the ack only: the saved syn cannot see it",
            conn: Conn::new(lb(10003), server).toa_in_ack(&client_toa),
            expect: direct(lb(10003)),
        },
        Case { name: "no toa", conn: Conn::new(lb(10004), server), expect: direct(lb(10004)) },
        Case { name: "malformed option in the syn", conn: malformed, expect: direct(lb(10005)) },
        Case {
            name: "two toas: the first wins",
            conn: Conn::new(lb(10006), server).toa_in_syn(&client_toa).toa_in_syn(&other),
            expect: via(&client, 10006),
        },
    ];
    if !v6 {
        let stranger = sock(STRANGER_V4, 10007);
        list.push(Case {
            name: "toa from an untrusted source is ignored",
            conn: Conn::new(stranger, server).toa_in_syn(&client_toa),
            expect: direct(stranger),
        });
    }
    list
}

/// Runs `cases` through the raw client and checks every answer.
fn check(bed: &Bed, cases: &[Case]) {
    let conns: Vec<Conn> = cases.iter().map(|c| c.conn.clone()).collect();
    let answers = bed.client().run(&conns, 64, Duration::from_secs(20));
    for (case, answer) in cases.iter().zip(answers) {
        let answer = answer.unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(String::from_utf8_lossy(&answer).trim_end(), case.expect, "{}", case.name);
    }
}

#[test]
fn std_ipv4() {
    require_root!();
    let bed = Bed::new("shim-v4");
    let server = sock(SERVER_V4, 8080);
    let listener = bed.listen(server).with_toa(saved_syn()).unwrap();
    let cases = cases(server, false);
    let served = serve_std(listener, cases.len());
    check(&bed, &cases);
    let stats = served.join().unwrap();
    assert_eq!((stats.accepted, stats.toa, stats.absent, stats.malformed, stats.untrusted), (7, 3, 2, 1, 1));
}

#[test]
fn std_ipv6() {
    require_root!();
    let bed = Bed::new("shim-v6");
    let server = sock(SERVER_V6, 8080);
    let listener = bed.listen(server).with_toa(saved_syn()).unwrap();
    let cases = cases(server, false);
    let served = serve_std(listener, cases.len());
    check(&bed, &cases);
    assert_eq!(served.join().unwrap().toa, 3);
}

#[test]
fn std_dual_stack_maps_v4_toa() {
    require_root!();
    let bed = Bed::new("shim-dual");
    let listener = bed.listen("[::]:8080".parse().unwrap()).with_toa(saved_syn()).unwrap();
    let cases = cases("[::]:8080".parse().unwrap(), true);
    let served = serve_std(listener, cases.len());
    check(&bed, &cases);
    served.join().unwrap();
}

#[test]
fn tokio_ipv4_and_ipv6() {
    require_root!();
    let bed = Bed::new("shim-tokio");
    for server in [sock(SERVER_V4, 8081), sock(SERVER_V6, 8082)] {
        let cases = cases(server, false);
        let served = serve_tokio(bed.listen(server), saved_syn(), cases.len());
        check(&bed, &cases);
        assert_eq!(served.join().unwrap().toa, 3, "{server}");
    }
}

#[test]
fn v6_toa_on_a_v4_listener() {
    require_root!();
    let bed = Bed::new("shim-nat64");
    let server = sock(SERVER_V4, 8080);
    let listener = bed.listen(server).with_toa(saved_syn()).unwrap();
    let served = serve_std(listener, 1);
    let nat64 = toa(Format::Toa6, "[2001:db8:c::7]:40000");
    let conn = Conn::new(sock(LB_V4, 10001), server).toa_in_syn(&nat64);
    let answers = bed.client().run(&[conn], 1, Duration::from_secs(10));
    let line = String::from_utf8(answers[0].clone().unwrap()).unwrap();
    // The library keeps the IPv6 client (no sockaddr_in could), and counts it.
    assert_eq!(line.trim_end(), "client=[2001:db8:c::7]:40000 lb=100.125.0.1:10001 source=saved-syn");
    assert_eq!(served.join().unwrap().v6_on_v4, 1);
}

#[test]
fn a_thousand_concurrent_clients_std() {
    require_root!();
    many_clients(false);
}

#[test]
fn a_thousand_concurrent_clients_tokio() {
    require_root!();
    many_clients(true);
}

fn many_clients(tokio: bool) {
    many(tokio, Mode::SavedSyn, "saved-syn");
}

#[test]
fn capture_mode_a_thousand_concurrent_ack_only_toas_std() {
    require_root!();
    many(false, Mode::Capture, "capture");
}

#[test]
fn capture_mode_a_thousand_concurrent_ack_only_toas_tokio() {
    require_root!();
    many(true, Mode::Capture, "capture");
}

/// 1200 connections at once from one LB address, each naming its own
/// client: in the SYN for the saved SYN, in the handshake's ACK only for
/// capture mode (the ACK that completes the handshake must be in the packet
/// socket's queue when accept() returns the connection).
fn many(tokio: bool, mode: Mode, source: &str) {
    let bed = Bed::new("shim-many");
    let server = sock(SERVER_V4, 8080);
    const N: u16 = 1200;
    let config = Config::new(policy()).mode(mode);
    // The packet socket must be opened inside the namespace: bind there.
    let listener = bed.listen(server);
    let served = if tokio {
        serve_tokio_in(Some(bed.ns.name().to_owned()), listener, config, usize::from(N))
    } else {
        serve_std(bed.ns.run(|| listener.with_toa(config)).unwrap(), usize::from(N))
    };
    let conns: Vec<Conn> = (0..N)
        .map(|i| {
            let client = toa(Format::Toa, &format!("203.0.{}.{}:{}", 113 + i / 250, i % 250 + 1, 20000 + i));
            let conn = Conn::new(sock(LB_V4, 30000 + i), server);
            if mode == Mode::Capture { conn.toa_in_ack(&client) } else { conn.toa_in_syn(&client) }
        })
        .collect();
    let answers = bed.client().run(&conns, 400, Duration::from_secs(60));
    for (i, answer) in (0..N).zip(answers) {
        let line = String::from_utf8(answer.unwrap_or_else(|e| panic!("connection {i}: {e}"))).unwrap();
        let expected = format!(
            "client=203.0.{}.{}:{} lb=100.125.0.1:{} source={source}",
            113 + i / 250,
            i % 250 + 1,
            20000 + i,
            30000 + i
        );
        assert_eq!(line.trim_end(), expected);
    }
    let stats = served.join().unwrap();
    if mode == Mode::Capture {
        assert_eq!(stats.capture, u64::from(N), "{stats}");
        assert_eq!(stats.capture_dropped, 0, "{stats}");
    } else {
        assert_eq!(stats.toa, u64::from(N), "{stats}");
    }
}

/// Capture mode with the TOA in the first data segment (DPVS): seen when the
/// data is in before `accept()` returns, here by a server that accepts late.
#[test]
fn capture_mode_toa_in_data_for_a_late_accept() {
    require_root!();
    let bed = Bed::new("shim-capdata");
    let server = sock(SERVER_V4, 8080);
    let listener = bed.listen(server);
    let listener = bed.ns.run(|| listener.with_toa(Config::new(policy()).mode(Mode::Capture))).unwrap();
    let served = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let (mut stream, peer) = listener.accept().expect("accept");
        // Read the request first: a close with unread data is a reset.
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut line);
        let _ = stream.write_all(format!("{peer}\n").as_bytes());
        listener.stats()
    });
    let client = toa(Format::Toa, "203.0.113.7:40000");
    let conn = Conn::new(sock(LB_V4, 10100), server).toa_in_data(&client, b"hello\n");
    let answer = bed.client().run(&[conn], 1, Duration::from_secs(10)).remove(0).expect("answer");
    assert_eq!(
        String::from_utf8(answer).unwrap().trim_end(),
        "client=203.0.113.7:40000 lb=100.125.0.1:10100 source=capture"
    );
    assert_eq!(served.join().unwrap().capture, 1);
}
