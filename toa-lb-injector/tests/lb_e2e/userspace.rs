//! What only the user-space datapaths have: the pnet fallback, and the
//! offload check that keeps them from running on frames they cannot handle.

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use toa_testkit::netns::run_in;
use toa_testkit::require_root;

use super::{Case, Dp, UDP_VIP, ask, ask_vip, leftovers, start_lb};

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
