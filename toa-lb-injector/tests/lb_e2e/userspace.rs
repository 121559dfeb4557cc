//! What only the user-space datapaths have: the pnet fallback, and the
//! offload check that keeps them from running on frames they cannot handle.

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use toa_testkit::netns::run_in;
use toa_testkit::require_root;

use super::{
    Case, DEAD_BACKEND, Dp, UDP_VIP, VIP, ask, ask_udp, ask_vip, config_text, connect_through_start,
    ctl_output, leftovers, start_lb, start_lb_text,
};

/// The pnet fallback datapath (`datapath = "pnet"`) serves the same: TOA over
/// IPv4 and IPv6, and UDP.
#[test]
fn pnet_fallback_serves() {
    require_root!();
    let case = Case::new("p", Dp::Pnet);
    let bed = &case.bed;
    let _lb = start_lb(&case, "toa");
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} lb=100.125.1.")), "{line}");
    let (local, line) = ask_vip(bed, "[2001:db8:c::10]:80");
    assert!(line.contains(&format!(" client={local} lb=[2001:db8:64::1:1]:")), "{line}");
    let echoed = run_in(&bed.ns("client"), || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect(UDP_VIP).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut buf = [0u8; 64];
        (0..10).find_map(|_| {
            socket.send(b"ping").unwrap();
            socket.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
        })
    });
    assert_eq!(echoed.as_deref(), Some(&b"ping"[..]));
}

/// The first datagram to a backend the ring has not heard from yet (no
/// health checks, nothing sent before: its MAC is unknown) waits for the
/// backend's ARP answer and goes on, instead of being lost: UDP would not
/// send it again (TCP would, a second later). One datagram, no retry.
#[test]
fn ring_holds_the_first_datagram_until_the_backend_answers_arp() {
    require_root!();
    let case = Case::new("a", Dp::Ring);
    let text = config_text("off", Dp::Ring.config())
        .replace(&format!("[[listener.backend]]\naddress = \"{DEAD_BACKEND}\"\n\n"), "");
    let health = text.lines().find(|l| l.starts_with("health = ")).unwrap().to_owned();
    let text = text.replace(&health, "health = { enabled = false }");
    let _lb = start_lb_text(&case, "quiet", &text);
    let (local, replies) = ask_udp(&case.bed, UDP_VIP, 1);
    assert_eq!(replies.len(), 1, "{local}: {replies:?}");
}

/// On a testbed with offloads on, the ring datapath refuses to start, naming
/// the `ethtool -K` command, and leaves nothing behind; with
/// `offloads = "disable"` it turns them off on its interfaces and says so.
#[test]
fn ring_checks_offloads() {
    require_root!();
    let case = Case::new("o", Dp::Kernel); // offloads on
    let config = case.dir.join("ring.toml");
    let run = |extra: &str| {
        std::fs::write(&config, super::config_text("toa", &format!("datapath = \"ring\"\n{extra}"))).unwrap();
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &case.bed.ns("lb"),
                "timeout",
                "3",
                env!("CARGO_BIN_EXE_toa-lb"),
                "run",
                "--config",
            ])
            .arg(&config)
            .arg("--socket")
            .arg(case.dir.join("ctl.sock"))
            .output()
            .unwrap()
    };
    let out = run("");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("offloads are on (lb-c: tx tso gso"), "{err}");
    assert!(err.contains("ethtool -K lb-c tx off tso off gso off"), "{err}");
    assert!(err.contains("(and the same on each veth's peer)"), "{err}");
    assert_eq!(leftovers(&case.bed), Vec::<String>::new());

    // Told to, it turns them off (and runs until `timeout` stops it).
    let out = run("offloads = \"disable\"\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("offloads turned off for the ring datapath"), "{err}");
    let features = Command::new("ip")
        .args(["netns", "exec", &case.bed.ns("lb"), "ethtool", "-k", "lb-c"])
        .output()
        .unwrap();
    let features = String::from_utf8_lossy(&features.stdout);
    assert!(
        features.contains("tx-checksumming: off") && features.contains("generic-segmentation-offload: off"),
        "{features}"
    );
}

/// UOA on the ring datapath: a UDP listener with `obtain_client_ip = "uoa"`
/// (`ipo`, which an unmodified backend's IP stack accepts) echoes as
/// before, and the first 3 datagrams of the flow reach the backend carrying
/// the client, as `toa-shim inspect` decodes them on the backend's link;
/// (UOA on the kernel datapath, and to unmodified servers: `uoa.rs`).
#[test]
fn ring_writes_uoa() {
    require_root!();
    let case = Case::new("o", Dp::Ring);
    let bed = &case.bed;
    let text = config_text("toa", Dp::Ring.config()).replacen(
        &format!("vip = \"{UDP_VIP}\"\nprotocol = \"udp\"\n"),
        &format!(
            "vip = \"{UDP_VIP}\"\nprotocol = \"udp\"\nobtain_client_ip = \"uoa\"\nuoa_format = \"ipo\"\n"
        ),
        1,
    );
    assert!(text.contains("uoa_format"), "the UDP listener block moved");
    // And a listener whose backend is a Rust UoaSocket (no helper: ipo through IP_RECVOPTS).
    let text = format!(
        "{text}\n[[listener]]\nvip = \"203.0.113.10:54\"\nprotocol = \"udp\"\nobtain_client_ip = \"uoa\"\nuoa_format = \"ipo\"\n\n[[listener.backend]]\naddress = \"100.125.2.1:5354\"\n"
    );
    let _lb = start_lb_text(&case, "uoa", &text);
    // Watch the backend's link while the client sends 5 datagrams.
    let toa_shim = std::path::Path::new(env!("CARGO_BIN_EXE_toa-lb")).with_file_name("toa-shim");
    assert!(toa_shim.exists(), "{} is not built (cargo build -p toa-server-shim)", toa_shim.display());
    let (client, echoes, capture) = std::thread::scope(|scope| {
        let capture = scope.spawn(|| {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &bed.ns("be1"),
                    toa_shim.to_str().unwrap(),
                    "inspect",
                    "--iface",
                    "b0",
                ])
                .args(["--json", "--timeout", "4s", "--trust", "100.125.0.0/16"])
                .output()
                .expect("toa-shim inspect")
        });
        std::thread::sleep(Duration::from_millis(500));
        let (client, echoes) = run_in(&bed.ns("client"), || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.connect(UDP_VIP).unwrap();
            socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            let mut buf = [0u8; 64];
            let mut echoes = 0;
            for i in 0..5u8 {
                socket.send(&[b'p', i]).unwrap();
                if socket.recv(&mut buf).is_ok_and(|n| buf[..n] == [b'p', i]) {
                    echoes += 1;
                }
            }
            (socket.local_addr().unwrap(), echoes)
        });
        (client, echoes, capture.join().expect("capture thread"))
    });
    assert_eq!(echoes, 5, "every datagram echoed through the LB");
    let seen = String::from_utf8_lossy(&capture.stdout).into_owned();
    let carried = format!(r#""uoa":[{{"format":"ipo","addr":"{client}"}}],"trusted":true"#);
    assert_eq!(seen.lines().filter(|l| l.contains(&carried)).count(), 3, "{seen}");
    let out = ctl_output(&case.dir, "stats");
    let stats = String::from_utf8_lossy(&out.stdout).into_owned();
    let udp = stats.lines().find(|l| l.starts_with(&format!("udp/{UDP_VIP} "))).expect("udp stats");
    assert!(udp.contains(" uoa_injected=3 "), "{udp}");

    // A UoaSocket backend names the client in every datagram of the flow (3
    // carried a UOA, the rest are remembered), and its replies, sent to the
    // client, reach it through the LB.
    let policy = toa_server_shim::TrustPolicy::new("100.125.0.0/16".parse().unwrap()).unwrap();
    let socket =
        run_in(&bed.ns("be1"), || toa_server_shim::uoa::UoaSocket::bind("100.125.2.1:5354", policy)).unwrap();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        for _ in 0..5 {
            let (_, peer) = socket.recv_from(&mut buf).unwrap();
            let reply = format!("{} {}", peer.client, peer.source);
            socket.send_to(reply.as_bytes(), peer.client).unwrap();
        }
        let stats = socket.stats();
        // Then an echo server, until 2 s of silence: the clients it saw.
        socket.get_ref().set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut clients = std::collections::BTreeSet::new();
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            clients.insert(peer.client);
            socket.send_to(&buf[..n], peer.client).unwrap();
        }
        (stats, clients)
    });
    let (client, replies) = ask_udp(bed, "203.0.113.10:54", 5);
    assert_eq!(replies, vec![format!("{client} uoa"); 5]);
    // 1,000 datagrams of 1 byte up to the MTU, byte for byte, from one more client.
    let (echoed_client, good) = super::uoa::exchange(&case, "203.0.113.10:54", 1000, 1472);
    assert_eq!(good, 1000, "every datagram echoed by the UoaSocket through the LB");
    let (stats, clients) = server.join().unwrap();
    assert_eq!((stats.received, stats.uoa, stats.remembered), (5, 3, 2), "{stats:?}");
    assert_eq!(clients.into_iter().collect::<Vec<_>>(), [echoed_client], "every datagram named its client");
}

/// A ring LB that starts while clients are already sending (their neighbour
/// caches still know the VIP, as after a restart) answers every connection
/// that completes its handshake. Its workers' rings take no frame until the
/// fanout groups are whole and steered: before, the SYNs that came in while
/// they formed went to worker 0, whose engine made their flows, so the
/// client's connect succeeded while its handshake ACK went to another worker
/// and was dropped there, again and again: connected, never answered. (The
/// engines now also refuse a new flow whose client port steers elsewhere,
/// `dropped_wrong_engine`: none may be counted here.)
#[test]
fn ring_started_under_traffic_answers_every_connection() {
    require_root!();
    let case = Case::new("g", Dp::Ring);
    let (_lb, outcomes) = connect_through_start(&case);
    assert!(outcomes.silent.is_empty() && outcomes.refused == 0, "{outcomes}");
    assert!(outcomes.answered.len() >= super::MIN_ANSWERED_THROUGH_START, "{outcomes}");
    // Nor did a SYN reach a worker that does not own it (the engines would
    // drop it, counted, and the client would wait a second for its retransmission).
    let stats = String::from_utf8(ctl_output(&case.dir, "stats").stdout).unwrap();
    let line = stats.lines().find(|l| l.starts_with(&format!("{VIP} "))).expect("the listener's stats");
    assert!(line.contains(" dropped_wrong_engine=0"), "{line}");
}
