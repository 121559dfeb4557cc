//! `toa-lb` end to end on the testbed (root): a real client, the real LB
//! binary, backends using `ToaListener`. Every test of the load balancer's
//! behaviour runs on the kernel datapath (offloads on, as the kernel sets
//! them) and on the ring datapath (offloads off, as it needs): `both!`.
//! [`kernel`] holds what only the kernel datapath has (checksums under
//! offloads, crash cleanup of addresses and programs, `toa-lb inject`),
//! [`userspace`] the user-space datapaths' own (pnet, the offload check).

mod kernel;
mod userspace;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use toa_core::{Format, Toa};
use toa_server_shim::{Config, TcpListenerExt, TrustPolicy};
use toa_testkit::netns::run_in;
use toa_testkit::rawtcp::{Client, Conn, Wire, option_bytes};
use toa_testkit::require_root;

const VIP: &str = "203.0.113.10:80";

/// The datapath a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dp {
    /// nftables + the tc-BPF injector; offloads on.
    Kernel,
    /// PACKET_MMAP rings in user space; offloads off.
    Ring,
    /// One frame per system call (the fallback); offloads off.
    Pnet,
}

impl Dp {
    /// The configuration lines that choose it. Three ring workers whatever
    /// the CPUs, so that steering by port (and SNAT ports by shard) is
    /// exercised, with a modulus that is not a power of two.
    fn config(self) -> &'static str {
        match self {
            Dp::Kernel => "datapath = \"kernel\"\n",
            Dp::Ring => "datapath = \"ring\"\nworkers = 3\n",
            Dp::Pnet => "datapath = \"pnet\"\n",
        }
    }

    /// The testbed's offloads for it.
    fn offloads(self) -> &'static str {
        match self {
            Dp::Kernel => "on",
            Dp::Ring | Dp::Pnet => "off",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Dp::Kernel => "k",
            Dp::Ring => "r",
            Dp::Pnet => "p",
        }
    }
}

/// A test of the load balancer's behaviour, run on both datapaths:
/// `NAME::kernel` and `NAME::ring`.
macro_rules! both {
    ($(#[$meta:meta])* fn $name:ident($dp:ident: Dp) $body:block) => {
        $(#[$meta])*
        fn $name($dp: Dp) $body

        mod $name {
            #[test]
            fn kernel() {
                super::$name(super::Dp::Kernel)
            }

            #[test]
            fn ring() {
                super::$name(super::Dp::Ring)
            }
        }
    };
}

// After `both!`, which it uses.
mod uoa;

fn scripts() -> PathBuf {
    [env!("CARGO_MANIFEST_DIR"), "..", "scripts"].iter().collect()
}

/// The testbed, torn down on drop.
struct Testbed {
    prefix: String,
}

impl Testbed {
    fn up(tag: &str, offloads: &str) -> Testbed {
        let prefix = format!("tl{tag}{}", std::process::id() % 100_000);
        let ok = Command::new(scripts().join("testbed.sh"))
            .args(["up", &prefix, "2"])
            .env("OFFLOADS", offloads)
            .status()
            .expect("testbed.sh");
        assert!(ok.success(), "testbed.sh up {prefix} failed (it removes what it built)");
        Testbed { prefix }
    }

    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = Command::new(scripts().join("testbed.sh")).args(["down", &self.prefix]).output();
    }
}

/// A `toa-lb` process, killed on drop, what it has logged, and the directory
/// of its control socket.
struct Lb(Child, Arc<Mutex<String>>, PathBuf);

impl Drop for Lb {
    /// SIGTERM, so that it cleans up after itself (the kernel datapath's state
    /// file would outlive the namespace otherwise); SIGKILL if it hangs. When
    /// the test is failing, first prints what the LB saw: its counters,
    /// listeners and log.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for request in ["stats", "listeners"] {
                let out = ctl_output(&self.2, request);
                eprintln!("--- toa-lb ctl {request}:\n{}", String::from_utf8_lossy(&out.stdout));
            }
            eprintln!(
                "--- toa-lb log:\n{}",
                self.1.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
            );
        }
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_lb(case: &Case, mode: &str) -> Lb {
    start_lb_with(case, mode, "")
}

/// The test configuration; `extra` goes at the top (e.g. `max_flows = 500`,
/// the datapath). TCP listeners use `mode`; the UDP echo listeners start `off`.
fn config_text(mode: &str, extra: &str) -> String {
    format!(
        "{extra}client_interface = \"lb-c\"\nbackend_interface = \"lb-br\"\nmetrics = \"127.0.0.1:9947\"\n\
         health = {{ interval_ms = {HEALTH_INTERVAL_MS}, timeout_ms = 100, rise = 2, fall = {HEALTH_FALL} }}\n\
         snat = [\"100.125.1.1\", \"100.125.1.2\", \"2001:db8:64::1:1\"]\n\n\
         [[listener]]\nvip = \"{VIP}\"\nobtain_client_ip = \"{mode}\"\nmss_clamp = \"on\"\n\n\
         [[listener.backend]]\naddress = \"100.125.2.1:8080\"\n\n[[listener.backend]]\naddress = \"100.125.2.2:8080\"\n\n\
         [[listener.backend]]\naddress = \"{DEAD_BACKEND}\"\n\n\
         [[listener]]\nvip = \"203.0.113.10:81\"\nobtain_client_ip = \"{mode}\"\n\n[[listener.backend]]\naddress = \"100.125.2.1:8081\"\n\n\
         [[listener]]\nvip = \"[2001:db8:c::10]:80\"\nobtain_client_ip = \"{mode}\"\n\n\
         [[listener.backend]]\naddress = \"[2001:db8:64::2:1]:8082\"\n\n\
         [[listener]]\nvip = \"{UDP_VIP}\"\nprotocol = \"udp\"\n\n[[listener.backend]]\naddress = \"100.125.2.1:5353\"\n\n\
         [[listener]]\nvip = \"{UDP_VIP6}\"\nprotocol = \"udp\"\n\n[[listener.backend]]\naddress = \"[2001:db8:64::2:1]:5353\"\n"
    )
}

/// The third backend of the test configuration's :80: nothing listens there.
const DEAD_BACKEND: &str = "100.125.2.1:9999";
/// Health checks in the test configuration: every 100 ms, out after 2 failures.
const HEALTH_INTERVAL_MS: u64 = 100;
const HEALTH_FALL: u64 = 2;
const UDP_VIP: &str = "203.0.113.10:53";
const UDP_VIP6: &str = "[2001:db8:c::10]:53";

/// Starts toa-lb with the test configuration on the case's datapath; `extra`
/// goes at the top (e.g. `max_flows = 500`).
fn start_lb_with(case: &Case, mode: &str, extra: &str) -> Lb {
    start_lb_text(case, mode, &config_text(mode, &format!("{}{extra}", case.dp.config())))
}

/// Starts toa-lb with the configuration `text` (written as `lb-NAME.toml`).
fn start_lb_text(case: &Case, name: &str, text: &str) -> Lb {
    let (bed, dir) = (&case.bed, &case.dir);
    let config = dir.join(format!("lb-{name}.toml"));
    std::fs::write(&config, text).expect("write config");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &bed.ns("lb"), env!("CARGO_BIN_EXE_toa-lb"), "run", "--config"])
        .arg(&config)
        .arg("--socket")
        .arg(dir.join("ctl.sock"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn toa-lb");
    // Wait for "running on the interfaces"; then keep the log, for a test to read.
    let mut err = child.stderr.take().expect("piped");
    let mut seen = String::new();
    let mut byte = [0u8; 1];
    while !seen.contains("running on the interfaces") {
        match err.read(&mut byte) {
            Ok(1) => seen.push(byte[0] as char),
            _ => panic!("toa-lb did not start: {seen}"),
        }
    }
    let log = Arc::new(Mutex::new(seen));
    {
        let log = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                log.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    // The third backend of :80 listens nowhere: wait until health checks take it out.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while text.contains(DEAD_BACKEND) {
        let out = ctl_output(dir, "listeners");
        if String::from_utf8_lossy(&out.stdout).contains(&format!("{DEAD_BACKEND}(down)")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the dead backend was never marked down");
        std::thread::sleep(Duration::from_millis(50));
    }
    Lb(child, log, dir.clone())
}

/// One test's world: the testbed, a scratch directory, the backends; all
/// stopped and removed when it drops, on success and on failure.
struct Case {
    bed: Testbed,
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    backends: Backends,
    dp: Dp,
}

impl Case {
    fn new(tag: &str, dp: Dp) -> Case {
        let tag = format!("{tag}{}", dp.tag());
        let bed = Testbed::up(&tag, dp.offloads());
        let dir = std::env::temp_dir().join(format!("toa-lb-e2e-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let backends = start_backends(&bed, &stop);
        Case { bed, dir, stop, backends, dp }
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The backends' switches: setting one closes that backend's :8080 listener
/// (be1, be2), as a crashed server would.
struct Backends {
    kill: [Arc<AtomicBool>; 2],
    /// The sources the UDP echo servers saw, in order.
    udp_peers: Arc<Mutex<Vec<SocketAddr>>>,
}

/// Backends: `beN` answers "beN client=... lb=... source=..." on :8080; be1
/// echoes on :8081 (TCP) and :5353 (UDP, IPv4 and IPv6).
fn start_backends(bed: &Testbed, stop: &Arc<AtomicBool>) -> Backends {
    let policy = || TrustPolicy::new("100.125.0.0/16".parse().unwrap()).unwrap();
    let kill: [Arc<AtomicBool>; 2] = Default::default();
    for i in 1..=2 {
        let listener = run_in(&bed.ns(&format!("be{i}")), || TcpListener::bind("0.0.0.0:8080")).unwrap();
        // Non-blocking, so that the loop can close it when told to.
        listener.set_nonblocking(true).unwrap();
        let listener = listener.with_toa(Config::new(policy())).unwrap();
        let (stop, kill) = (stop.clone(), kill[i - 1].clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) && !kill.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = writeln!(stream, "be{i} {peer}");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
    }
    let v6 = run_in(&bed.ns("be1"), || TcpListener::bind("[2001:db8:64::2:1]:8082")).unwrap();
    let v6 =
        v6.with_toa(Config::new(TrustPolicy::new("2001:db8:64::/64".parse().unwrap()).unwrap())).unwrap();
    std::thread::spawn(move || {
        for (mut stream, peer) in v6.incoming().flatten() {
            let _ = writeln!(stream, "be1v6 {peer}");
        }
    });
    let echo = run_in(&bed.ns("be1"), || TcpListener::bind("0.0.0.0:8081")).unwrap();
    std::thread::spawn(move || {
        for stream in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().expect("clone");
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
            });
        }
    });
    let udp_peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
    for addr in ["0.0.0.0:5353", "[2001:db8:64::2:1]:5353"] {
        let socket = run_in(&bed.ns("be1"), || UdpSocket::bind(addr)).unwrap();
        let peers = udp_peers.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok((n, peer)) = socket.recv_from(&mut buf) {
                peers.lock().unwrap().push(peer);
                let _ = socket.send_to(&buf[..n], peer);
            }
        });
    }
    Backends { kill, udp_peers }
}

/// Connects from the client namespace and returns the backend's line.
fn ask(bed: &Testbed) -> (SocketAddr, String) {
    ask_vip(bed, VIP)
}

/// Sends `count` datagrams "who" to the UDP `vip` from one socket of the
/// client namespace; returns the socket's address and the replies as text.
fn ask_udp(bed: &Testbed, vip: &str, count: usize) -> (SocketAddr, Vec<String>) {
    run_in(&bed.ns("client"), || {
        let socket = UdpSocket::bind(if vip.starts_with('[') { "[::]:0" } else { "0.0.0.0:0" }).unwrap();
        socket.connect(vip).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 128];
        let replies: Vec<String> = (0..count)
            .map(|_| {
                socket.send(b"who").unwrap();
                let n = socket.recv(&mut buf).expect("a reply through the LB");
                String::from_utf8_lossy(&buf[..n]).into_owned()
            })
            .collect();
        (socket.local_addr().unwrap(), replies)
    })
}

/// A connection from the client namespace to the echo listener
/// (203.0.113.10:81), reads timing out after `read_timeout`.
fn connect_echo(bed: &Testbed, read_timeout: Duration) -> TcpStream {
    let stream = run_in(&bed.ns("client"), || {
        TcpStream::connect_timeout(&"203.0.113.10:81".parse().unwrap(), Duration::from_secs(10))
    })
    .expect("connect to the echo listener");
    stream.set_read_timeout(Some(read_timeout)).unwrap();
    stream
}

fn ask_vip(bed: &Testbed, vip: &str) -> (SocketAddr, String) {
    run_in(&bed.ns("client"), || {
        let mut stream = TcpStream::connect_timeout(&vip.parse().unwrap(), Duration::from_secs(10))
            .expect("connect to the VIP");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut line = String::new();
        let local = stream.local_addr().unwrap();
        if let Err(e) = stream.read_to_string(&mut line) {
            // Where the connection stands on each side (the client's still open)
            // tells a lost handshake ACK (backend in SYN-RECV) from a lost answer.
            for ns in ["client", "be1", "be2"] {
                let out = Command::new("ip")
                    .args(["netns", "exec", &bed.ns(ns), "ss", "-tanoi", "exclude", "time-wait"])
                    .output();
                let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
                eprintln!("--- ss in {ns}:\n{text}");
            }
            panic!("read from {vip} (client {local}): {e}");
        }
        (local, line.trim_end().to_owned())
    })
}

both! {
fn toa_lb_end_to_end(dp: Dp) {
    require_root!();
    let case = Case::new("a", dp);
    let (bed, dir) = (&case.bed, &case.dir);

    // Obtain Client IP on: the backends name the client.
    let lb = start_lb(&case, "toa");
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} lb=100.125.1.")), "{line}");
    assert!(line.ends_with("source=saved-syn"), "{line}");
    // IPv6: the client as toa6, from the IPv6 SNAT address.
    let (local, line) = ask_vip(bed, "[2001:db8:c::10]:80");
    assert!(line.contains(&format!(" client={local} lb=[2001:db8:64::1:1]:")), "{line}");

    // Switched live over the control socket: new connections follow, and back.
    let ctl = |request: &str| -> String {
        let out = ctl_output(dir, request);
        assert!(out.status.success(), "ctl {request}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let listeners = ctl("listeners");
    assert!(listeners.contains("0 203.0.113.10:80 obtain-client-ip=toa(toa)"), "{listeners}");
    assert_eq!(
        ctl("set 203.0.113.10:80 obtain-client-ip off"),
        "203.0.113.10:80 obtain-client-ip=off (new flows)\n"
    );
    let (local, line) = ask(bed);
    assert!(
        line.contains(" client=100.125.1.") && !line.contains(&local.to_string()),
        "switched off: {line}"
    );
    ctl("set 0 obtain-client-ip toa");
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} ")), "switched back on: {line}");
    assert!(ctl("stats").lines().any(|l| l.starts_with("203.0.113.10:80 ") && l.contains(" flows=")));
    // Backends changed live: drained, removed, added back; the dead one shows down.
    assert!(ctl("backends").contains("203.0.113.10:80 100.125.2.1:9999 weight=1 down"));
    assert!(metrics_text(bed).contains(
        "toa_lb_backend_up{listener=\"203.0.113.10:80\",protocol=\"tcp\",backend=\"100.125.2.1:9999\"} 0"
    ));
    let all_on = |bed: &Testbed, prefix: &str| (0..6).all(|_| ask(bed).1.starts_with(prefix));
    ctl("drain 203.0.113.10:80 100.125.2.1:8080");
    assert!(all_on(bed, "be2 "), "a drained backend gets no new flow");
    ctl("undrain 203.0.113.10:80 100.125.2.1:8080");
    ctl("remove-backend 203.0.113.10:80 100.125.2.2:8080");
    assert!(all_on(bed, "be1 "), "a removed backend gets no new flow");
    ctl("add-backend 203.0.113.10:80 100.125.2.2:8080 1");
    assert!((0..6).any(|_| ask(bed).1.starts_with("be2 ")), "an added backend gets flows");

    // Transparent: DNAT only, the backend sees the client as its peer.
    ctl("set 203.0.113.10:80 obtain-client-ip transparent");
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} lb={local} source=none")), "transparent: {line}");
    ctl("set 203.0.113.10:80 obtain-client-ip toa");
    // Prometheus metrics on the LB host's loopback.
    let metrics = metrics_text(bed);
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    let value = |series: &str| metric(&metrics, series);
    assert!(value("toa_lb_toa_injected_total{listener=\"203.0.113.10:80\",protocol=\"tcp\"}") >= 4, "{metrics}");
    // Per backend: be1 and be2 each got flows and bytes both ways.
    for be in ["100.125.2.1:8080", "100.125.2.2:8080"] {
        let labels = format!("{{listener=\"203.0.113.10:80\",protocol=\"tcp\",backend=\"{be}\"}}");
        assert!(value(&format!("toa_lb_backend_flows_total{labels}")) >= 1, "{metrics}");
        assert!(value(&format!("toa_lb_backend_bytes_to_client_total{labels}")) > 0, "{metrics}");
    }
    assert!(value("toa_lb_bytes_to_backend_total{listener=\"203.0.113.10:80\",protocol=\"tcp\"}") > 0);
    match dp {
        Dp::Ring | Dp::Pnet => {
            assert_eq!(value("toa_lb_datapath_dropped_total{reason=\"truncated\"}"), 0, "offloads are off")
        }
        Dp::Kernel => {
            assert_eq!(value("toa_lb_datapath_dropped_total{reason=\"conntrack_insert_failed\"}"), 0);
            // The kernel datapath clamps the backend's MSS in its injector.
            assert!(value("toa_lb_mss_clamped_total{listener=\"203.0.113.10:80\",protocol=\"tcp\"}") >= 4);
            // Flow gauges come from a conntrack dump at most 0.5 s old (a
            // `ctl` request just before may have read none): read again after.
            std::thread::sleep(Duration::from_millis(600));
            let fresh = metrics_text(bed);
            assert!(metric(&fresh, "toa_lb_listener_flows{listener=\"203.0.113.10:80\",protocol=\"tcp\"}") >= 1, "{fresh}");
        }
    }
    assert!(
        metrics.contains(
            "toa_lb_dropped_total{listener=\"203.0.113.10:80\",protocol=\"tcp\",reason=\"no_flow\"}"
        )
    );
    assert!(
        metrics.contains("toa_lb_health_changes_total{listener=\"203.0.113.10:80\",protocol=\"tcp\"} 1"),
        "{metrics}"
    );
    let bad = ctl_output(dir, "set 203.0.113.99:80 obtain-client-ip off");
    assert!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("no listener 203.0.113.99:80")
    );

    // 1000+ connections at once, each naming its own client port; round robin over both backends.
    let answers: Arc<Mutex<Vec<(SocketAddr, String)>>> = Arc::default();
    run_in(&bed.ns("client"), || {
        std::thread::scope(|scope| {
            for _ in 0..8 {
                let answers = answers.clone();
                scope.spawn(move || {
                    let mut open = Vec::new();
                    for _ in 0..150 {
                        let s = TcpStream::connect_timeout(&VIP.parse().unwrap(), Duration::from_secs(10))
                            .expect("connect");
                        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                        open.push(s);
                    }
                    for mut s in open {
                        let mut line = String::new();
                        s.read_to_string(&mut line).expect("read");
                        answers.lock().unwrap().push((s.local_addr().unwrap(), line.trim_end().to_owned()));
                    }
                });
            }
        })
    });
    let answers = answers.lock().unwrap();
    assert_eq!(answers.len(), 1200);
    let mut per_backend = [0; 2];
    for (local, line) in answers.iter() {
        assert!(line.contains(&format!(" client={local} ")), "{line}");
        per_backend[usize::from(line.starts_with("be2"))] += 1;
    }
    assert!(per_backend[0] >= 550 && per_backend[1] >= 550, "round robin: {per_backend:?}");

    // 64 MiB each way through the LB, compared.
    run_in(&bed.ns("client"), || {
        let stream = TcpStream::connect_timeout(&"203.0.113.10:81".parse().unwrap(), Duration::from_secs(10))
            .expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        const SIZE: usize = 64 << 20;
        let mut writer = stream.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let mut sum = 0u64;
            let mut block = vec![0u8; 64 << 10];
            for i in 0..SIZE / block.len() {
                for (j, b) in block.iter_mut().enumerate() {
                    *b = (i * 131 + j * 7) as u8;
                }
                sum = block.iter().fold(sum, |s, b| s.wrapping_mul(31).wrapping_add(u64::from(*b)));
                writer.write_all(&block).expect("send");
            }
            writer.shutdown(std::net::Shutdown::Write).unwrap();
            sum
        });
        let (mut reader, mut got, mut sum) = (stream, 0usize, 0u64);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = reader.read(&mut buf).expect("receive");
            if n == 0 {
                break;
            }
            sum = buf[..n].iter().fold(sum, |s, b| s.wrapping_mul(31).wrapping_add(u64::from(*b)));
            got += n;
        }
        assert_eq!(got, SIZE, "all of it came back");
        assert_eq!(sum, sender.join().unwrap(), "and unchanged");
    });

    // A client that forges a TOA has it stripped: the backend sees the real one.
    let answer = forged_toa_connection(bed, "203.0.113.50", Duration::from_secs(15)).expect("answer");
    let line = String::from_utf8(answer).unwrap();
    assert!(line.contains("client=203.0.113.50:40000 "), "forged TOA not stripped: {line}");
    drop(lb);

    // SIGKILL leaves the nftables rules (and the kernel datapath's addresses);
    // the next start cleans them up.
    let mut lb = start_lb(&case, "off");
    assert!(nft_present(bed));
    lb.0.kill().unwrap();
    lb.0.wait().unwrap();
    assert!(nft_present(bed), "SIGKILL cannot clean up");
    if dp == Dp::Kernel {
        let left = leftovers(bed);
        assert!(left.iter().any(|l| l.contains("203.0.113.10")), "the VIP stays after SIGKILL: {left:?}");
        let programs_left = left.iter().any(|l| l.starts_with("program"));
        if std::env::var_os(toa_lb_injector::datapath::kernel::injector::NETLINK_TC_ENV).is_some() {
            // Before TCX: tc filters outlive the process; the next start removes them.
            assert!(programs_left, "tc filters stay after SIGKILL: {left:?}");
        } else {
            assert!(!programs_left, "TCX links die with the process: {left:?}");
        }
    }
    let lb = start_lb(&case, "off");
    let (local, line) = ask(bed);
    assert!(line.contains("client=100.125.1.") && !line.contains(&local.to_string()), "toa off: {line}");
    let (local, line) = ask_vip(bed, "[2001:db8:c::10]:80");
    assert!(
        line.contains(" client=[2001:db8:64::1:1]:") && !line.contains(&local.to_string()),
        "toa off, v6: {line}"
    );
    // SIGTERM: a clean exit removes them.
    Command::new("kill").args(["-TERM", &lb.0.id().to_string()]).status().unwrap();
    let mut lb = lb;
    let status = lb.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!nft_present(bed), "rules left after a clean exit");
    assert_eq!(leftovers(bed), Vec::<String>::new(), "a clean exit leaves nothing");
}
}

/// Runs `toa-lb run --config CONFIG` in the LB namespace (control socket
/// `SOCKET` in the case's directory), which must refuse; returns what it said.
fn run_refused(case: &Case, config: &std::path::Path, socket: &str) -> String {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &case.bed.ns("lb"), env!("CARGO_BIN_EXE_toa-lb"), "run", "--config"])
        .arg(config)
        .arg("--socket")
        .arg(case.dir.join(socket))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // One that starts instead runs until stopped: not a hang, a failure.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
            panic!("toa-lb run {} did not refuse: it started", config.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "toa-lb run {} did not refuse", config.display());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The value of `name=N` on a line of `toa-lb ctl stats`.
fn stat(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}=N in {line}"))
}

/// Runs `toa-lb ctl REQUEST` against the instance whose socket is in `dir`.
fn ctl_output(dir: &std::path::Path, request: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_toa-lb"))
        .args(["ctl", "--socket"])
        .arg(dir.join("ctl.sock"))
        .args(request.split_whitespace())
        .output()
        .expect("toa-lb ctl")
}

/// The value of `series` (name and labels) in the Prometheus text `metrics`.
fn metric(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} N in {metrics}"))
}

/// Scrapes the metrics endpoint inside the LB namespace.
fn metrics_text(bed: &Testbed) -> String {
    run_in(&bed.ns("lb"), || {
        let mut s = TcpStream::connect("127.0.0.1:9947").expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    })
}

fn nft_present(bed: &Testbed) -> bool {
    Command::new("ip")
        .args(["netns", "exec", &bed.ns("lb"), "nft", "list", "table", "inet", "toa_lb"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What a toa-lb left in the LB namespace: its nftables tables, the VIPs and
/// SNAT addresses, forwarding turned on, injector programs attached, its
/// state file. Empty after a clean exit.
fn leftovers(bed: &Testbed) -> Vec<String> {
    let lb = bed.ns("lb");
    let sh = |cmd: &[&str]| -> String {
        let out = Command::new("ip").args(["netns", "exec", &lb]).args(cmd).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut left = Vec::new();
    for table in sh(&["nft", "list", "tables"]).lines().filter(|l| l.contains("toa_lb")) {
        left.push(table.to_owned());
    }
    let addresses = sh(&["ip", "-o", "addr", "show"]);
    for addr in ["203.0.113.10", "2001:db8:c::10", "100.125.1.1", "100.125.1.2", "2001:db8:64::1:1 "] {
        if addresses.contains(addr) {
            left.push(format!("address {addr}"));
        }
    }
    for sysctl in
        ["net.ipv4.conf.lb-c.forwarding", "net.ipv4.conf.lb-br.forwarding", "net.ipv6.conf.all.forwarding"]
    {
        if sh(&["sysctl", "-n", sysctl]).trim() != "0" {
            left.push(format!("{sysctl} on"));
        }
    }
    for iface in ["lb-c", "lb-br"] {
        let programs = run_in(&lb, || toa_lb_injector::datapath::kernel::injector::attached_programs(iface));
        left.extend(programs.into_iter().map(|p| format!("program {p} on {iface}")));
    }
    left
}

both! {
/// A forged TOA in a handshake ACK that hides its TCP header from a reader
/// looking right after the IP header, as two IPv4 or IPv6 fragments or behind
/// an IPv6 destination-options header, never reaches a backend. (A backend's
/// kernel helper reads the handshake's ACK when the SYN had no TOA.) The
/// kernel datapath drops the first fragment and the extension-header segment
/// and counts them (`dropped_unreadable`); the user-space datapaths do not
/// forward fragments, and strip the option behind extension headers.
fn forged_toa_behind_fragments_or_extension_headers_stops_at_the_lb(dp: Dp) {
    require_root!();
    let case = Case::new("fx", dp);
    let (bed, dir) = (&case.bed, &case.dir);
    let _lb = start_lb(&case, "toa");
    let forged = Toa::new(Format::Toa, "10.9.9.9:1".parse().unwrap()).unwrap();
    // NOPs first, so that the whole option lies in the second fragment, where
    // the capture finds its bytes in one piece.
    let options: Vec<u8> = [1, 1, 1, 1].into_iter().chain(option_bytes(&forged)).collect();
    let client_mac = mac_of(&bed.ns("client"), "c0");
    let lb_mac = mac_of(&bed.ns("lb"), "lb-c");
    // Listeners with be1 as their only backend, where the capture runs.
    let tries = [
        ("203.0.113.53:40000", "203.0.113.10:81", Wire::Fragments),
        ("[2001:db8:c::53]:40000", "[2001:db8:c::10]:80", Wire::Fragments),
        ("[2001:db8:c::54]:40000", "[2001:db8:c::10]:80", Wire::DestinationOptions(1)),
        // Past the 8 extension headers the injector walks: no port to be
        // found, so no listener to count it against.
        ("[2001:db8:c::55]:40000", "[2001:db8:c::10]:80", Wire::DestinationOptions(9)),
    ];
    let conns: Vec<Conn> = tries
        .iter()
        .map(|(source, vip, wire)| {
            let source: SocketAddr = source.parse().unwrap();
            neighbor(bed, &source.ip().to_string(), client_mac);
            let mut conn = Conn::new(source, vip.parse().unwrap()).ack_as(*wire);
            conn.ack_options.clone_from(&options);
            conn
        })
        .collect();
    let counts = kernel::capture(bed, || {
        let mut raw = run_in(&bed.ns("client"), || Client::open("c0", client_mac, lb_mac));
        // What the backends answer does not matter: only what reaches them.
        let _ = raw.run(&conns, conns.len(), Duration::from_secs(3));
    });
    assert_eq!(counts["forged_toa"], 0, "a forged TOA reached be1: {counts}");
    if dp == Dp::Kernel {
        let stats = String::from_utf8(ctl_output(dir, "stats").stdout).unwrap();
        let line = |start: &str| {
            stats.lines().find(|l| l.starts_with(start)).unwrap_or_else(|| panic!("no {start}... in {stats}"))
        };
        let dropped = |listener: &str| stat(line(&format!("{listener} ")), "dropped_unreadable");
        // Each ACK at least once (the backend's SYN-ACK retransmissions bring more).
        assert!(dropped("203.0.113.10:81") >= 1, "{stats}");
        assert!(dropped("[2001:db8:c::10]:80") >= 2, "{stats}");
        // The long chain: dropped too, and counted for the host.
        assert!(stat(line("datapath dropped "), "unreadable") >= 1, "{stats}");
    }
}
}

/// One connection to the VIP from `source` (port 40000), an address the
/// client's kernel does not own (so that it never answers for it), with a
/// forged TOA (10.9.9.9:1) in its SYN: what the backend answered, or why
/// nothing came within `timeout`.
fn forged_toa_connection(bed: &Testbed, source: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let forged = Toa::new(Format::Toa, "10.9.9.9:1".parse().unwrap()).unwrap();
    let client_mac = mac_of(&bed.ns("client"), "c0");
    let lb_mac = mac_of(&bed.ns("lb"), "lb-c");
    let conn =
        Conn::new(format!("{source}:40000").parse().unwrap(), VIP.parse().unwrap()).toa_in_syn(&forged);
    // The raw client answers no ARP: the LB's kernel learns its address here.
    neighbor(bed, source, client_mac);
    let mut raw = run_in(&bed.ns("client"), || Client::open("c0", client_mac, lb_mac));
    raw.run(&[conn], 1, timeout).remove(0)
}

/// A static neighbour entry on the LB's client side (for raw clients, which
/// answer no ARP; the user-space datapaths learn MACs from frames anyway).
fn neighbor(bed: &Testbed, ip: &str, mac: [u8; 6]) {
    let mac = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let out = Command::new("ip")
        .args(["netns", "exec", &bed.ns("lb"), "ip", "neigh", "replace", ip, "lladdr", &mac, "dev", "lb-c"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ip neigh replace {ip}");
}

fn mac_of(ns: &str, iface: &str) -> [u8; 6] {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", &format!("/sys/class/net/{iface}/address")])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let bytes: Vec<u8> = text.trim().split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
    bytes.try_into().unwrap()
}

/// What became of the connections [`connect_through_start`] opened.
#[derive(Debug, Default)]
struct Outcomes {
    /// The backend's line, by the client's address.
    answered: Vec<(SocketAddr, String)>,
    /// Connected, and nothing ever came back.
    silent: Vec<SocketAddr>,
    /// Refused: a reset answered the SYN.
    refused: usize,
    /// Never connected otherwise (the SYNs met no LB).
    failed: usize,
}

impl std::fmt::Display for Outcomes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} answered (first: {:?}), {} silent {:?}, {} refused, {} failed",
            self.answered.len(),
            self.answered.first(),
            self.silent.len(),
            self.silent,
            self.refused,
            self.failed
        )
    }
}

/// Connections [`connect_through_start`] must see answered for its test to
/// mean something: at its pace, ~80-120 open around a ring's start and
/// ~150-200 around the kernel datapath's (it loads its BPF first); a CI run
/// under load saw 94 for the ring, all answered, against a bound of 100.
const MIN_ANSWERED_THROUGH_START: usize = 50;

/// Starts the LB (`toa` mode) while the client is already sending: its
/// neighbour cache knows the VIP (as after a restart, so SYNs go out at
/// once), and it opens a non-blocking connection every 5 ms from 100 ms
/// before the start until 300 ms after it. Then reads every answer, until
/// 12 s later: a SYN that met no LB is sent again at 1 s, 3 s and 7 s, so a
/// connection still unanswered then, but connected, has been silent for seconds.
fn connect_through_start(case: &Case) -> (Lb, Outcomes) {
    let bed = &case.bed;
    let lb_mac = mac_of(&bed.ns("lb"), "lb-c").map(|b| format!("{b:02x}")).join(":");
    let vip = VIP.parse::<SocketAddr>().unwrap();
    let neigh = ["ip", "neigh", "replace", &vip.ip().to_string(), "lladdr", &lb_mac, "dev", "c0"];
    let out = Command::new("ip").args(["netns", "exec", &bed.ns("client")]).args(neigh).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stop = Arc::new(AtomicBool::new(false));
    let opener = {
        let (stop, ns) = (stop.clone(), bed.ns("client"));
        std::thread::spawn(move || {
            run_in(&ns, || {
                let mut sockets = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let socket =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                    socket.set_nonblocking(true).unwrap();
                    // In progress: the SYN is out.
                    let _ = socket.connect(&vip.into());
                    sockets.push(TcpStream::from(socket));
                    // (More would overflow the test backends' accept queues:
                    // with SYN cookies, a connection then stays silent.)
                    std::thread::sleep(Duration::from_millis(5));
                }
                sockets
            })
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    // Without the dead backend: until health checks took it out, it would refuse some.
    let text = config_text("toa", case.dp.config())
        .replace(&format!("[[listener.backend]]\naddress = \"{DEAD_BACKEND}\"\n\n"), "");
    assert!(!text.contains(DEAD_BACKEND));
    let lb = start_lb_text(case, "toa", &text);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let sockets = opener.join().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    let mut outcomes = Outcomes::default();
    for mut stream in sockets {
        stream.set_nonblocking(false).unwrap();
        let left =
            deadline.saturating_duration_since(std::time::Instant::now()).max(Duration::from_millis(1));
        stream.set_read_timeout(Some(left)).unwrap();
        let mut line = String::new();
        match stream.read_to_string(&mut line) {
            Ok(_) if line.starts_with("be") => {
                outcomes.answered.push((stream.local_addr().unwrap(), line.trim_end().to_owned()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => outcomes.refused += 1,
            _ if stream.peer_addr().is_ok() => outcomes.silent.push(stream.local_addr().unwrap()),
            _ => outcomes.failed += 1,
        }
    }
    (lb, outcomes)
}

/// One connection of the steady load: when it started, and its local address and answer.
type Attempt = (Duration, Result<(SocketAddr, String), String>);

/// A steady load from the client namespace until `done`: four loops, each
/// connecting to the VIP, reading the backend's line, pausing 5 ms (a few
/// hundred connections per second). Every attempt is recorded with its start
/// time (since `start`).
fn steady_load(
    bed: &Testbed,
    start: std::time::Instant,
    done: Arc<AtomicBool>,
) -> (std::thread::JoinHandle<()>, Arc<Mutex<Vec<Attempt>>>) {
    let results: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let load = {
        let (results, client_ns) = (results.clone(), bed.ns("client"));
        std::thread::spawn(move || {
            run_in(&client_ns, || {
                std::thread::scope(|scope| {
                    for _ in 0..4 {
                        let (results, done) = (results.clone(), done.clone());
                        scope.spawn(move || {
                            while !done.load(Ordering::Relaxed) {
                                let at = start.elapsed();
                                let result =
                                    TcpStream::connect_timeout(&VIP.parse().unwrap(), Duration::from_secs(5))
                                        .and_then(|mut s| {
                                            s.set_read_timeout(Some(Duration::from_secs(5)))?;
                                            let mut line = String::new();
                                            s.read_to_string(&mut line)?;
                                            if line.is_empty() {
                                                return Err(std::io::Error::other(
                                                    "closed without an answer",
                                                ));
                                            }
                                            Ok((s.local_addr()?, line.trim_end().to_owned()))
                                        })
                                        .map_err(|e| e.to_string());
                                results.lock().unwrap().push((at, result));
                                std::thread::sleep(Duration::from_millis(5));
                            }
                        });
                    }
                })
            })
        })
    };
    (load, results)
}

both! {
/// Obtain Client IP switched ten times under steady load: no connection fails,
/// and each one's backend line matches the mode in force when it started.
fn live_switch_under_load(dp: Dp) {
    require_root!();
    let case = Case::new("s", dp);
    let (bed, dir, stop) = (&case.bed, &case.dir, &case.stop);
    let _lb = start_lb(&case, "toa");
    let start = std::time::Instant::now();
    let load_done = Arc::new(AtomicBool::new(false));
    let (load, results) = steady_load(bed, start, load_done.clone());
    let mut switches = Vec::new();
    for i in 0..10 {
        std::thread::sleep(Duration::from_millis(300));
        let mode = if i % 2 == 0 { "off" } else { "toa" };
        let before = start.elapsed();
        let out = ctl_output(dir, &format!("set 0 obtain-client-ip {mode}"));
        assert!(out.status.success());
        // The switch takes effect somewhere between `before` and now.
        switches.push((before, start.elapsed(), mode == "toa"));
    }
    std::thread::sleep(Duration::from_millis(300));
    load_done.store(true, Ordering::Relaxed);
    load.join().unwrap();
    stop.store(true, Ordering::Relaxed);

    let results = results.lock().unwrap();
    assert!(results.len() >= 300, "steady load: {} connections", results.len());
    let mut checked = 0;
    for (at, result) in results.iter() {
        let (local, line) = result.as_ref().unwrap_or_else(|e| panic!("a connection failed at {at:?}: {e}"));
        // The mode in force when the connection started; ambiguous while a switch is
        // under way and for 50 ms either side.
        let margin = Duration::from_millis(50);
        let near = switches.iter().any(|(from, to, _)| *at + margin >= *from && *at <= *to + margin);
        let toa = switches.iter().rev().find(|(_, to, _)| to <= at).map(|(_, _, toa)| *toa).unwrap_or(true);
        let named = line.contains(&format!(" client={local} "));
        if !near {
            assert_eq!(named, toa, "started at {at:?} under {}: {line}", if toa { "toa" } else { "off" });
            checked += 1;
        }
    }
    assert!(
        checked * 2 >= results.len(),
        "most connections are away from a switch: {checked} of {}",
        results.len()
    );
}
}

both! {
/// A SYN flood from the client namespace (bounded: 20000 SYNs): the flow table
/// stays at its bound, toa-lb's memory stays flat, and a real client is served.
fn syn_flood_is_bounded(dp: Dp) {
    require_root!();
    let case = Case::new("f", dp);
    let (bed, dir) = (&case.bed, &case.dir);
    // start_lb's configuration, with room for only 500 flows.
    let lb = start_lb_with(&case, "toa", "max_flows = 500\n");
    let rss = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    // `ip netns exec` execs toa-lb in place: the child's pid is toa-lb's.
    let pid = lb.0.id();
    let flood = |count: u32| {
        let client_mac = mac_of(&bed.ns("client"), "c0");
        let lb_mac = mac_of(&bed.ns("lb"), "lb-c");
        let mut raw = run_in(&bed.ns("client"), || Client::open("c0", client_mac, lb_mac));
        for i in 0..count {
            // Sources the client's kernel does not own, so that it never answers the SYN-ACKs.
            let src = SocketAddr::new(
                std::net::Ipv4Addr::new(203, 0, 113, 100 + (i % 150) as u8).into(),
                1024 + (i / 150) as u16,
            );
            let conn = Conn::new(src, VIP.parse().unwrap());
            let syn = toa_testkit::rawtcp::Segment {
                flags: toa_core::TcpFlags::SYN,
                seq: i,
                ack: 0,
                options: &[],
                payload: &[],
            };
            raw.send_segment(&conn, syn);
            if i % 200 == 199 {
                // Paced, so that the LB's socket buffer rather than the flood decides less.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    flood(5000);
    std::thread::sleep(Duration::from_millis(500));
    let after_first = rss(pid);
    flood(15000);
    std::thread::sleep(Duration::from_millis(500));
    let after_all = rss(pid);
    let stats = ctl_output(dir, "stats");
    let stats = String::from_utf8(stats.stdout).unwrap();
    let flows: usize =
        stats.lines().next().and_then(|l| l.strip_prefix("flows ")?.parse().ok()).expect("flows line");
    assert!(flows <= 500, "the table stays at its bound: {stats}");
    let counter = |name: &str| -> u64 {
        stats
            .lines()
            .find(|l| l.starts_with("203.0.113.10:80 "))
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}="))?.parse().ok()))
            .unwrap_or_else(|| panic!("{name} counter: {stats}"))
    };
    let (evicted, refused) = (counter("evicted"), counter("dropped_table_full"));
    match dp {
        // (Some SYNs are lost before the LB when its socket buffer overflows; most get through.)
        Dp::Ring | Dp::Pnet => assert!(evicted >= 10_000, "half-open flows were evicted: {stats}"),
        // The injector refuses new flows while the budget is spent, and toa-lb evicts
        // half-open ones a few times a second to make room.
        Dp::Kernel => assert!(
            evicted > 0 && refused > 0 && evicted + refused >= 10_000,
            "half-open flows were evicted and new ones refused: {stats}"
        ),
    }
    // Memory flat: three times the flood after the table filled adds almost nothing.
    assert!(
        after_all < after_first + 4096,
        "toa-lb grew from {after_first} kB to {after_all} kB under the flood"
    );
    // A real client is still served. (Its address may not reach the backend: the flood went
    // through to the backends, whose SYN cookies then keep no SYN for the saved-SYN reader; the
    // TOA in the handshake ACK is there for the kernel helper.)
    let (_, line) = ask(bed);
    assert!(line.starts_with("be1 ") || line.starts_with("be2 "), "{line}");
    drop(lb);
}
}

both! {
/// A backend killed under steady load: out of rotation within fall x interval
/// (plus one interval, for where the kill falls in the probe cycle, and the
/// probe timeout), and no new connection fails after that.
fn backend_killed_under_load(dp: Dp) {
    require_root!();
    let case = Case::new("k", dp);
    let (bed, dir, stop) = (&case.bed, &case.dir, &case.stop);
    let backends = &case.backends;
    let _lb = start_lb(&case, "toa");
    let start = std::time::Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let (load, results) = steady_load(bed, start, done.clone());
    std::thread::sleep(Duration::from_millis(500));
    // be2 crashes: its listener closes, connections to it are refused.
    let killed_at = start.elapsed();
    backends.kill[1].store(true, Ordering::Relaxed);
    let down_at = loop {
        let out = String::from_utf8(ctl_output(dir, "backends").stdout).unwrap();
        if out.contains("100.125.2.2:8080 weight=1 down") {
            break start.elapsed();
        }
        assert!(start.elapsed() < killed_at + Duration::from_secs(5), "be2 never marked down: {out}");
        std::thread::sleep(Duration::from_millis(10));
    };
    std::thread::sleep(Duration::from_millis(1000));
    done.store(true, Ordering::Relaxed);
    load.join().unwrap();
    stop.store(true, Ordering::Relaxed);

    // How soon is the health checker's business (HEALTH_FALL failed checks,
    // HEALTH_INTERVAL_MS apart): reported, not asserted, since a loaded
    // machine stretches it; the 5-second wait above only catches "never".
    eprintln!(
        "be2 marked down {:?} after its listener closed ({HEALTH_FALL} checks of {HEALTH_INTERVAL_MS} ms)",
        down_at - killed_at
    );
    let results = results.lock().unwrap();
    let after: Vec<&Attempt> = results.iter().filter(|(at, _)| *at > down_at).collect();
    assert!(after.len() >= 100, "steady load after the kill: {} connections", after.len());
    for (at, result) in &after {
        let (_, line) =
            result.as_ref().unwrap_or_else(|e| panic!("a connection started at {at:?} failed: {e}"));
        assert!(line.starts_with("be1 "), "only be1 is left: {line}");
    }
    let before = results.iter().filter(|(at, r)| *at < killed_at && r.is_ok()).count();
    assert!(before >= 50, "the load ran before the kill: {before}");
}
}

both! {
/// UDP through the LB, IPv4 and IPv6, in `off` (FULLNAT: the backend sees an
/// SNAT address) and `transparent` (the client's own address) modes:
/// datagrams of 1 byte to a full MTU come back unchanged; TOA is refused.
fn udp_echo_off_and_transparent(dp: Dp) {
    require_root!();
    let case = Case::new("u", dp);
    let (bed, dir) = (&case.bed, &case.dir);
    let backends = &case.backends;
    let _lb = start_lb(&case, "toa");
    let echo = |vip: &str, size: usize| -> SocketAddr {
        run_in(&bed.ns("client"), || {
            let vip: SocketAddr = vip.parse().unwrap();
            let socket = UdpSocket::bind(if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
            socket.connect(vip).unwrap();
            socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            let payload: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
            let mut buf = [0u8; 2048];
            // UDP may lose the first datagram while the LB resolves a neighbour: retry.
            for _ in 0..10 {
                socket.send(&payload).unwrap();
                if let Ok(n) = socket.recv(&mut buf) {
                    assert_eq!(&buf[..n], &payload[..], "{size} bytes through {vip} came back changed");
                    return socket.local_addr().unwrap();
                }
            }
            panic!("no echo of {size} bytes through {vip}");
        })
    };
    let ctl = |request: &str| {
        let out = ctl_output(dir, request);
        assert!(out.status.success(), "ctl {request}: {}", String::from_utf8_lossy(&out.stderr));
    };
    for mode in ["off", "transparent"] {
        ctl(&format!("set udp/{UDP_VIP} obtain-client-ip {mode}"));
        ctl(&format!("set udp/{UDP_VIP6} obtain-client-ip {mode}"));
        // 1472 and 1452 bytes fill a 1500-byte MTU over IPv4 and IPv6.
        for (vip, sizes) in [(UDP_VIP, [1, 512, 1472]), (UDP_VIP6, [1, 512, 1452])] {
            for size in sizes {
                let local = echo(vip, size);
                let seen = *backends.udp_peers.lock().unwrap().last().unwrap();
                match mode {
                    "transparent" => assert_eq!(seen, local, "transparent: the backend sees the client"),
                    _ => {
                        assert_ne!(seen.ip(), local.ip(), "off: the backend sees an SNAT address");
                        let pool = ["100.125.1.1", "100.125.1.2", "2001:db8:64::1:1"];
                        assert!(pool.contains(&seen.ip().to_string().as_str()), "{seen}");
                    }
                }
            }
        }
    }
    let toa = ctl_output(dir, &format!("set udp/{UDP_VIP} obtain-client-ip toa"));
    assert!(!toa.status.success(), "TOA on a UDP listener must be refused");
    assert!(String::from_utf8_lossy(&toa.stderr).contains("toa is for TCP, uoa for UDP"));
    let stats = String::from_utf8(ctl_output(dir, "stats").stdout).unwrap();
    let udp = stats.lines().find(|l| l.starts_with(&format!("udp/{UDP_VIP} "))).expect("udp stats");
    assert!(udp.contains(" flows=") && !udp.contains(" to_client=0 "), "{udp}");
}
}

both! {
/// Reload on SIGHUP (and `ctl reload`): a bad file is rejected with its error
/// and the running configuration stays; a good one applies to new flows while
/// an open connection goes on, and the nftables rules follow the new VIPs.
fn reload_rejects_bad_config_and_applies_good(dp: Dp) {
    require_root!();
    let case = Case::new("r", dp);
    let (bed, dir) = (&case.bed, &case.dir);
    let lb = start_lb(&case, "toa");
    let path = dir.join("lb-toa.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    let sighup = || {
        Command::new("kill").args(["-HUP", &lb.0.id().to_string()]).status().unwrap();
        std::thread::sleep(Duration::from_millis(300));
    };
    // An open connection through the echo listener, to carry on across reloads.
    let mut open = connect_echo(bed, Duration::from_secs(5));
    let mut echo = |text: &[u8]| {
        open.write_all(text).unwrap();
        let mut buf = vec![0u8; text.len()];
        open.read_exact(&mut buf).unwrap();
        assert_eq!(buf, text);
    };
    echo(b"before");

    // Bad: a listener without backends. SIGHUP logs the error; ctl reload returns it.
    let bad = good.replace("[[listener.backend]]\naddress = \"100.125.2.1:8081\"\n", "");
    assert_ne!(bad, good);
    std::fs::write(&path, &bad).unwrap();
    sighup();
    assert!(lb.1.lock().unwrap().contains("reload rejected"), "{}", lb.1.lock().unwrap());
    let out = ctl_output(dir, "reload");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("listener 203.0.113.10:81 has no backends"), "{err}");
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} ")), "the old configuration (toa) still runs: {line}");
    echo(b"after a bad reload");
    // A syntax error is named by line too, and changes nothing either.
    std::fs::write(&path, good.replace("obtain_client_ip = \"toa\"", "obtain_client_ip = toa")).unwrap();
    let err = String::from_utf8(ctl_output(dir, "reload").stderr).unwrap();
    assert!(err.contains("line "), "{err}");

    // Good: TOA off on every TCP listener, and a new listener on another VIP.
    let new = good.replace("obtain_client_ip = \"toa\"", "obtain_client_ip = \"off\"")
        + "\n[[listener]]\nvip = \"203.0.113.11:80\"\n\n[[listener.backend]]\naddress = \"100.125.2.2:8080\"\n";
    std::fs::write(&path, &new).unwrap();
    sighup();
    assert!(lb.1.lock().unwrap().contains("SIGHUP: reloaded"), "{}", lb.1.lock().unwrap());
    let (local, line) = ask(bed);
    assert!(line.contains("client=100.125.1.") && !line.contains(&local.to_string()), "now off: {line}");
    let (_, line) = ask_vip(bed, "203.0.113.11:80");
    assert!(line.starts_with("be2 "), "the new listener: {line}");
    echo(b"after a good reload");
    let rules = Command::new("ip")
        .args(["netns", "exec", &bed.ns("lb"), "nft", "list", "table", "inet", "toa_lb"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&rules.stdout).contains("203.0.113.11"), "nft follows the new VIP");
    let listeners = String::from_utf8(ctl_output(dir, "listeners").stdout).unwrap();
    assert!(listeners.contains("203.0.113.11:80 obtain-client-ip=off"), "{listeners}");
    drop(lb);
}
}

both! {
/// The client link goes down and up: toa-lb does not spin while it is down
/// (a packet socket reports ENETDOWN once, and poll would return at once for
/// ever if the error were not read) and serves again when it is back.
fn link_flap_recovers(dp: Dp) {
    require_root!();
    let case = Case::new("l", dp);
    let bed = &case.bed;
    let lb = start_lb(&case, "toa");
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} ")), "{line}");
    let link = |state: &str| {
        let ok = Command::new("ip")
            .args(["netns", "exec", &bed.ns("lb"), "ip", "link", "set", "lb-c", state])
            .status()
            .unwrap();
        assert!(ok.success(), "ip link set lb-c {state}");
    };
    // CPU time (user + system, in clock ticks) of the toa-lb process.
    let ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", lb.0.id())).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    link("down");
    std::thread::sleep(Duration::from_millis(300));
    let before = ticks();
    std::thread::sleep(Duration::from_secs(1));
    let spent = ticks() - before;
    // A spinning worker burns a whole CPU (100 ticks a second); idle health
    // probes and sleeping workers, almost nothing.
    assert!(spent < 40, "toa-lb used {spent} ticks in a second with the link down");
    link("up");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answered = run_in(&bed.ns("client"), || {
            TcpStream::connect_timeout(&VIP.parse().unwrap(), Duration::from_secs(2)).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut line = String::new();
                s.read_to_string(&mut line)?;
                Ok(line)
            })
        });
        match answered {
            Ok(line) if line.starts_with("be") => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "not served after the link came back: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if dp == Dp::Ring {
        assert!(lb.1.lock().unwrap().contains("Network is down"), "the error is logged");
    }
}
}

both! {
/// Someone else flushes the ruleset (`nft flush ruleset`, as nftables.service
/// does when it restarts) and, on the kernel datapath, removes the VIP from
/// the interface (as a network manager may) and turns forwarding off: toa-lb
/// puts them back within a second or so, says so, and new connections are
/// balanced (with their TOA) again.
fn ruleset_flushed_by_someone_else_is_put_back(dp: Dp) {
    require_root!();
    let case = Case::new("f", dp);
    let bed = &case.bed;
    let lb = start_lb(&case, "toa");
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} ")), "{line}");
    // The listener's flows and bytes, as `ctl stats` says them.
    let stats = || {
        let out = String::from_utf8(ctl_output(&case.dir, "stats").stdout).unwrap();
        let line = out.lines().find(|l| l.starts_with(&format!("{VIP} "))).unwrap_or_else(|| panic!("{out}"));
        (stat(line, "flows"), stat(line, "bytes_to_backend"))
    };
    let before = stats();
    assert!(before.0 >= 1 && before.1 > 0, "{before:?}");
    let lb_ns = |args: &[&str]| {
        let ok = Command::new("ip").args(["netns", "exec", &bed.ns("lb")]).args(args).status().unwrap();
        assert!(ok.success(), "{args:?}");
    };
    lb_ns(&["nft", "flush", "ruleset"]);
    let mut expected = vec!["tables inet and netdev toa_lb were removed by someone else"];
    if dp == Dp::Kernel {
        lb_ns(&["ip", "addr", "del", "203.0.113.10/32", "dev", "lb-c"]);
        lb_ns(&["sysctl", "-qw", "net.ipv4.conf.lb-c.forwarding=0"]);
        expected = vec![
            "table inet toa_lb was removed by someone else",
            "203.0.113.10 was removed from lb-c by someone else: put back",
            "net.ipv4.conf.lb-c.forwarding was turned off by someone else: turned on again",
        ];
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !(expected.iter().all(|e| lb.1.lock().unwrap().contains(e)) && nft_present(bed)) {
        assert!(std::time::Instant::now() < deadline, "the tables were not put back");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} ")), "balanced with the TOA again: {line}");
    // The totals went on from where they were (the kernel datapath's counters
    // are the table's, which started again from zero).
    let after = stats();
    assert!(after.0 > before.0 && after.1 > before.1, "before {before:?}, after {after:?}");
    if dp == Dp::Kernel {
        // The same when someone resets the table's counters.
        lb_ns(&["nft", "reset", "counters", "table", "inet", "toa_lb"]);
        let (local, line) = ask(bed);
        assert!(line.contains(&format!(" client={local} ")), "{line}");
        let reset = stats();
        assert!(reset.0 > after.0 && reset.1 > after.1, "before the reset {after:?}, after it {reset:?}");
    }
    // What was put back is counted (for alerts: toa_lb_put_back_total).
    let out = String::from_utf8(ctl_output(&case.dir, "stats").stdout).unwrap();
    let put_back = match dp {
        Dp::Kernel => "put back table=1 address=1 forwarding=1 programs=0",
        _ => "put back table=1",
    };
    assert!(out.lines().any(|l| l == put_back), "{put_back:?} in {out}");
}
}

both! {
/// A second toa-lb started in the same network namespace (a hand-run copy
/// beside the service) is refused at once, saying why, and touches nothing
/// of the first: its table (or fence), addresses and programs stay, nothing
/// had to be put back, and it goes on serving.
fn a_second_instance_is_refused_and_touches_nothing(dp: Dp) {
    require_root!();
    let case = Case::new("2", dp);
    let bed = &case.bed;
    let _lb = start_lb(&case, "toa");
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} ")), "{line}");
    let err = run_refused(&case, &case.dir.join("lb-toa.toml"), "second.sock");
    assert!(err.contains("another toa-lb is running in this network namespace"), "{err}");
    // Long enough for the first one's watch to have looked (its programs: every 2 s).
    std::thread::sleep(Duration::from_millis(2500));
    let stats = String::from_utf8(ctl_output(&case.dir, "stats").stdout).unwrap();
    let untouched = match dp {
        Dp::Kernel => "put back table=0 address=0 forwarding=0 programs=0",
        _ => "put back table=0",
    };
    assert!(stats.lines().any(|l| l == untouched), "{untouched:?} in {stats}");
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} ")), "{line}");
}
}

both! {
/// The client interface is deleted and made again under a running toa-lb
/// (new index): what toa-lb had put on it (programs, VIPs, its forwarding
/// sysctl, the rings' bindings) went with the old one, and nothing would be
/// served. toa-lb stops with an error naming the interface, leaves nothing
/// behind, and started again it serves.
fn interface_made_again_stops_the_run_and_a_restart_serves(dp: Dp) {
    require_root!();
    let case = Case::new("i", dp);
    let bed = &case.bed;
    let mut lb = start_lb(&case, "toa");
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} ")), "{line}");
    let relink = Command::new(scripts().join("testbed.sh"))
        .args(["relink", &bed.prefix])
        .env("OFFLOADS", dp.offloads())
        .output()
        .unwrap();
    assert!(relink.status.success(), "testbed.sh relink: {}", String::from_utf8_lossy(&relink.stderr));
    let said = "interface lb-c was made again";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        let log_has_it = lb.1.lock().unwrap().contains(said);
        match lb.0.try_wait().unwrap() {
            Some(status) if log_has_it => break status,
            _ => assert!(std::time::Instant::now() < deadline, "toa-lb did not stop and say {said:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "an error exit, for a service manager to restart it: {status}");
    drop(lb);
    assert_eq!(leftovers(bed), Vec::<String>::new());
    let _lb = start_lb(&case, "toa");
    let (local, line) = ask(bed);
    assert!(line.contains(&format!(" client={local} ")), "served after a restart: {line}");
}
}
