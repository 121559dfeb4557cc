//! `toa-shim inspect` end to end: the real binary on the shipped captures,
//! hex input, and (as root) a live capture inside a network namespace.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn toa_shim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_toa-shim")).args(args).output().expect("run toa-shim")
}

fn capture(name: &str) -> String {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "examples", "captures", name].iter().collect();
    path.to_string_lossy().into_owned()
}

fn stdout_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect()
}

#[test]
fn pcap_json_golden() {
    let out =
        toa_shim(&["inspect", "--pcap", &capture("handshake-v4.pcap"), "--trust", "huawei-elb", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let toa = r#"[{"format":"toa","kind":254,"len":8,"addr":"203.0.113.7:40000"}]"#;
    assert_eq!(
        stdout_lines(&out),
        [
            format!(r#"{{"src":"100.125.0.1:40000","dst":"192.0.2.10:80","flags":"S","toa":{toa},"trusted":true}}"#),
            r#"{"src":"192.0.2.10:80","dst":"100.125.0.1:40000","flags":"SA","toa":[],"trusted":false}"#.to_owned(),
            format!(r#"{{"src":"100.125.0.1:40000","dst":"192.0.2.10:80","flags":"A","toa":{toa},"trusted":true}}"#),
            r#"{"src":"100.125.0.1:40000","dst":"192.0.2.10:80","flags":"PA","toa":[],"trusted":true}"#.to_owned(),
            r#"{"src":"198.51.100.9:40000","dst":"192.0.2.10:80","flags":"S","toa":[{"format":"toa","kind":254,"len":8,"addr":"203.0.113.66:1234"}],"trusted":false}"#.to_owned(),
            r#"{"error":"tcp option kind 254 at offset 44 has length 0 (minimum 2)","offset":44}"#.to_owned(),
        ],
        "UDP and ARP frames are skipped"
    );
}

#[test]
fn linux_cooked_v2_and_ipv6() {
    let out = toa_shim(&["inspect", "--pcap", &capture("handshake-v6.pcap"), "--json"]);
    assert!(out.status.success(), "{out:?}");
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 3);
    assert_eq!(
        lines[0],
        r#"{"src":"[2001:db8:64::1]:40000","dst":"[2001:db8:be::a]:80","flags":"S","toa":[{"format":"toa6","kind":254,"len":20,"addr":"[2001:db8:c::7]:40000"}],"trusted":false}"#,
        "no --trust: nothing is trusted"
    );
}

#[test]
fn pcapng_every_vendor_format() {
    let all = "toa,toa6,ali-v6,tencent,ali-cdn";
    let out = toa_shim(&["inspect", "--pcap", &capture("vendors.pcapng"), "--formats", all, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let lines = stdout_lines(&out);
    let expected = [
        r#""toa":[{"format":"toa","kind":254,"len":8,"addr":"203.0.113.7:40000"}]"#,
        r#""toa":[{"format":"toa6","kind":254,"len":20,"addr":"[2001:db8:c::7]:40000"}]"#,
        r#""toa":[{"format":"toa6","kind":254,"len":20,"addr":"[2001:db8:c::7]:40000"}]"#,
        r#""toa":[{"format":"ali-v6","kind":253,"len":20,"addr":"[2001:db8:c::7]:40000"}]"#,
        r#""toa":[{"format":"tencent","kind":200,"len":8,"addr":"203.0.113.7:40000"}]"#,
        r#""toa":[{"format":"ali-cdn","kind":28,"len":7,"addr":"203.0.113.7"}]"#,
        r#""toa":[{"format":"ali-cdn","kind":28,"len":19,"addr":"[2001:db8:c::7]"}]"#,
        r#""toa":[{"format":"toa","kind":254,"len":8,"addr":"203.0.113.7:40000"},{"format":"toa","kind":254,"len":8,"addr":"198.51.100.1:1"}]"#,
    ];
    assert_eq!(lines.len(), expected.len());
    for (line, toa) in lines.iter().zip(expected) {
        assert!(line.contains(toa), "{line} lacks {toa}");
    }
    // The default formats (toa, toa6) do not see the others.
    let out = toa_shim(&["inspect", "--pcap", &capture("vendors.pcapng"), "--json"]);
    let with_toa = stdout_lines(&out).iter().filter(|l| !l.contains(r#""toa":[]"#)).count();
    assert_eq!(with_toa, 4);
}

const SYN_WITH_TOA: &str = "45000030 00004000 40060000 647d0001 c000020a \
    9c400050 00000001 00000000 7002ffff 00000000 fe089c40 cb007107";

#[test]
fn hex_input() {
    let out = toa_shim(&["inspect", "--hex", SYN_WITH_TOA, "--trust", "100.125.0.0/16", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout_lines(&out),
        [
            r#"{"src":"100.125.0.1:40000","dst":"192.0.2.10:80","flags":"S","toa":[{"format":"toa","kind":254,"len":8,"addr":"203.0.113.7:40000"}],"trusted":true}"#
        ]
    );
    // Human output says what to do about it.
    let out = toa_shim(&["inspect", "--hex", SYN_WITH_TOA]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("toa 203.0.113.7:40000 (toa 254/8), UNTRUSTED"), "{text}");
}

/// UOA in both formats, as text and JSON; from a stranger, flagged.
#[test]
fn hex_uoa_both_formats() {
    use toa_core::uoa::{UoaFormat, insert_uoa};
    // IPv4 UDP 100.125.1.1:40000 -> 100.125.2.1:53, "ping".
    let datagram = [
        0x45u8, 0, 0, 32, 0, 0, 0x40, 0, 64, 17, 0, 0, 100, 125, 1, 1, 100, 125, 2, 1, 0x9c, 0x40, 0, 0x35,
        0, 12, 0, 0, b'p', b'i', b'n', b'g',
    ];
    let hex_of = |format: UoaFormat, client: &str| -> String {
        let mut buf = [0u8; 96];
        buf[..32].copy_from_slice(&datagram);
        let len = insert_uoa(&mut buf, 32, client.parse().unwrap(), format).unwrap();
        buf[..len].iter().map(|b| format!("{b:02x}")).collect()
    };
    let opp = hex_of(UoaFormat::Opp, "203.0.113.7:40000");
    let out = toa_shim(&["inspect", "--hex", &opp, "--json", "--trust", "huawei-elb"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout_lines(&out),
        [
            r#"{"src":"100.125.1.1:40000","dst":"100.125.2.1:53","uoa":[{"format":"opp","addr":"203.0.113.7:40000"}],"trusted":true}"#
        ]
    );
    let ipo = hex_of(UoaFormat::Ipo, "[2001:db8::7]:40000");
    let out = toa_shim(&["inspect", "--hex", &ipo, "--trust", "198.51.100.0/24"]);
    assert_eq!(
        stdout_lines(&out),
        [
            "100.125.1.1:40000 > 100.125.2.1:53 udp uoa [2001:db8::7]:40000 (ipo), UNTRUSTED source: a backend must ignore it"
        ]
    );
    // Plain UDP carries nothing to show.
    let plain: String = datagram.iter().map(|b| format!("{b:02x}")).collect();
    let out = toa_shim(&["inspect", "--hex", &plain]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn hex_malformed_exits_2() {
    // The toa claims 10 bytes; only 8 are left in the header.
    let bad = SYN_WITH_TOA.replace("fe089c40", "fe0a9c40");
    let out = toa_shim(&["inspect", "--hex", &bad, "--json"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        stdout_lines(&out),
        [
            r#"{"error":"tcp option kind 254 at offset 40 claims 10 bytes, only 8 left in the header","offset":40}"#
        ]
    );
    let out = toa_shim(&["inspect", "--hex", &bad]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("malformed packet (offset 40): "));

    for garbage in ["45 0", "zz", "4500"] {
        let out = toa_shim(&["inspect", "--hex", garbage]);
        assert_eq!(out.status.code(), Some(2), "{garbage}: {out:?}");
    }
}

#[test]
fn operator_errors_are_one_clear_line() {
    let out = toa_shim(&["inspect", "--pcap", "/nonexistent/capture.pcap"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read /nonexistent/capture.pcap"), "{err}");

    let out = toa_shim(&["inspect", "--pcap", env!("CARGO_MANIFEST_DIR")]);
    assert_eq!(out.status.code(), Some(1), "a directory is not a capture");

    let out = toa_shim(&["inspect", "--hex", SYN_WITH_TOA, "--trust", "100.125.0.0/40"]);
    assert_eq!(out.status.code(), Some(2), "clap rejects a bad CIDR");
    assert!(String::from_utf8_lossy(&out.stderr).contains("100.125.0.0/40"));

    let out = toa_shim(&["inspect", "--hex", SYN_WITH_TOA, "--formats", "toa,lvs"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown toa format"));

    let out = toa_shim(&["inspect", "--iface", "toa-no-such-if0", "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("toa-no-such-if0") && (err.contains("not found") || err.contains("root")), "{err}");
}

/// A network namespace that is deleted when dropped, also when the test fails.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("toa-t-{tag}-{}", std::process::id());
        run("ip", &["netns", "add", &name]);
        Netns(name)
    }

    fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.0];
        all.extend_from_slice(args);
        run("ip", &all);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().expect("spawn");
    assert!(status.success(), "{program} {args:?} failed");
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Live capture: frames sent on one end of a veth pair inside a private
/// namespace are decoded on the other end. Nothing leaves the namespace.
#[test]
fn live_capture_in_a_namespace() {
    if !is_root() {
        eprintln!("SKIP live_capture_in_a_namespace: needs root (network namespaces, AF_PACKET)");
        return;
    }
    let ns = Netns::new("inspect");
    ns.exec(&["ip", "link", "add", "toa-a", "type", "veth", "peer", "name", "toa-b"]);
    ns.exec(&["ip", "link", "set", "toa-a", "up"]);
    ns.exec(&["ip", "link", "set", "toa-b", "up"]);
    // Keep IPv6 autoconfiguration quiet so the capture sees only our frames.
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);

    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_toa-shim"), "inspect", "--iface", "toa-b"])
        .args(["--count", "2", "--timeout", "20s", "--json", "--trust", "huawei-elb"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn toa-shim");
    // Wait until the socket is open.
    let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("read stderr");
    assert!(line.contains("capturing on toa-b (not promiscuous)"), "{line}");

    // Send two Ethernet frames on toa-a from a thread inside the namespace:
    // a SYN with a TOA and a UDP datagram (which inspect skips).
    let ns_path = format!("/run/netns/{}", ns.0);
    let sender = std::thread::spawn(move || {
        let file = std::fs::File::open(&ns_path).expect("open netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let iface = pnet_datalink_iface("toa-a");
        let mut syn = vec![0xff; 6];
        syn.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
        let ip = hex(SYN_WITH_TOA);
        syn.extend_from_slice(&ip);
        let mut udp = syn[..14].to_vec();
        udp.extend_from_slice(&hex(
            "45000020 00004000 40110000 647d0001 c000020a 14e90035 000c0000 00000000",
        ));
        send_frames(&iface, &[udp, syn.clone(), syn]);
    });
    sender.join().expect("sender thread");

    let out = child.wait_with_output().expect("toa-shim exits after --count 2");
    assert!(out.status.success(), "{out:?}");
    let expected = r#"{"src":"100.125.0.1:40000","dst":"192.0.2.10:80","flags":"S","toa":[{"format":"toa","kind":254,"len":8,"addr":"203.0.113.7:40000"}],"trusted":true}"#;
    assert_eq!(stdout_lines(&out), [expected, expected]);
}

fn hex(text: &str) -> Vec<u8> {
    toa_server_shim::inspect::parse_hex(text).expect("valid hex")
}

fn pnet_datalink_iface(name: &str) -> pnet_datalink::NetworkInterface {
    pnet_datalink::interfaces().into_iter().find(|i| i.name == name).expect("interface in namespace")
}

fn send_frames(iface: &pnet_datalink::NetworkInterface, frames: &[Vec<u8>]) {
    let config = pnet_datalink::Config { promiscuous: false, ..Default::default() };
    let Ok(pnet_datalink::Channel::Ethernet(mut tx, _rx)) = pnet_datalink::channel(iface, config) else {
        panic!("open AF_PACKET channel on {}", iface.name);
    };
    for frame in frames {
        tx.send_to(frame, None).expect("queued").expect("sent");
        std::thread::sleep(Duration::from_millis(20));
    }
}
