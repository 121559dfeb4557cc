//! What only the kernel datapath has: checksums that verify with offloads on
//! and off, the MSS it lowers, malformed client options cut and counted, and
//! `toa-lb inject` on a FULLNAT the test writes itself.

use std::io::Read;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use toa_core::{Format, Toa};
use toa_server_shim::{Config, TcpListenerExt, TrustPolicy};
use toa_testkit::netns::run_in;
use toa_testkit::rawtcp::{Client, Conn};
use toa_testkit::require_root;

use super::{
    Case, Dp, Testbed, UDP_VIP, VIP, ask, ask_udp, ask_vip, config_text, connect_echo, connect_through_start,
    ctl_output, leftovers, mac_of, start_lb, start_lb_text, stat,
};

/// Captures at backend 1 while `traffic` runs; returns the checker's JSON.
pub(super) fn capture(bed: &Testbed, traffic: impl FnOnce()) -> serde_json::Value {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lb_e2e/checksums.py");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &bed.ns("be1"), "python3"])
        .arg(&script)
        .args(["b0", "1.5", "100.125.1.", "2001:db8:64::1:1"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 checksums.py");
    // It says "ready" once its socket is bound: nothing is missed after that.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");
    traffic();
    let mut json = String::new();
    stdout.read_to_string(&mut json).unwrap();
    child.wait().unwrap();
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"))
}

pub(super) fn client_ethtool(bed: &Testbed, setting: &str) {
    let ok = Command::new("ip")
        .args(["netns", "exec", &bed.ns("client"), "ethtool", "-K", "c0", "tx", setting])
        .output()
        .unwrap();
    assert!(ok.status.success(), "ethtool -K c0 tx {setting}");
}

/// With offloads on, the client's veth hands over CHECKSUM_PARTIAL segments;
/// with tx offload off, finished checksums. Either way every segment the
/// backend receives verifies (the partial ones hold the pseudo-header sum the
/// device will finish from), and the SYN and handshake ACK carry the TOA;
/// 4 MiB each way crosses intact (GSO batches, GRO), and the client's MSS is
/// lowered by the option's 8 bytes where the listener says `mss_clamp = "on"`
/// (port 80), not by default (port 81: no data segment grows).
#[test]
fn checksums_verify_with_offloads_on_and_off() {
    require_root!();
    let case = Case::new("c", Dp::Kernel);
    let bed = &case.bed;
    let _lb = start_lb(&case, "toa");
    for (tx, expect) in [("on", "partial_ok"), ("off", "full_ok")] {
        client_ethtool(bed, tx);
        let counts = capture(bed, || {
            for _ in 0..4 {
                let (local, line) = ask(bed);
                assert!(line.contains(&format!(" client={local} ")), "{line}");
            }
            let (local, line) = ask_vip(bed, "[2001:db8:c::10]:80");
            assert!(line.contains(&format!(" client={local} ")), "{line}");
            echo_bulk(bed, 4 << 20);
        });
        assert_eq!(counts["bad"], 0, "tx {tx}: {counts}");
        assert!(counts[expect].as_u64().unwrap() >= 20, "tx {tx}: {counts}");
        // At backend 1: half the IPv4 requests (round robin), the IPv6 one, the bulk echo.
        assert!(counts["syn_toa"].as_u64().unwrap() >= 4, "tx {tx}: {counts}");
        assert!(counts["ack_toa"].as_u64().unwrap() >= 4, "tx {tx}: {counts}");
    }
    client_ethtool(bed, "on");
    // The backend announced 1460; the client got 1452 on port 80, less 12 for
    // timestamps, and 1460 on port 81.
    assert_eq!(client_mss(bed, VIP), 1440);
    assert_eq!(client_mss(bed, "203.0.113.10:81"), 1448);
}

/// The MSS the client uses on a connection to `vip`.
fn client_mss(bed: &Testbed, vip: &str) -> u32 {
    run_in(&bed.ns("client"), || {
        mss_of(&TcpStream::connect_timeout(&vip.parse().unwrap(), Duration::from_secs(5)).unwrap())
    })
}

/// The MSS `stream` sends with.
fn mss_of(stream: &TcpStream) -> u32 {
    nix::sys::socket::getsockopt(&stream.as_fd(), nix::sys::socket::sockopt::TcpMaxSeg).unwrap()
}

/// Data placement: the TOA goes into the client's data segments until the
/// backend first sends data (here: the first request only), not into the
/// SYN or the handshake ACK; every segment verifies, and the MSS is lowered.
#[test]
fn data_placement_until_the_backend_speaks() {
    require_root!();
    let case = Case::new("dp", Dp::Kernel);
    let _lb = start_lb_text(&case, "data", &echo_with_data_placement(""));
    three_requests_with_data_placement(&case.bed);
}

/// The same when a reload brings data placement to a datapath that started
/// without it: the injector's egress program then starts watching the
/// backends' data (before, it did not, and every client segment of the
/// connection carried the TOA).
#[test]
fn data_placement_added_by_reload_ends_when_the_backend_speaks() {
    require_root!();
    let case = Case::new("dr", Dp::Kernel);
    let dir = &case.dir;
    let _lb = start_lb(&case, "toa");
    std::fs::write(dir.join("lb-toa.toml"), echo_with_data_placement("")).unwrap();
    let out = ctl_output(dir, "reload");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    three_requests_with_data_placement(&case.bed);
}

/// Three requests and their echoes through the echo listener (with data
/// placement): the TOA is in the first request only.
fn three_requests_with_data_placement(bed: &Testbed) {
    let counts = capture(bed, || {
        run_in(&bed.ns("client"), || {
            let mut stream =
                TcpStream::connect_timeout(&"203.0.113.10:81".parse().unwrap(), Duration::from_secs(10))
                    .unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            for request in [&b"first"[..], b"second", b"third"] {
                std::io::Write::write_all(&mut stream, request).unwrap();
                let mut reply = vec![0u8; request.len()];
                stream.read_exact(&mut reply).unwrap();
                assert_eq!(reply, request);
            }
            let mss = mss_of(&stream);
            assert_eq!(mss, 1440, "the MSS leaves room for the option");
        });
    });
    assert_eq!(counts["bad"], 0, "{counts}");
    assert_eq!((counts["syn_toa"].as_u64(), counts["ack_toa"].as_u64()), (Some(0), Some(0)), "{counts}");
    // The first request, and nothing after the backend's answer (a
    // retransmission of the first would carry it again).
    assert!((1..=2).contains(&counts["data_toa"].as_u64().unwrap()), "{counts}");
}

/// Data placement with `mss_clamp = "off"`: the client keeps its full MSS, and
/// a first request of a full segment, which the option would push past the
/// MTU, reaches the backend intact without it (no_room), not dropped on the
/// way; every segment verifies.
#[test]
fn unclamped_full_segments_go_without_the_option() {
    require_root!();
    let case = Case::new("nc", Dp::Kernel);
    let (bed, dir) = (&case.bed, &case.dir);
    let _lb = start_lb_text(&case, "noclamp", &echo_with_data_placement("mss_clamp = \"off\"\n"));
    let counts = capture(bed, || {
        run_in(&bed.ns("client"), || {
            let mut stream =
                TcpStream::connect_timeout(&"203.0.113.10:81".parse().unwrap(), Duration::from_secs(10))
                    .unwrap();
            stream.set_nodelay(true).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mss = mss_of(&stream);
            assert_eq!(mss, 1448, "not clamped");
            // One full segment: 20 + 32 + 1448 = 1500 bytes, the MTU.
            let request: Vec<u8> = (0..1448u32).map(|i| (i * 7 % 251) as u8).collect();
            std::io::Write::write_all(&mut stream, &request).unwrap();
            let mut reply = vec![0u8; request.len()];
            stream.read_exact(&mut reply).unwrap();
            assert_eq!(reply, request);
        });
    });
    assert_eq!(counts["bad"], 0, "{counts}");
    assert_eq!(counts["data_toa"].as_u64(), Some(0), "{counts}");
    let stats = String::from_utf8(ctl_output(dir, "stats").stdout).unwrap();
    let listener = stats.lines().find(|l| l.starts_with("203.0.113.10:81 ")).unwrap();
    assert_eq!((stat(listener, "injected"), stat(listener, "mss_clamped")), (0, 0), "{listener}");
    assert!(stat(listener, "no_room") >= 1, "{listener}");
}

/// The test configuration with data placement (and `extra` lines) on the
/// echo listener, 203.0.113.10:81.
fn echo_with_data_placement(extra: &str) -> String {
    let text = config_text("toa", Dp::Kernel.config());
    let echo = "vip = \"203.0.113.10:81\"\nobtain_client_ip = \"toa\"\n";
    assert!(text.contains(echo));
    text.replace(echo, &format!("{echo}placement = {{ syn = false, ack = false, data = true }}\n{extra}"))
}

/// Sends `size` bytes through the echo listener (203.0.113.10:81) and checks what comes back.
fn echo_bulk(bed: &Testbed, size: usize) {
    run_in(&bed.ns("client"), || {
        let stream =
            TcpStream::connect_timeout(&"203.0.113.10:81".parse().unwrap(), Duration::from_secs(10)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        let expected = data.clone();
        let sender = std::thread::spawn(move || {
            std::io::Write::write_all(&mut writer, &data).unwrap();
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut got = Vec::with_capacity(size);
        let mut reader = stream;
        reader.read_to_end(&mut got).unwrap();
        sender.join().unwrap();
        assert!(got == expected, "{} bytes came back, changed or short ({} sent)", got.len(), size);
    });
}

/// A client's options that overrun the header end at an EOL the injector
/// writes (a TOA it forged before them is overwritten too); the segment
/// passes, the connection works, and the counters say so.
#[test]
fn malformed_client_options_are_cut_and_counted() {
    require_root!();
    let case = Case::new("m", Dp::Kernel);
    let (bed, dir) = (&case.bed, &case.dir);
    let _lb = start_lb(&case, "toa");
    let client_mac = mac_of(&bed.ns("client"), "c0");
    let lb_mac = mac_of(&bed.ns("lb"), "lb-c");
    // The raw client answers no ARP: the LB's kernel learns its address here.
    super::neighbor(bed, "203.0.113.51", client_mac);
    let forged = Toa::new(Format::Toa, "10.9.9.9:1".parse().unwrap()).unwrap();
    let mut conn = Conn::new("203.0.113.51:40001".parse().unwrap(), VIP.parse().unwrap()).toa_in_syn(&forged);
    // The forged TOA (8 bytes), then an option claiming 40 bytes with 4 left.
    conn.syn_options.extend_from_slice(&[99, 40, 0, 0]);
    let mut raw = run_in(&bed.ns("client"), || Client::open("c0", client_mac, lb_mac));
    let answer = raw.run(&[conn], 1, Duration::from_secs(15)).remove(0).expect("answer");
    let line = String::from_utf8(answer).unwrap();
    assert!(line.contains("client=203.0.113.51:40001 "), "the real client, not the forged one: {line}");
    let stats = String::from_utf8(ctl_output(dir, "stats").stdout).unwrap();
    let listener = stats.lines().find(|l| l.starts_with("203.0.113.10:80 ")).unwrap();
    assert!(listener.contains(" stripped=1 ") && listener.contains(" options_malformed=1 "), "{listener}");
}

/// Runs `toa-lb inject ...` in the LB namespace. nsenter keeps the host's
/// mount namespace, where bpffs and the pins are (ip netns exec would
/// remount /sys, and the command refuses that).
fn inject(bed: &Testbed, pins: &std::path::Path, args: &[&str]) -> Output {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", bed.ns("lb")))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_toa-lb"))
        .arg("inject")
        .args(args)
        .arg("--pin-dir")
        .arg(pins)
        .output()
        .expect("toa-lb inject")
}

/// Removes a pin directory when dropped: unpinning the links detaches the
/// programs, and the maps go with their last reference.
struct Unpin(std::path::PathBuf);

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn lb_sh(bed: &Testbed, script: &str) {
    let out =
        Command::new("ip").args(["netns", "exec", &bed.ns("lb"), "sh", "-ec", script]).output().unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Another tool detaches the injector's programs, and no new connection is
/// balanced (the table balances only SYNs the injector marked): toa-lb
/// attaches them again within a few seconds and says so. Before TCX (Debian 12's 6.1; here with
/// `TOA_LB_TC_NETLINK`) deleting the interface's clsact qdisc takes the tc
/// filters with it; with TCX links only `bpftool link detach` does it.
#[test]
fn injector_detached_by_someone_else_is_attached_again() {
    require_root!();
    let netlink = std::env::var_os(toa_lb_injector::datapath::kernel::injector::NETLINK_TC_ENV).is_some();
    if !netlink && Command::new("bpftool").arg("version").output().is_err() {
        eprintln!("skipped: needs bpftool (apt-get install bpftool) to detach a TCX link");
        return;
    }
    let case = Case::new("rd", Dp::Kernel);
    let bed = &case.bed;
    let lb = start_lb(&case, "toa");
    if netlink {
        lb_sh(bed, "tc qdisc del dev lb-c clsact");
    } else {
        // The ingress program's link, found by the program this test's
        // toa-lb attached (interface indexes repeat across namespaces).
        let (_, programs) = run_in(&bed.ns("lb"), || {
            aya::programs::SchedClassifier::query_tcx("lb-c", aya::programs::TcAttachType::Ingress)
        })
        .expect("query the TCX programs on lb-c");
        let ids: Vec<u32> = programs.iter().map(aya::programs::ProgramInfo::id).collect();
        let link = aya::programs::loaded_links()
            .flatten()
            .find(|l| ids.contains(&l.program_id()))
            .unwrap_or_else(|| panic!("no link of the programs {ids:?}"));
        let out =
            Command::new("bpftool").args(["link", "detach", "id", &link.id().to_string()]).output().unwrap();
        assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    }
    let programs =
        || run_in(&bed.ns("lb"), || toa_lb_injector::datapath::kernel::injector::attached_programs("lb-c"));
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while !(lb.1.lock().unwrap().contains("were detached from lb-c by someone else") && programs().len() == 2)
    {
        assert!(std::time::Instant::now() < deadline, "not attached again: {:?}", programs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} ")), "the TOA again: {line}");
    let stats = String::from_utf8(ctl_output(&case.dir, "stats").stdout).unwrap();
    assert!(stats.contains("put back table=0 address=0 forwarding=0 programs=1\n"), "{stats}");
}

/// Restarting toa-lb (an upgrade) keeps established connections: conntrack
/// keeps their NAT bindings while toa-lb is down, and the next instance's
/// table carries them on. Its VIP and SNAT addresses go before its table
/// (at a stop, and at the start that cleans up after a crash), so the host's
/// stack never meets a flow's packet on a local address without the NAT,
/// which it would answer with a reset: packets are dropped meanwhile and TCP
/// sends them again. A client writes a byte every 5 ms throughout a stop and
/// start and a SIGKILL and start; every byte comes back, none is reset.
#[test]
fn a_restart_keeps_established_connections() {
    require_root!();
    let case = Case::new("rk", Dp::Kernel);
    let bed = &case.bed;
    let lb = start_lb(&case, "toa");
    let mut open = connect_echo(bed, Duration::from_secs(20));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (mut out, stop) = (open.try_clone().unwrap(), stop.clone());
        std::thread::spawn(move || {
            let mut written = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Err(e) = std::io::Write::write_all(&mut out, b"x") {
                    return Err(format!("after {written} bytes: {e}"));
                }
                written += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(written)
        })
    };
    let pause = || std::thread::sleep(Duration::from_millis(300));
    pause();
    // Stopped, cleanly: nothing of it is left; then started again.
    drop(lb);
    assert_eq!(leftovers(bed), Vec::<String>::new());
    pause();
    let mut lb = start_lb(&case, "toa");
    pause();
    // A crash (SIGKILL), and the start that undoes what it left before
    // setting up again (systemd's Restart=on-failure).
    lb.0.kill().unwrap();
    lb.0.wait().unwrap();
    pause();
    let _lb = start_lb(&case, "toa");
    pause();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap().unwrap_or_else(|e| panic!("the connection broke: {e}"));
    let mut echoed = vec![0u8; written];
    open.read_exact(&mut echoed).unwrap_or_else(|e| panic!("the echo of {written} bytes: {e}"));
    assert!(echoed.iter().all(|b| *b == b'x'));
}

/// A restart with a changed configuration (a new listener first, whose
/// backend takes the first id a fresh numbering gives) keeps every backend's
/// id: an open connection's traffic, whose conntrack entry carries the old
/// run's mark, is counted to its own backend, not to the one now numbered so.
#[test]
fn a_restart_with_a_changed_configuration_counts_open_flows_to_their_backend() {
    require_root!();
    let case = Case::new("ri", Dp::Kernel);
    let bed = &case.bed;
    let lb = start_lb(&case, "toa");
    let mut open = connect_echo(bed, Duration::from_secs(10));
    let mut echo = |n: usize| {
        let sent = vec![b'x'; n];
        std::io::Write::write_all(&mut open, &sent).unwrap();
        let mut back = vec![0u8; n];
        open.read_exact(&mut back).unwrap();
        assert_eq!(back, sent);
    };
    echo(1000);
    drop(lb);
    let text = config_text("toa", Dp::Kernel.config());
    let new = "[[listener]]\nvip = \"203.0.113.10:8443\"\nobtain_client_ip = \"toa\"\n\n\
               [[listener.backend]]\naddress = \"100.125.2.2:8443\"\n\n[[listener]]\n";
    let changed = text.replacen("[[listener]]\n", new, 1);
    let _lb = start_lb_text(&case, "changed", &changed);
    const SENT: usize = 200_000;
    echo(SENT);
    let stats = String::from_utf8(ctl_output(&case.dir, "stats").stdout).unwrap();
    let bytes_to = |backend: &str| -> u64 {
        let line = stats.lines().find(|l| l.contains(&format!(" backend {backend} "))).expect(backend);
        stat(line, "bytes_to_backend")
    };
    assert!(bytes_to("100.125.2.1:8081") >= SENT as u64, "{stats}");
    assert_eq!(bytes_to("100.125.2.2:8443"), 0, "{stats}");
}

/// After a crash (SIGKILL) the table stays until the next start, and with
/// TCX the injector's programs die with the process. The table balances only
/// the new flows the injector has marked (TCP SYNs, UDP datagrams), so
/// meanwhile no new flow is balanced: none goes without its TOA or UOA, and
/// a client's forged TOA reaches no backend unstripped. A UDP flow balanced
/// before goes on. Before TCX the tc filters outlive the process and go on
/// working: connections are served, with their TOA. The next start serves.
#[test]
fn nothing_is_balanced_while_the_injector_is_gone() {
    require_root!();
    let case = Case::new("ng", Dp::Kernel);
    let bed = &case.bed;
    let mut lb = start_lb(&case, "toa");
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} ")), "{line}");
    // A UDP flow balanced before the crash, and how a datagram fares.
    let udp = |socket: &UdpSocket| -> std::io::Result<usize> {
        socket.send(b"who")?;
        socket.recv(&mut [0u8; 16])
    };
    let udp_socket = || {
        run_in(&bed.ns("client"), || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.connect(UDP_VIP).unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            socket
        })
    };
    let before = udp_socket();
    udp(&before).expect("a UDP reply before the crash");
    lb.0.kill().unwrap();
    lb.0.wait().unwrap();
    udp(&before).expect("the UDP flow balanced before the crash goes on");
    let netlink = std::env::var_os(toa_lb_injector::datapath::kernel::injector::NETLINK_TC_ENV).is_some();
    let new_udp = udp(&udp_socket());
    assert_eq!(new_udp.is_ok(), netlink, "a new UDP flow after the crash: {new_udp:?}");
    // A client that forges a TOA.
    let answer = super::forged_toa_connection(bed, "203.0.113.51", Duration::from_secs(3));
    if netlink {
        let line = String::from_utf8(answer.expect("the tc filters work on: an answer")).unwrap();
        assert!(line.contains("client=203.0.113.51:40000 "), "forged TOA not stripped: {line}");
    } else {
        assert!(answer.is_err(), "balanced with no injector running: {answer:?}");
        let plain = run_in(&bed.ns("client"), || {
            TcpStream::connect_timeout(&VIP.parse().unwrap(), Duration::from_secs(2))
        });
        assert!(plain.is_err(), "a connection was balanced with no injector running");
    }
    let _lb = start_lb(&case, "toa");
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} ")), "served again: {line}");
    udp(&udp_socket()).expect("a new UDP flow served again");
}

/// `toa-lb check --ruleset` prints what `toa-lb run` applies at start: the
/// script, applied by hand in an empty namespace, makes the same table as a
/// running toa-lb's (listed after its start, before any traffic).
#[test]
fn check_ruleset_prints_what_run_applies() {
    require_root!();
    let case = Case::new("rs", Dp::Kernel);
    // Without the dead backend: health checks would take it out, and the table with it.
    let text = config_text("toa", Dp::Kernel.config())
        .replace(&format!("[[listener.backend]]\naddress = \"{}\"\n\n", super::DEAD_BACKEND), "");
    assert!(!text.contains(super::DEAD_BACKEND));
    let _lb = start_lb_text(&case, "rs", &text);
    let check = Command::new(env!("CARGO_BIN_EXE_toa-lb"))
        .args(["check", "--ruleset", "--config"])
        .arg(case.dir.join("lb-rs.toml"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let empty = toa_testkit::netns::Netns::new("rs");
    let mut apply = empty.command("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(apply.stdin.as_mut().unwrap(), &check.stdout).unwrap();
    drop(apply.stdin.take());
    assert!(apply.wait().unwrap().success(), "nft -f of:\n{}", String::from_utf8_lossy(&check.stdout));
    let list = |ns: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "list", "table", "inet", "toa_lb"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let (printed, running) = (list(empty.name()), list(&case.bed.ns("lb")));
    assert!(running.contains("dnat ip to ct mark map"), "{running}");
    assert_eq!(printed, running);
}

/// `toa-lb inject` on a FULLNAT the operator runs: plain nftables DNAT and
/// SNAT written here, no `toa-lb run`. A backend using saved SYNs sees the
/// client; status shows the counters; attaching twice names detach; detach
/// leaves no pin and no program.
#[test]
fn inject_on_a_plain_nftables_fullnat() {
    require_root!();
    let bed = Testbed::up("ij", "on");
    lb_sh(
        &bed,
        "ip addr add 203.0.113.10/32 dev lb-c
         ip addr add 100.125.1.9/32 dev lb-br
         sysctl -qw net.ipv4.ip_forward=1
         nft -f - <<EOF
table ip operators_fullnat {
  chain pre { type nat hook prerouting priority dstnat; ip daddr 203.0.113.10 tcp dport 80 dnat to 100.125.2.1:8080; }
  chain post { type nat hook postrouting priority srcnat; ip daddr 100.125.2.1 tcp dport 8080 snat to 100.125.1.9; }
}
EOF",
    );
    let listener = run_in(&bed.ns("be1"), || TcpListener::bind("0.0.0.0:8080")).unwrap();
    let listener =
        listener.with_toa(Config::new(TrustPolicy::new("100.125.0.0/16".parse().unwrap()).unwrap())).unwrap();
    std::thread::spawn(move || {
        for (mut stream, peer) in listener.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut stream, format!("{peer}\n").as_bytes());
        }
    });
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/toa-lb-test-{}", std::process::id()));
    // Pins live in the host's bpffs, past the testbed: gone even when an assertion fails.
    let _unpin = Unpin(pins.clone());
    let out = inject(&bed, &pins, &["attach", "--iface", "lb-c", "--listener", VIP]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The command has exited: the injector stays, pinned.
    let (local, line) = ask(&bed);
    assert!(line.starts_with(&format!("client={local} lb=100.125.1.9:")), "{line}");
    assert!(line.ends_with("source=saved-syn"), "{line}");
    let status = inject(&bed, &pins, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    // Links are pinned with TCX; before it, the tc filters live on unpinned.
    let netlink = std::env::var_os(toa_lb_injector::datapath::kernel::injector::NETLINK_TC_ENV).is_some();
    let pinned = if netlink { 0 } else { 2 };
    assert!(text.contains(&format!("interface lb-c ({pinned} of 2 programs pinned, 2 running,")), "{text}");
    assert!(!text.contains("NOT RUNNING"), "{text}");
    assert!(
        text.contains("listener 203.0.113.10:80 format=toa placement=syn,ack mss_clamp=off injected=2"),
        "{text}"
    );
    let twice = inject(&bed, &pins, &["attach", "--iface", "lb-c", "--listener", VIP]);
    assert!(!twice.status.success());
    let err = String::from_utf8_lossy(&twice.stderr);
    assert!(err.contains("already attached to lb-c") && err.contains("toa-lb inject detach"), "{err}");
    let programs =
        || run_in(&bed.ns("lb"), || toa_lb_injector::datapath::kernel::injector::attached_programs("lb-c"));
    assert_eq!(programs().len(), 2);
    let out = inject(&bed, &pins, &["detach"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!pins.exists(), "the pins are gone");
    assert_eq!(programs(), Vec::<String>::new(), "the programs are detached");
    // The operator's NAT goes on without the TOA.
    let (_, line) = ask(&bed);
    assert!(line.starts_with("client=100.125.1.9:"), "{line}");
    let detached = inject(&bed, &pins, &["detach"]);
    assert!(String::from_utf8_lossy(&detached.stderr).contains("not attached"));
    // Attached again, then the interface is deleted and made again: the pins
    // stay, the programs run nowhere, and status says so; detach still cleans up.
    let out = inject(&bed, &pins, &["attach", "--iface", "lb-c", "--listener", VIP]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let relink =
        Command::new(super::scripts().join("testbed.sh")).args(["relink", &bed.prefix]).output().unwrap();
    assert!(relink.status.success(), "{}", String::from_utf8_lossy(&relink.stderr));
    let text = String::from_utf8_lossy(&inject(&bed, &pins, &["status"]).stdout).into_owned();
    assert!(text.contains(&format!("({pinned} of 2 programs pinned, 0 running,")), "{text}");
    assert!(text.contains("NOT RUNNING"), "{text}");
    assert!(inject(&bed, &pins, &["detach"]).status.success());
    assert!(!pins.exists(), "the pins are gone");
}

/// `toa-lb run` and `toa-lb inject` on one interface would strip and insert
/// over each other (and before TCX a run's start removes the other's tc
/// filters): each refuses while the other is there, saying which, and
/// touches nothing of it.
#[test]
fn run_and_inject_refuse_each_other() {
    require_root!();
    let case = Case::new("rj", Dp::Kernel);
    let bed = &case.bed;
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/toa-lb-test-rj-{}", std::process::id()));
    let _unpin = Unpin(pins.clone());
    let programs =
        || run_in(&bed.ns("lb"), || toa_lb_injector::datapath::kernel::injector::attached_programs("lb-c"));
    let attach = || inject(bed, &pins, &["attach", "--iface", "lb-c", "--listener", VIP]);
    {
        let _lb = start_lb(&case, "toa");
        let out = attach();
        assert!(!out.status.success(), "inject attached over a running toa-lb run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("lb-c has toa-lb's injector attached already") && err.contains("toa-lb run"),
            "{err}"
        );
        assert!(!pins.join("lb-c").exists(), "nothing pinned");
        let (local, line) = ask(bed);
        assert!(line.contains(&format!(" client={local} ")), "still served with the TOA: {line}");
    }
    let out = attach();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // With TCX a run knows any programs on the interface are alive; before
    // it, only by the default pin directory, which a test leaves alone.
    let netlink = std::env::var_os(toa_lb_injector::datapath::kernel::injector::NETLINK_TC_ENV).is_some();
    if !netlink {
        let err = super::run_refused(&case, &case.dir.join("lb-toa.toml"), "ctl-rj.sock");
        assert!(err.contains("`toa-lb inject` has its injector on lb-c"), "{err}");
        assert!(err.contains("toa-lb inject detach --iface lb-c"), "{err}");
        assert_eq!(programs().len(), 2, "inject's programs stay");
        assert_eq!(
            leftovers(bed).iter().filter(|l| !l.starts_with("program")).count(),
            0,
            "{:?}",
            leftovers(bed)
        );
    }
    assert!(inject(bed, &pins, &["detach"]).status.success());
    assert_eq!(programs(), Vec::<String>::new());
}

/// The backends' egress program (it writes UOAs) is attached only once a UDP
/// listener exists: a TCP-only configuration has no program on the way to
/// the backends, a reload that adds a UDP listener attaches it, and one that
/// removes it again detaches it.
#[test]
fn backend_program_only_with_udp_listeners() {
    require_root!();
    let case = Case::new("bp", Dp::Kernel);
    let (bed, dir) = (&case.bed, &case.dir);
    let full = config_text("toa", Dp::Kernel.config());
    let tcp_only =
        &full[..full.find(&format!("[[listener]]\nvip = \"{UDP_VIP}\"")).expect("the UDP listener")];
    let _lb = start_lb_text(&case, "tcp", tcp_only);
    let programs =
        || run_in(&bed.ns("lb"), || toa_lb_injector::datapath::kernel::injector::attached_programs("lb-br"));
    assert_eq!(programs(), Vec::<String>::new(), "TCP only: nothing on the backend interface");
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} ")), "{line}");
    std::fs::write(dir.join("lb-tcp.toml"), &full).unwrap();
    let out = ctl_output(dir, "reload");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // (The kernel keeps 15 bytes of a program's name.)
    assert_eq!(programs(), vec!["toa_lb_backend_".to_owned()], "attached by the reload");
    let (_, replies) = ask_udp(bed, UDP_VIP, 1);
    assert_eq!(replies.len(), 1);
    std::fs::write(dir.join("lb-tcp.toml"), tcp_only).unwrap();
    let out = ctl_output(dir, "reload");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(programs(), Vec::<String>::new(), "detached by the reload that removed the UDP listener");
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} ")), "{line}");
}

/// A start that fails (an interface that is not there) says so in one line
/// and leaves nothing behind.
#[test]
fn a_failed_start_leaves_nothing() {
    require_root!();
    let case = Case::new("x", Dp::Kernel);
    let config = case.dir.join("bad.toml");
    let text = super::config_text("toa", Dp::Kernel.config())
        .replace("backend_interface = \"lb-br\"", "backend_interface = \"lb-nope\"");
    std::fs::write(&config, text).unwrap();
    let err = super::run_refused(&case, &config, "ctl.sock");
    assert!(err.contains("interface lb-nope not found"), "{err}");
    assert_eq!(leftovers(&case.bed), Vec::<String>::new());
}

/// A kernel LB that starts while clients are already sending (their
/// neighbour caches still know the VIP, as after a restart) refuses none of
/// them, and every connection it serves carries its client's TOA: the
/// injector is attached before the nftables table balances anything, and the
/// VIP goes on the interface last (a SYN that met the VIP before its DNAT
/// rule was refused by the host's own stack).
#[test]
fn started_under_traffic_refuses_none_and_names_every_client() {
    require_root!();
    let case = Case::new("h", Dp::Kernel);
    let (_lb, outcomes) = connect_through_start(&case);
    assert!(outcomes.silent.is_empty() && outcomes.refused == 0, "{outcomes}");
    let unnamed: Vec<&(std::net::SocketAddr, String)> = outcomes
        .answered
        .iter()
        .filter(|(local, line)| !line.contains(&format!(" client={local} ")))
        .collect();
    assert!(unnamed.is_empty(), "served without the TOA: {unnamed:?} ({outcomes})");
    assert!(outcomes.answered.len() >= super::MIN_ANSWERED_THROUGH_START, "{outcomes}");
}
