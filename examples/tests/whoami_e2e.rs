//! The `whoami` binaries end to end, inside a private testbed: a raw client
//! on the LB end sends TOAs, the unmodified example programs name the client.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use toa_core::{Format, Toa};
use toa_testkit::bed::{Bed, LB_V4, LB_V6, SERVER_V4, SERVER_V6, sock};
use toa_testkit::rawtcp::Conn;
use toa_testkit::require_root;

/// A server process in the testbed, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `program` with `args` in the testbed and waits for its "listening" line.
fn start(bed: &Bed, program: &str, args: &[&str]) -> Server {
    let mut child = bed
        .ns
        .command(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn server");
    let mut line = String::new();
    BufReader::new(child.stderr.take().expect("piped")).read_line(&mut line).expect("read");
    assert!(line.contains("listening on"), "{program}: {line}");
    Server(child)
}

#[test]
fn whoami_std_and_tokio() {
    require_root!();
    let bed = Bed::new("whoami");
    let client = Toa::new(Format::Toa, "203.0.113.7:40000".parse().unwrap()).unwrap();
    for (runtime, port) in [("std", 8080), ("tokio", 8081)] {
        let listen = format!("{SERVER_V4}:{port}");
        let _server = start(
            &bed,
            env!("CARGO_BIN_EXE_whoami"),
            &["--listen", &listen, "--trust", "huawei-elb", "--runtime", runtime],
        );
        let conns = [
            Conn::new(sock(LB_V4, 11000), sock(SERVER_V4, port)).toa_in_syn(&client),
            Conn::new(sock(LB_V4, 11001), sock(SERVER_V4, port)),
        ];
        let answers = bed.client().run(&conns, 2, Duration::from_secs(10));
        let lines: Vec<String> =
            answers.into_iter().map(|a| String::from_utf8(a.expect(runtime)).unwrap()).collect();
        assert_eq!(
            lines,
            [
                "client=203.0.113.7:40000 lb=100.125.0.1:11000 source=saved-syn\n",
                "client=100.125.0.1:11001 lb=100.125.0.1:11001 source=none\n"
            ],
            "{runtime}"
        );
    }
}

#[test]
fn whoami_source_none_ignores_the_toa() {
    require_root!();
    let bed = Bed::new("whoami-none");
    let client = Toa::new(Format::Toa, "203.0.113.7:40000".parse().unwrap()).unwrap();
    let _server = start(
        &bed,
        env!("CARGO_BIN_EXE_whoami"),
        &["--listen", "192.0.2.10:8080", "--trust", "huawei-elb", "--source", "none"],
    );
    let conn = Conn::new(sock(LB_V4, 11000), sock(SERVER_V4, 8080)).toa_in_syn(&client);
    let answer = bed.client().run(&[conn], 1, Duration::from_secs(10)).remove(0).unwrap();
    assert_eq!(
        String::from_utf8(answer).unwrap(),
        "client=100.125.0.1:11000 lb=100.125.0.1:11000 source=none\n"
    );
}

#[test]
fn whoami_http_through_axum() {
    require_root!();
    let bed = Bed::new("whoami-http");
    let _server = start(
        &bed,
        env!("CARGO_BIN_EXE_whoami-http"),
        &["--listen", "[::]:8080", "--trust", "huawei-elb", "--trust", "2001:db8:64::/48"],
    );
    let request = b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n".to_vec();
    let v4 = Toa::new(Format::Toa, "203.0.113.7:40000".parse().unwrap()).unwrap();
    let v6 = Toa::new(Format::Toa6, "[2001:db8:c::7]:40000".parse().unwrap()).unwrap();
    let mut conns = [
        Conn::new(sock(LB_V4, 12000), sock(SERVER_V4, 8080)).toa_in_syn(&v4),
        Conn::new(sock(LB_V6, 12001), sock(SERVER_V6, 8080)).toa_in_syn(&v6),
    ];
    for conn in &mut conns {
        conn.request = request.clone();
    }
    let answers = bed.client().run(&conns, 2, Duration::from_secs(10));
    let bodies: Vec<String> = answers
        .into_iter()
        .map(|a| {
            let response = String::from_utf8(a.expect("http response")).unwrap();
            assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
            response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(
        bodies,
        [
            "client=[::ffff:203.0.113.7]:40000 lb=[::ffff:100.125.0.1]:12000 source=saved-syn\n",
            "client=[2001:db8:c::7]:40000 lb=[2001:db8:64::1]:12001 source=saved-syn\n",
        ]
    );
}

#[test]
fn whoami_proxy_protocol() {
    require_root!();
    let bed = Bed::new("whoami-proxy");
    let v2 = {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
        h.extend_from_slice(&[203, 0, 113, 8, 192, 0, 2, 10, 0x9c, 0x41, 0x1f, 0x90]);
        h
    };
    for (runtime, port) in [("std", 8082), ("tokio", 8083)] {
        let listen = format!("{SERVER_V4}:{port}");
        let args = [
            "--listen",
            &listen,
            "--trust",
            "huawei-elb",
            "--runtime",
            runtime,
            "--proxy-protocol",
            "required",
        ];
        let _server = start(&bed, env!("CARGO_BIN_EXE_whoami"), &args);
        let server = sock(SERVER_V4, port);
        let mut conns = [Conn::new(sock(LB_V4, 13000), server), Conn::new(sock(LB_V4, 13001), server)];
        conns[0].request = b"PROXY TCP4 203.0.113.7 192.0.2.10 40000 8080\r\n".to_vec();
        conns[1].request = v2.clone();
        let answers = bed.client().run(&conns, 2, Duration::from_secs(10));
        let lines: Vec<String> =
            answers.into_iter().map(|a| String::from_utf8(a.expect(runtime)).unwrap()).collect();
        assert_eq!(
            lines,
            [
                "client=203.0.113.7:40000 lb=100.125.0.1:13000 source=proxy-v1\n",
                "client=203.0.113.8:40001 lb=100.125.0.1:13001 source=proxy-v2\n",
            ],
            "{runtime}"
        );
    }
}

#[test]
fn whoami_http_x_forwarded_for() {
    require_root!();
    let bed = Bed::new("whoami-xff");
    let _server = start(
        &bed,
        env!("CARGO_BIN_EXE_whoami-http"),
        &["--listen", "192.0.2.10:8084", "--trust", "huawei-elb"],
    );
    let get = |xff: &str| format!("GET / HTTP/1.1\r\nHost: b\r\n{xff}Connection: close\r\n\r\n").into_bytes();
    let server = sock(SERVER_V4, 8084);
    let stranger = toa_testkit::bed::STRANGER_V4;
    let cases = [
        // An HTTP LB (trusted) appended the client it saw; a forged entry to its left is ignored.
        (
            sock(LB_V4, 14000),
            get("X-Forwarded-For: 192.0.2.66, 203.0.113.7\r\n"),
            "client=203.0.113.7:0 lb=100.125.0.1:14000 source=xff",
        ),
        // Two header lines, the right one a trusted hop.
        (
            sock(LB_V4, 14001),
            get("X-Forwarded-For: 203.0.113.9:5555\r\nX-Forwarded-For: 100.125.9.9\r\n"),
            "client=203.0.113.9:5555 lb=100.125.0.1:14001 source=xff",
        ),
        // From a stranger: the header is not believed.
        (
            sock(stranger, 14002),
            get("X-Forwarded-For: 203.0.113.7\r\n"),
            "client=198.51.100.9:14002 lb=198.51.100.9:14002 source=none",
        ),
        // Garbage: ignored.
        (
            sock(LB_V4, 14003),
            get("X-Forwarded-For: 203.0.113.7, <script>\r\n"),
            "client=100.125.0.1:14003 lb=100.125.0.1:14003 source=none",
        ),
    ];
    let conns: Vec<Conn> = cases
        .iter()
        .map(|(src, request, _)| {
            let mut conn = Conn::new(*src, server);
            conn.request = request.clone();
            conn
        })
        .collect();
    let answers = bed.client().run(&conns, 4, Duration::from_secs(10));
    for ((_, _, expect), answer) in cases.iter().zip(answers) {
        let response = String::from_utf8(answer.expect("http response")).unwrap();
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert_eq!(body.trim_end(), *expect, "{response}");
    }
}

/// Capture mode as an unprivileged user with only CAP_NET_RAW (setpriv, an
/// ambient capability): whoami on a dual-stack socket sees TOAs in the SYN
/// and in the handshake's ACK only, IPv4 and IPv6; an untrusted one is
/// ignored. (TOAs in data: listener_e2e, with a server that accepts late.)
#[test]
fn whoami_capture_mode_with_cap_net_raw_only() {
    require_root!();
    let bed = Bed::new("whoami-cap");
    let whoami = env!("CARGO_BIN_EXE_whoami");
    let trust = ["--trust", "huawei-elb", "--trust", "2001:db8:64::/48"];
    let mut args = vec![
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=+net_raw",
        "--ambient-caps=+net_raw",
        whoami,
        "--listen",
        "[::]:8085",
        "--source",
        "capture",
    ];
    args.extend(trust);
    let _server = start(&bed, "setpriv", &args);
    let v4 = Toa::new(Format::Toa, "203.0.113.7:40000".parse().unwrap()).unwrap();
    let v6 = Toa::new(Format::Toa6, "[2001:db8:c::7]:40000".parse().unwrap()).unwrap();
    let (s4, s6) = (sock(SERVER_V4, 8085), sock(SERVER_V6, 8085));
    let cases = [
        (
            Conn::new(sock(LB_V4, 15000), s4).toa_in_ack(&v4),
            "client=[::ffff:203.0.113.7]:40000 lb=[::ffff:100.125.0.1]:15000 source=capture",
        ),
        (
            Conn::new(sock(LB_V4, 15001), s4).toa_in_syn(&v4),
            "client=[::ffff:203.0.113.7]:40000 lb=[::ffff:100.125.0.1]:15001 source=saved-syn",
        ),
        (
            Conn::new(sock(LB_V6, 15002), s6).toa_in_ack(&v6),
            "client=[2001:db8:c::7]:40000 lb=[2001:db8:64::1]:15002 source=capture",
        ),
        (
            Conn::new(sock(LB_V4, 15004), s4),
            "client=[::ffff:100.125.0.1]:15004 lb=[::ffff:100.125.0.1]:15004 source=none",
        ),
        (
            Conn::new(sock(toa_testkit::bed::STRANGER_V4, 15005), s4).toa_in_ack(&v4),
            "client=[::ffff:198.51.100.9]:15005 lb=[::ffff:198.51.100.9]:15005 source=none",
        ),
    ];
    let conns: Vec<Conn> = cases.iter().map(|(c, _)| c.clone()).collect();
    let answers = bed.client().run(&conns, 8, Duration::from_secs(10));
    for ((_, expect), answer) in cases.iter().zip(answers) {
        assert_eq!(String::from_utf8(answer.expect(expect)).unwrap().trim_end(), *expect);
    }
}

#[test]
fn whoami_refuses_to_start_without_trust() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_whoami"))
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .expect("run whoami");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no trusted load balancer configured") && err.contains("--trust-any"), "{err}");
}
