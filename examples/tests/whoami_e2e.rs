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
fn whoami_refuses_to_start_without_trust() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_whoami"))
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .expect("run whoami");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no trusted load balancer configured") && err.contains("--trust-any"), "{err}");
}
