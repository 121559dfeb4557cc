//! UOA to unmodified UDP servers: `toa-lb` (kernel and ring datapaths)
//! writes the client into the first datagrams of each flow, `opp` and
//! `ipo`, IPv4 and IPv6; the backend runs the kernel helper with UDP on (tc
//! ingress on its link, recvmsg/sendmsg/connect hooks on a cgroup), and
//! plain Python and socat echo servers in that cgroup see the client while
//! their replies still reach it through the LB.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use toa_server_shim::TrustPolicy;
use toa_server_shim::ebpf::{self, AttachOptions, UdpOptions};
use toa_testkit::cgroup::Cgroup;
use toa_testkit::netns::run_in;
use toa_testkit::require_root;

use super::{Case, Dp, ask_udp, config_text, ctl_output, start_lb_text};

/// The helper, detached on drop (also when the test fails).
struct Attached;

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = ebpf::detach();
    }
}

/// A server process, killed on drop, and the lines it printed.
struct Server {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `cmd`, keeps what it prints on stdout and stderr, and waits for
    /// a line containing `ready`.
    fn start(mut cmd: Command, ready: &str) -> Server {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn server");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for pipe in [Box::new(out) as Box<dyn std::io::Read + Send>, Box::new(err)] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let server = Server { child, lines };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.printed(ready) {
            assert!(Instant::now() < deadline, "no {ready:?} from the server: {:?}", server.lines());
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn printed(&self, text: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(text))
    }

    /// Whether the server prints `text` within 3 s: a server prints before
    /// it answers, but its output reaches us through a pipe and a thread, so
    /// an answer can come first.
    fn saw(&self, text: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(3);
        while !self.printed(text) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

/// An unmodified UDP echo server: `recvfrom`, then `sendto` the same bytes
/// to the address it got. Prints each new peer once, as "peer ADDR PORT".
const PYTHON_ECHO: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
if ":" in host:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind((host, port))
print("ready", flush=True)
seen = set()
while True:
    data, peer = s.recvfrom(65535)
    if peer[:2] not in seen:
        seen.add(peer[:2])
        print("peer", peer[0], peer[1], flush=True)
    s.sendto(data, peer)
"#;

/// The LB configuration: the test listeners with UOA, each to its own
/// backend port on be1 (at 100.125.2.1 and 2001:db8:64::2:1).
fn uoa_config(dp: Dp) -> String {
    let mut text = config_text("toa", dp.config());
    for (vip, format, backend) in [
        ("203.0.113.10:61", "opp", "100.125.2.1:5361"),
        ("203.0.113.10:62", "ipo", "100.125.2.1:5362"),
        ("[2001:db8:c::10]:61", "opp", "[2001:db8:64::2:1]:5361"),
        ("203.0.113.10:63", "opp", "100.125.2.1:5363"),
        ("203.0.113.10:64", "opp", "100.125.2.1:5364"),
        ("203.0.113.10:65", "opp", "100.125.2.1:5365"),
        ("[2001:db8:c::10]:65", "opp", "[2001:db8:64::2:1]:5365"),
        ("203.0.113.10:66", "opp", "100.125.2.1:5366"),
        ("203.0.113.10:67", "ipo", "100.125.2.1:5367"),
        ("203.0.113.10:68", "opp", "100.125.2.1:5368"),
    ] {
        text.push_str(&format!(
            "\n[[listener]]\nvip = \"{vip}\"\nprotocol = \"udp\"\nobtain_client_ip = \"uoa\"\nuoa_format = \"{format}\"\n\n[[listener.backend]]\naddress = \"{backend}\"\n"
        ));
    }
    text
}

/// Sends `count` datagrams of 1 byte up to `max` bytes (each different) to
/// `vip` from one socket of the client namespace; returns the socket's
/// address and how many replies came back byte for byte.
pub(super) fn exchange(case: &Case, vip: &str, count: usize, max: usize) -> (SocketAddr, usize) {
    let sizes: Vec<usize> = (0..count).map(|i| 1 + i * (max - 1) / (count - 1).max(1)).collect();
    let (client, good, empty) = exchange_sizes(case, vip, &sizes);
    assert_eq!(empty, 0, "an empty datagram came back");
    (client, good)
}

/// Sends datagrams of these sizes to `vip` from one socket of the client
/// namespace; returns the socket's address, how many replies came back byte
/// for byte, and how many empty ones came.
fn exchange_sizes(case: &Case, vip: &str, sizes: &[usize]) -> (SocketAddr, usize, usize) {
    run_in(&case.bed.ns("client"), || {
        let any = if vip.starts_with('[') { "[::]:0" } else { "0.0.0.0:0" };
        let socket = UdpSocket::bind(any).unwrap();
        socket.connect(vip).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = vec![0u8; 65536];
        let (mut good, mut empty) = (0, 0);
        for (i, &len) in sizes.iter().enumerate() {
            let sent: Vec<u8> = (0..len).map(|k| (k * 7 + i) as u8).collect();
            // UDP may lose a datagram on a busy machine: one more try after a
            // silence (the bytes compared are the same). A reply of an earlier
            // datagram that came late is skipped.
            'tries: for _ in 0..2 {
                socket.send(&sent).unwrap();
                loop {
                    match socket.recv(&mut buf) {
                        Ok(n) if buf[..n] == sent[..] => {
                            good += 1;
                            break 'tries;
                        }
                        Ok(0) => empty += 1,
                        Ok(_) => continue,
                        Err(_) => break,
                    }
                }
            }
        }
        (socket.local_addr().unwrap(), good, empty)
    })
}

/// The helper's status line for the UDP counters, parsed.
fn counter(name: &str) -> u64 {
    let status = ebpf::status().expect("status");
    let shown = status.to_string();
    let counters = shown.lines().find(|l| l.starts_with("counters: ")).unwrap_or_default().to_owned();
    counters
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {shown}"))
}

fn attach(case: &Case, cgroup: &Cgroup, flows: u32) -> Attached {
    let sources = ["100.125.1.0/24", "2001:db8:64::1:0/112"].iter().map(|s| s.parse().unwrap()).collect();
    let options = AttachOptions {
        cgroup: Some(cgroup.path().to_owned()),
        policy: TrustPolicy::new(sources).unwrap(),
        formats: toa_core::Formats::default(),
        udp: Some(UdpOptions { interfaces: vec!["b0".into()], flows }),
    };
    // In be1's network namespace: the tc program goes on its link b0.
    run_in(&case.bed.ns("be1"), || ebpf::attach(&options)).expect("attach the helper");
    Attached
}

/// The tc programs (TCX) at be1's b0 ingress.
fn b0_programs(case: &Case) -> Vec<String> {
    use aya::programs::SchedClassifier;
    use aya::programs::tc::TcAttachType;
    run_in(&case.bed.ns("be1"), || {
        let (_, programs) = SchedClassifier::query_tcx("b0", TcAttachType::Ingress).expect("query tcx");
        programs.iter().filter_map(|p| p.name_as_str().map(str::to_owned)).collect()
    })
}

/// An `ipo` UOA a forger writes itself: 203.0.113.99:40001.
const OWN_IPO: [u8; 8] = [0x1f, 8, 0x9c, 0x41, 203, 0, 113, 99];

/// A client socket at 203.0.113.2:`port` (in the client namespace), to the
/// UOA listener 203.0.113.10:62, sending [`OWN_IPO`] in its IP options.
fn own_ipo_client(port: u16) -> UdpSocket {
    let socket = UdpSocket::bind(("203.0.113.2", port)).unwrap();
    socket.connect("203.0.113.10:62").unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    toa_testkit::sys::set_ip_options(socket.as_fd(), &OWN_IPO).expect("IP_OPTIONS");
    socket
}

both! {
fn unmodified_udp_servers_see_uoa_clients(dp: Dp) {
    require_root!();
    let _lock = toa_testkit::helper_lock();
    if ebpf::is_attached() {
        eprintln!("SKIP: the kernel helper is attached on this machine; not touching it");
        return;
    }
    let case = Case::new("u", dp);
    let _lb = start_lb_text(&case, "uoa", &uoa_config(dp));
    let inside = Cgroup::new("uoa-in");
    let attached = attach(&case, &inside, ebpf::DEFAULT_UDP_FLOWS);
    assert_eq!(b0_programs(&case), ["toa_udp_ingress"]);
    let ns = case.bed.ns("be1");

    // Python on a dual-stack socket (recvmsg6/sendmsg6: IPv4 clients as
    // ::ffff:a.b.c.d), Python on an IPv4 socket (recvmsg4/sendmsg4), socat
    // that connect()s to its first peer (connect4) and then just writes.
    let dual = Server::start(inside.command_in(&ns, "python3", &["-c", PYTHON_ECHO, "::", "5361"]), "ready");
    let v4 =
        Server::start(inside.command_in(&ns, "python3", &["-c", PYTHON_ECHO, "0.0.0.0", "5362"]), "ready");
    let socat = Server::start(
        inside.command_in(&ns, "socat", &["-d", "-d", "UDP4-LISTEN:5363,bind=100.125.2.1", "PIPE"]),
        "listening on",
    );
    // The same Python outside the cgroup: it sees the LB.
    let mut outside = Command::new("ip");
    outside.args(["netns", "exec", &ns, "python3", "-c", PYTHON_ECHO, "0.0.0.0", "5364"]);
    let outside = Server::start(outside, "ready");

    let mtu = 1500;
    // (VIP, server, largest payload under the MTU, whether Python shows the client as ::ffff:a.b.c.d)
    for (vip, server, max, mapped) in [
        ("203.0.113.10:61", &dual, mtu - 28, true),
        ("[2001:db8:c::10]:61", &dual, mtu - 48, false),
        ("203.0.113.10:62", &v4, mtu - 28, false),
    ] {
        let (client, good) = exchange(&case, vip, 1000, max);
        assert_eq!(good, 1000, "{vip}: every reply, byte for byte, through the LB");
        let shown = format!("peer {}{} {}", if mapped { "::ffff:" } else { "" }, client.ip(), client.port());
        assert!(server.saw(&shown), "{vip}: recvfrom saw {:?}, not {client}", server.lines());
        assert!(
            !server.printed("peer 100.125.") && !server.printed("peer ::ffff:100.125."),
            "{:?}",
            server.lines()
        );
    }
    // Full-sized datagrams have no room for the UOA: the LB sends an empty
    // carrier ahead of each of a flow's first 3; the helper records and drops
    // it (the server never sees an empty datagram), and names the client.
    let carriers = counter("udp_carriers");
    for (vip, server, max, mapped) in [
        ("203.0.113.10:61", &dual, mtu - 28, true),
        ("203.0.113.10:62", &v4, mtu - 28, false),
        ("[2001:db8:c::10]:61", &dual, mtu - 48, false),
    ] {
        let (client, good, empty) = exchange_sizes(&case, vip, &[max; 5]);
        assert_eq!((good, empty), (5, 0), "{vip}: full-sized datagrams echoed, no empty one");
        let shown = format!("peer {}{} {}", if mapped { "::ffff:" } else { "" }, client.ip(), client.port());
        assert!(server.saw(&shown), "{vip}: recvfrom saw {:?}, not {client}", server.lines());
    }
    assert_eq!(counter("udp_carriers"), carriers + 9, "3 carriers per flow, dropped");

    let (client, good) = exchange(&case, "203.0.113.10:63", 100, mtu - 28);
    assert_eq!(good, 100, "socat, connected to the client (so to the LB), echoes");
    assert!(socat.saw(&format!("{client}")), "socat's recvfrom saw: {:?}", socat.lines());
    let (_, good) = exchange(&case, "203.0.113.10:64", 10, 100);
    assert_eq!(good, 10);
    assert!(outside.saw("peer 100.125.1."), "outside the cgroup: the LB, {:?}", outside.lines());
    assert!(counter("udp_found") >= 3 * 4, "3 UOAs per flow");
    assert!(counter("udp_stripped") >= 3 * 4, "opp headers removed");
    assert!(counter("udp_received") >= 3000 && counter("udp_sent") >= 3000);

    // A Rust UoaSocket outside the cgroup reads the helper's map: opp (which
    // never reaches a socket on its own) over IPv4 and IPv6, and its replies
    // to the client go to the LB.
    let lbs = ["100.125.0.0/16", "2001:db8:64::/64"].iter().map(|s| s.parse().unwrap()).collect();
    let socket =
        run_in(&ns, || toa_server_shim::uoa::UoaSocket::bind("[::]:5365", TrustPolicy::new(lbs).unwrap()))
            .unwrap();
    let uoa_server = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        for _ in 0..8 {
            let (_, peer) = socket.recv_from(&mut buf).unwrap();
            let reply = format!("{} {} {}", peer.client, peer.lb.ip(), peer.source);
            socket.send_to(reply.as_bytes(), peer.client).unwrap();
        }
        socket.stats()
    });
    for vip in ["203.0.113.10:65", "[2001:db8:c::10]:65"] {
        let (client, replies) = ask_udp(&case.bed, vip, 4);
        // As the dual-stack socket shows it: an IPv4 client as ::ffff:a.b.c.d.
        let client = match client {
            SocketAddr::V4(v4) => SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
            v6 => v6,
        };
        let lb = if vip.starts_with('[') { "2001:db8:64::1:1" } else { "::ffff:100.125.1." };
        for reply in &replies {
            assert!(reply.starts_with(&format!("{client} {lb}")) && reply.ends_with(" uoa"), "{reply}");
        }
    }
    let stats = uoa_server.join().unwrap();
    assert_eq!((stats.received, stats.helper), (8, 8), "{stats:?}");

    // A UoaSocket inside the cgroup (whoami --runtime udp): the kernel already
    // shows it the client, and the helper's map names the LB.
    let whoami = std::path::Path::new(env!("CARGO_BIN_EXE_toa-lb")).with_file_name("whoami");
    assert!(whoami.exists(), "{} is not built (cargo build -p toa-examples)", whoami.display());
    let _whoami = Server::start(
        inside.command_in(
            &ns,
            whoami.to_str().unwrap(),
            &["--listen", "0.0.0.0:5366", "--runtime", "udp", "--trust", "100.125.0.0/16"],
        ),
        "listening on",
    );
    let (client, replies) = ask_udp(&case.bed, "203.0.113.10:66", 4);
    for reply in &replies {
        assert!(reply.starts_with(&format!("client={client} lb=100.125.1.")) && reply.ends_with(" source=uoa\n"), "{reply:?}");
    }

    // A forged UOA from a source outside the trust list (the LB's own
    // 100.125.0.1, not its SNAT pool) is ignored and counted.
    let untrusted = counter("udp_untrusted");
    run_in(&case.bed.ns("lb"), || {
        let socket = UdpSocket::bind("100.125.0.1:0").unwrap();
        toa_testkit::sys::set_ip_options(socket.as_fd(), &OWN_IPO).expect("IP_OPTIONS");
        socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        socket.send_to(b"forged", "100.125.2.1:5362").unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = socket.recv_from(&mut buf).expect("an echo to the real source");
        assert_eq!(&buf[..n], b"forged");
    });
    assert_eq!(counter("udp_untrusted"), untrusted + 1);
    assert!(v4.saw("peer 100.125.0.1 "), "{:?}", v4.lines());
    assert!(!v4.printed("203.0.113.99"), "{:?}", v4.lines());

    // A client's own UOA, ipo (an IPv4 option) and opp (a raw protocol-248
    // datagram), is stripped by the LB: the server sees the client itself.
    let own = run_in(&case.bed.ns("client"), || {
        let socket = own_ipo_client(41234);
        socket.send(b"own-ipo").unwrap();
        toa_testkit::sys::set_ip_options(socket.as_fd(), &[]).unwrap();
        let raw = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::from(libc::SOCK_RAW), Some(socket2::Protocol::from(248)))
            .expect("a raw socket");
        // opp header (IPv4 client, next UDP, 12 bytes), the forged UOA, then UDP
        // 41234 -> 62 with no checksum (allowed over IPv4) and the payload.
        let mut opp = vec![0x10, 17, 0, 12];
        opp.extend_from_slice(&OWN_IPO);
        opp.extend_from_slice(&41234u16.to_be_bytes());
        opp.extend_from_slice(&62u16.to_be_bytes());
        opp.extend_from_slice(&15u16.to_be_bytes());
        opp.extend_from_slice(&[0, 0]);
        opp.extend_from_slice(b"own-opp");
        let vip: SocketAddr = "203.0.113.10:0".parse().unwrap();
        raw.send_to(&opp, &vip.into()).expect("send the opp datagram");
        let mut buf = [0u8; 64];
        let mut echoed = Vec::new();
        while let Ok(n) = socket.recv(&mut buf) {
            echoed.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            if echoed.len() == 2 {
                break;
            }
        }
        echoed
    });
    assert_eq!(own, ["own-ipo", "own-opp"], "both echoed through the LB");
    assert!(v4.saw("peer 203.0.113.2 41234"), "{:?}", v4.lines());
    assert!(!v4.printed("203.0.113.99"), "a client's own UOA reached the server: {:?}", v4.lines());
    if dp == Dp::Kernel {
        // The same ipo on a datagram the client's kernel fragments (the
        // options go in the first fragment): stripped there too (counted
        // below; before, it was not), and the datagram comes back whole.
        // This helper reads UOAs at tc ingress, before reassembly, and skips
        // fragments: it would not have believed it anyway, but a reader after
        // reassembly (DPVS's uoa.ko, at netfilter's LOCAL_IN) would. (The
        // user-space datapaths do not forward fragments.)
        let big: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let echoed = run_in(&case.bed.ns("client"), || {
            let socket = own_ipo_client(41235);
            socket.send(&big).unwrap();
            let mut buf = vec![0u8; 4096];
            let n = socket.recv(&mut buf).expect("the fragmented datagram echoed through the LB");
            buf.truncate(n);
            buf
        });
        assert!(echoed == big, "echoed {} bytes, not the 3000 sent", echoed.len());
        assert!(!v4.printed("203.0.113.99"), "a UOA in a first fragment reached the server: {:?}", v4.lines());
    }

    // The LB's counters: the flow of 1,000 datagrams got its 3 UOAs, the
    // full-sized flow 3 carriers instead, the own-UOA flow 2 after stripping
    // (the kernel datapath: and the fragmented one none, its forged one stripped).
    let stats = String::from_utf8_lossy(&ctl_output(&case.dir, "stats").stdout).into_owned();
    let line = stats.lines().find(|l| l.starts_with("udp/203.0.113.10:62 ")).expect("stats of :62").to_owned();
    let stripped = format!(" uoa_stripped={} ", if dp == Dp::Kernel { 3 } else { 2 });
    for counted in [" uoa_injected=5 ", &stripped, " uoa_no_room=3 ", " uoa_carriers=3 "] {
        assert!(line.contains(counted), "{counted}: {line}");
    }


    // Switched live: off, then uoa again; each applies to new flows.
    for (mode, named) in [("off", false), ("uoa", true)] {
        let out = ctl_output(&case.dir, &format!("set udp/203.0.113.10:62 obtain-client-ip {mode}"));
        assert!(out.status.success(), "{out:?}");
        let (client, good) = exchange(&case, "203.0.113.10:62", 5, 10);
        assert_eq!(good, 5, "{mode}");
        let stats = String::from_utf8_lossy(&ctl_output(&case.dir, "stats").stdout).into_owned();
        let line = stats.lines().find(|l| l.starts_with("udp/203.0.113.10:62 ")).unwrap_or_default().to_owned();
        let shown = if named { v4.saw(&format!("peer {} {}", client.ip(), client.port())) } else { v4.printed(&format!("peer {} {}", client.ip(), client.port())) };
        assert_eq!(shown, named, "{mode}, {client}: {:?}\nLB: {line}\nhelper: {:?}", v4.lines(), ebpf::status().map(|s| s.to_string()));
    }

    // Detached: no pins, no program on the link.
    drop(attached);
    assert!(!ebpf::is_attached(), "pins left under {}", ebpf::PIN_DIR);
    assert_eq!(b0_programs(&case), Vec::<String>::new());
}
}

/// A flood of new flows: the LRU map stays at its bound, and a client that
/// keeps talking all along is still served and still named.
#[test]
fn udp_flow_flood_stays_bounded() {
    require_root!();
    let _lock = toa_testkit::helper_lock();
    if ebpf::is_attached() {
        eprintln!("SKIP: the kernel helper is attached on this machine; not touching it");
        return;
    }
    let case = Case::new("f", Dp::Ring);
    let _lb = start_lb_text(&case, "uoa", &uoa_config(Dp::Ring));
    let inside = Cgroup::new("uoa-flood");
    let _attached = attach(&case, &inside, 1024);
    let ns = case.bed.ns("be1");
    let server =
        Server::start(inside.command_in(&ns, "python3", &["-c", PYTHON_ECHO, "0.0.0.0", "5361"]), "ready");

    let (real, served, flooded) = run_in(&case.bed.ns("client"), || {
        let real = UdpSocket::bind("0.0.0.0:0").unwrap();
        real.connect("203.0.113.10:61").unwrap();
        real.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        let (mut served, mut flooded) = (0, 0);
        for round in 0..50u32 {
            // 100 new flows, one datagram each, replies not awaited.
            for _ in 0..100 {
                let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
                if socket.send_to(b"flood", "203.0.113.10:61").is_ok() {
                    flooded += 1;
                }
            }
            real.send(&round.to_be_bytes()).unwrap();
            loop {
                match real.recv(&mut buf) {
                    Ok(4) if buf[..4] == round.to_be_bytes() => {
                        served += 1;
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
        (real.local_addr().unwrap(), served, flooded)
    });
    assert_eq!(flooded, 5000);
    assert_eq!(served, 50, "the real client got every reply through the LB");
    assert!(server.saw(&format!("peer {} {}", real.ip(), real.port())), "{:?}", &server.lines()[..3]);
    let udp = ebpf::status().expect("status").udp.expect("udp attached");
    assert!(udp.flows <= udp.max_flows && udp.max_flows >= 1024, "{udp:?}");
    assert!(udp.flows >= 512, "the map filled up to near its bound: {udp:?}");
    // UDP: a few of the flood's datagrams may be lost on the way (the LB's
    // ring, socket buffers); nearly all flows were recorded.
    let found = counter("udp_found");
    assert!(found >= 4500, "{found} of 5000 new flows recorded");
}

both! {
/// Carriers reach a backend without the helper and verify: a Rust UoaSocket
/// (`ipo`, through IP_RECVOPTS; the kernel drops a datagram whose UDP
/// checksum is wrong) records the client from each carrier and names it on
/// the full-sized datagram behind it, which arrives byte for byte. On the
/// kernel datapath, with the client's checksum offload on (the LB gets
/// CHECKSUM_PARTIAL datagrams) and off (finished checksums).
fn carriers_reach_a_backend_without_the_helper(dp: Dp) {
    require_root!();
    let case = Case::new("c", dp);
    let _lb = start_lb_text(&case, "uoa", &uoa_config(dp));
    let policy = TrustPolicy::new("100.125.0.0/16".parse().unwrap()).unwrap();
    let socket =
        run_in(&case.bed.ns("be1"), || toa_server_shim::uoa::UoaSocket::bind("100.125.2.1:5367", policy)).unwrap();
    socket.get_ref().set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut named = Vec::new();
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            named.push((peer.client, peer.source, n));
            socket.send_to(&buf[..n], peer.client).unwrap();
        }
        (named, socket.stats())
    });
    let offloads: &[&str] = if dp == Dp::Kernel { &["on", "off"] } else { &["off"] };
    let mut clients = Vec::new();
    for tx in offloads {
        let mut result = None;
        let mut send = || result = Some(exchange_sizes(&case, "203.0.113.10:67", &[1472; 4]));
        if dp == Dp::Kernel {
            // Every datagram and carrier at the backend's link, checked apart
            // from the project's code: a PARTIAL one must hold the
            // pseudo-header sum, a full one must verify.
            super::kernel::client_ethtool(&case.bed, tx);
            let counts = super::kernel::capture(&case.bed, send);
            let (expect, other) = if *tx == "on" { ("udp_partial_ok", "udp_full_ok") } else { ("udp_full_ok", "udp_partial_ok") };
            assert_eq!(counts["bad"], 0, "tx {tx}: {counts}");
            assert_eq!((counts["udp_carriers"].as_u64(), counts[other].as_u64()), (Some(3), Some(0)), "tx {tx}: {counts}");
            assert!(counts[expect].as_u64().unwrap() >= 7, "tx {tx}: 4 datagrams and 3 carriers, {counts}");
        } else {
            send();
        }
        let (client, good, empty) = result.unwrap();
        assert_eq!((good, empty), (4, 0), "tx {tx}: full-sized datagrams echoed byte for byte, no empty one");
        clients.push(client);
    }
    if dp == Dp::Kernel {
        // A datagram with IPv4 options other than a UOA (record route) to an
        // opp listener: the kernel datapath writes no UOA into it (room after
        // the fixed header would split the options), counts it, and it goes
        // through to a plain echo socket intact.
        let echo = run_in(&case.bed.ns("be1"), || UdpSocket::bind("100.125.2.1:5368")).unwrap();
        echo.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let echoer = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let (n, from) = echo.recv_from(&mut buf)?;
            echo.send_to(&buf[..n], from)
        });
        let echoed = run_in(&case.bed.ns("client"), || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.connect("203.0.113.10:68").unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            toa_testkit::sys::set_ip_options(socket.as_fd(), &[7, 7, 4, 0, 0, 0, 0, 0]).expect("IP_OPTIONS");
            socket.send(b"record-route").unwrap();
            let mut buf = [0u8; 64];
            socket.recv(&mut buf).map(|n| buf[..n].to_vec())
        });
        assert!(echoer.join().unwrap().is_ok(), "the backend got it");
        assert_eq!(echoed.ok().as_deref(), Some(&b"record-route"[..]));
        let stats = String::from_utf8_lossy(&ctl_output(&case.dir, "stats").stdout).into_owned();
        let line = stats.lines().find(|l| l.starts_with("udp/203.0.113.10:68 ")).unwrap().to_owned();
        assert!(line.contains(" uoa_no_room=1 ") && line.contains(" uoa_injected=0 "), "{line}");
    }
    let (named, stats) = server.join().unwrap();
    let expected: Vec<_> =
        clients.iter().flat_map(|c| [(*c, toa_server_shim::Source::Uoa, 1472); 4]).collect();
    assert_eq!(named, expected, "each datagram named its client, the first one too");
    assert_eq!(stats.carriers, 3 * offloads.len() as u64, "{stats:?}");
}
}
