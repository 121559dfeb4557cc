//! The kernel helper end to end: unmodified servers (`whoami --source none`,
//! socat, python) in a cgroup the helper is attached to see the client; the
//! same servers outside it see the load balancer.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use toa_core::{Format, Formats, Toa};
use toa_server_shim::TrustPolicy;
use toa_server_shim::ebpf::{self, AttachOptions};
use toa_testkit::bed::{Bed, LB_V4, LB_V6, SERVER_V4, SERVER_V6, STRANGER_V4, sock};
use toa_testkit::cgroup::Cgroup;
use toa_testkit::rawtcp::Conn;
use toa_testkit::require_root;

/// Detaches the helper on drop, also when the test fails.
struct Attached;

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = ebpf::detach();
    }
}

/// A server process, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn toa(format: Format, addr: &str) -> Toa {
    Toa::new(format, addr.parse().unwrap()).unwrap()
}

/// Waits until something listens on `port` in the testbed.
fn wait_listening(bed: &Bed, port: u16) {
    assert!(listening(bed, port), "nothing listens on port {port}");
}

fn listening(bed: &Bed, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = bed.ns.command("ss").args(["-Hltn", &format!("sport = :{port}")]).output().expect("ss");
        if !out.stdout.is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn spawn(mut cmd: Command) -> Server {
    Server(cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn server"))
}

/// Runs `conns` and returns each answer as text.
fn answers(bed: &Bed, conns: &[Conn]) -> Vec<String> {
    bed.client()
        .run(conns, 200, Duration::from_secs(30))
        .into_iter()
        .enumerate()
        .map(|(i, a)| String::from_utf8(a.unwrap_or_else(|e| panic!("connection {i}: {e}"))).unwrap())
        .collect()
}

#[test]
fn unmodified_servers_see_the_client() {
    require_root!();
    let _lock = toa_testkit::helper_lock();
    if ebpf::is_attached() {
        eprintln!("SKIP: the kernel helper is attached on this machine; not touching it");
        return;
    }
    let bed = Bed::new("ebpf");
    let inside = Cgroup::new("ebpf-in");
    let sources = ["huawei-elb", "2001:db8:64::/48"].iter().map(|s| s.parse().unwrap()).collect();
    let options = AttachOptions {
        cgroup: Some(inside.path().to_owned()),
        policy: TrustPolicy::new(sources).unwrap(),
        formats: Formats::default(),
        udp: None,
    };
    ebpf::attach(&options).expect("attach");
    let _attached = Attached;

    let whoami = env!("CARGO_BIN_EXE_whoami");
    let ns = bed.ns.name().to_owned();
    let trust = ["--trust", "huawei-elb", "--trust", "2001:db8:64::/48"];
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let none = |listen: &str| -> Vec<String> {
        let mut args = vec!["--listen", listen, "--source", "none"];
        args.extend(trust);
        args.into_iter().map(str::to_owned).collect()
    };
    let _v4 = spawn(inside.command_in(&ns, whoami, &args(&none("192.0.2.10:8080"))));
    let _v6 = spawn(inside.command_in(&ns, whoami, &args(&none("[2001:db8:be::a]:8081"))));
    let _dual = spawn(inside.command_in(&ns, whoami, &args(&none("[::]:8082"))));
    // The same program outside the cgroup: untouched.
    let mut outside = bed.ns.command(whoami);
    outside.args(args(&none("192.0.2.10:8083")));
    let _outside = spawn(outside);
    // whoami in auto mode inside: the library reads the helper's record, so lb is right too.
    let mut auto = vec!["--listen", "192.0.2.10:8084", "--source", "auto"];
    auto.extend(trust);
    let _auto = spawn(inside.command_in(&ns, whoami, &auto));
    for port in 8080..=8084 {
        wait_listening(&bed, port);
    }

    let v4_client = toa(Format::Toa, "203.0.113.7:40000");
    let v6_client = toa(Format::Toa6, "[2001:db8:c::7]:40000");
    let (s4, s6, sd, out, au) = (
        sock(SERVER_V4, 8080),
        sock(SERVER_V6, 8081),
        sock(SERVER_V4, 8082),
        sock(SERVER_V4, 8083),
        sock(SERVER_V4, 8084),
    );
    let lb4 = |port| sock(LB_V4, port);
    let lb6 = |port| sock(LB_V6, port);
    let mut malformed = Conn::new(lb4(20005), s4);
    malformed.ack_options = vec![254, 0, 0, 0];
    let request = b"hello\n";
    let cases: Vec<(&str, Conn, String)> = vec![
        (
            "v4 toa in syn",
            Conn::new(lb4(20001), s4).toa_in_syn(&v4_client),
            "client=203.0.113.7:40000 lb=203.0.113.7:40000 source=none".into(),
        ),
        (
            "v4 toa in the ack only (LVS, Huawei ELB)",
            Conn::new(lb4(20002), s4).toa_in_ack(&v4_client),
            "client=203.0.113.7:40000 lb=203.0.113.7:40000 source=none".into(),
        ),
        (
            "no toa",
            Conn::new(lb4(20004), s4),
            "client=100.125.0.1:20004 lb=100.125.0.1:20004 source=none".into(),
        ),
        (
            "malformed option in the ack",
            malformed,
            "client=100.125.0.1:20005 lb=100.125.0.1:20005 source=none".into(),
        ),
        (
            "untrusted source",
            Conn::new(sock(STRANGER_V4, 20006), s4).toa_in_syn(&v4_client),
            "client=198.51.100.9:20006 lb=198.51.100.9:20006 source=none".into(),
        ),
        (
            "v6 toa on a v4 socket: not rewritten",
            Conn::new(lb4(20007), s4).toa_in_syn(&v6_client),
            "client=100.125.0.1:20007 lb=100.125.0.1:20007 source=none".into(),
        ),
        (
            "v6 toa in syn",
            Conn::new(lb6(20008), s6).toa_in_syn(&v6_client),
            "client=[2001:db8:c::7]:40000 lb=[2001:db8:c::7]:40000 source=none".into(),
        ),
        (
            "v6 toa in the ack only",
            Conn::new(lb6(20009), s6).toa_in_ack(&v6_client),
            "client=[2001:db8:c::7]:40000 lb=[2001:db8:c::7]:40000 source=none".into(),
        ),
        (
            "v4 toa on a dual-stack socket",
            Conn::new(lb4(20010), sd).toa_in_ack(&v4_client),
            "client=[::ffff:203.0.113.7]:40000 lb=[::ffff:203.0.113.7]:40000 source=none".into(),
        ),
        (
            "outside the cgroup: untouched",
            Conn::new(lb4(20011), out).toa_in_ack(&v4_client),
            "client=100.125.0.1:20011 lb=100.125.0.1:20011 source=none".into(),
        ),
        (
            "the library reads the helper: lb stays the LB",
            Conn::new(lb4(20012), au).toa_in_ack(&v4_client),
            "client=203.0.113.7:40000 lb=100.125.0.1:20012 source=ebpf".into(),
        ),
    ];
    let conns: Vec<Conn> = cases.iter().map(|c| c.1.clone()).collect();
    for ((name, _, expected), answer) in cases.iter().zip(answers(&bed, &conns)) {
        assert_eq!(answer.trim_end(), expected, "{name}");
    }

    // A TOA in data before the server accepts (DPVS): a server that accepts late sees it.
    let late = "import socket,time\n\
        s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
        s.bind(('192.0.2.10', 8085)); s.listen(64)\n\
        while True:\n time.sleep(0.3); c,a=s.accept(); c.sendall(('%s:%d\\n' % a).encode()); c.close()\n";
    let _late = spawn(inside.command_in(&ns, "python3", &["-c", late]));
    wait_listening(&bed, 8085);
    let conn = Conn::new(lb4(20020), sock(SERVER_V4, 8085)).toa_in_data(&v4_client, request);
    assert_eq!(answers(&bed, &[conn]), ["203.0.113.7:40000\n"], "toa in the first data segment");

    // A TOA in data after the server accepted: the address it was given never changes.
    let twice = "import socket\n\
        s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
        s.bind(('192.0.2.10', 8088)); s.listen(64)\n\
        while True:\n c,a=s.accept(); c.recv(100); b=c.getpeername(); c.sendall(('%s:%d %s:%d\\n' % (a+b)).encode()); c.close()\n";
    let _twice = spawn(inside.command_in(&ns, "python3", &["-c", twice]));
    wait_listening(&bed, 8088);
    let mut conn = Conn::new(lb4(20023), sock(SERVER_V4, 8088)).toa_in_data(&v4_client, request);
    conn.request_delay = Duration::from_millis(300);
    assert_eq!(
        answers(&bed, &[conn]),
        ["100.125.0.1:20023 100.125.0.1:20023\n"],
        "accept and a later getpeername agree"
    );

    // socat and python's http.server, unmodified, in the cgroup.
    let socat = "TCP4-LISTEN:8086,bind=192.0.2.10,fork,reuseaddr";
    let _socat = spawn(inside.command_in(
        &ns,
        "socat",
        &[socat, "SYSTEM:echo peer=$SOCAT_PEERADDR port=$SOCAT_PEERPORT"],
    ));
    wait_listening(&bed, 8086);
    let conn = Conn::new(lb4(20021), sock(SERVER_V4, 8086)).toa_in_ack(&v4_client);
    assert_eq!(answers(&bed, &[conn]), ["peer=203.0.113.7 port=40000\n"], "socat");

    let mut http = spawn(inside.command_in(
        &ns,
        "python3",
        &["-u", "-m", "http.server", "--bind", "192.0.2.10", "8087"],
    ));
    if !listening(&bed, 8087) {
        let _ = http.0.kill();
        let mut err = String::new();
        let _ = http.0.stderr.take().map(|mut e| e.read_to_string(&mut err));
        panic!("python3 -m http.server did not listen: {err}");
    }
    let mut conn = Conn::new(lb4(20022), sock(SERVER_V4, 8087)).toa_in_syn(&v4_client);
    conn.request = b"GET / HTTP/1.0\r\n\r\n".to_vec();
    let response = answers(&bed, &[conn]).remove(0);
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    let mut log = BufReader::new(http.0.stderr.take().expect("piped"));
    let mut line = String::new();
    log.read_line(&mut line).expect("http.server log line");
    assert!(line.starts_with("203.0.113.7 - -"), "http.server logged {line:?}");

    // Many connections at once, each naming its own client (ACK placement).
    const N: u16 = 1200;
    let conns: Vec<Conn> = (0..N)
        .map(|i| {
            let client = toa(Format::Toa, &format!("203.0.{}.{}:{}", 113 + i / 250, i % 250 + 1, 20000 + i));
            Conn::new(lb4(30000 + i), s4).toa_in_ack(&client)
        })
        .collect();
    for (i, answer) in (0..N).zip(answers(&bed, &conns)) {
        let client = format!("203.0.{}.{}:{}", 113 + i / 250, i % 250 + 1, 20000 + i);
        assert_eq!(answer.trim_end(), format!("client={client} lb={client} source=none"), "connection {i}");
    }

    let status = ebpf::status().expect("status");
    let c = status.counters;
    assert_eq!(status.cgroup, inside.path().to_string_lossy());
    assert!(c.found >= u64::from(N) + 8, "{status}");
    assert!(c.untrusted >= 1 && c.v6_on_v4 >= 1 && c.malformed >= 1, "{status}");
    assert!(c.rewritten >= u64::from(N) + 8, "{status}");

    // Detached, the same server sees the LB again, and nothing is left.
    drop(_attached);
    assert!(!std::path::Path::new(ebpf::PIN_DIR).exists(), "pins left behind");
    let conn = Conn::new(lb4(20030), s4).toa_in_ack(&v4_client);
    assert_eq!(answers(&bed, &[conn]), ["client=100.125.0.1:20030 lb=100.125.0.1:20030 source=none\n"]);
    let _ = http.0.stderr.take().map(|mut e| e.read(&mut [0u8; 1]));
}

/// Kubernetes' shape: the helper attached once at a parent cgroup (as the
/// DaemonSet does at the node's root, or at kubepods.slice) serves servers
/// in nested child cgroups that each live in their own network namespace
/// with their own veth and the same addresses. A pod outside the parent is
/// untouched.
#[test]
fn pods_in_nested_cgroups_and_their_own_namespaces() {
    require_root!();
    let _lock = toa_testkit::helper_lock();
    if ebpf::is_attached() {
        eprintln!("SKIP: the kernel helper is attached on this machine; not touching it");
        return;
    }
    let kubepods = Cgroup::new("kubepods");
    let burstable = kubepods.child("burstable");
    let pod_a = burstable.child("pod-a");
    let pod_b = kubepods.child("pod-b");
    let elsewhere = Cgroup::new("not-a-pod");
    // As the DaemonSet does: the node's cgroup tree mounted a second time
    // (its /host/sys/fs/cgroup), in a mount namespace of its own, and the
    // attach made through that path.
    let toa_shim = std::path::Path::new(env!("CARGO_BIN_EXE_whoami")).with_file_name("toa-shim");
    assert!(toa_shim.exists(), "{} is not built (cargo build -p toa-server-shim)", toa_shim.display());
    let root = toa_testkit::cgroup::root();
    let relative = kubepods.path().strip_prefix(&root).unwrap().display().to_string();
    let host = format!("/tmp/toa-host-cgroup-{}", std::process::id());
    let script = format!(
        "mkdir -p {host} && mount -t cgroup2 none {host} && exec \"$0\" ebpf attach --cgroup {host}/{relative} --trust-preset huawei-elb"
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(&toa_shim)
        .output()
        .expect("unshare");
    let _ = std::fs::remove_dir(&host);
    let _attached = Attached;
    assert!(out.status.success(), "attach through a second cgroup2 mount: {out:?}");

    let whoami = env!("CARGO_BIN_EXE_whoami");
    let args = ["--listen", "192.0.2.10:8080", "--source", "none", "--trust", "huawei-elb"];
    let pods = [(&pod_a, "pod-a", "203.0.113.21:41000"), (&pod_b, "pod-b", "203.0.113.22:42000")];
    let beds: Vec<Bed> = pods.iter().map(|(_, tag, _)| Bed::new(tag)).collect();
    let outside_bed = Bed::new("not-a-pod");
    let mut servers = Vec::new();
    for ((cgroup, _, _), bed) in pods.iter().zip(&beds) {
        servers.push(spawn(cgroup.command_in(bed.ns.name(), whoami, &args)));
    }
    servers.push(spawn(elsewhere.command_in(outside_bed.ns.name(), whoami, &args)));
    for bed in beds.iter().chain([&outside_bed]) {
        wait_listening(bed, 8080);
    }

    let server = sock(SERVER_V4, 8080);
    for (i, ((_, tag, client), bed)) in pods.iter().zip(&beds).enumerate() {
        let port = 21000 + i as u16;
        // Each pod twice: TOA in the SYN, and in the handshake's ACK only.
        let conns = [
            Conn::new(sock(LB_V4, port), server).toa_in_syn(&toa(Format::Toa, client)),
            Conn::new(sock(LB_V4, port + 100), server).toa_in_ack(&toa(Format::Toa, client)),
        ];
        for answer in answers(bed, &conns) {
            assert_eq!(answer.trim_end(), format!("client={client} lb={client} source=none"), "{tag}");
        }
    }
    let conn = Conn::new(sock(LB_V4, 21999), server).toa_in_ack(&toa(Format::Toa, "203.0.113.23:43000"));
    assert_eq!(
        answers(&outside_bed, &[conn]),
        ["client=100.125.0.1:21999 lb=100.125.0.1:21999 source=none\n"],
        "a server outside the parent cgroup is untouched"
    );
    let status = ebpf::status().expect("status");
    assert_eq!(status.counters.found, 4, "{status}");
    assert_eq!(status.counters.rewritten, 4, "{status}");
    drop(servers);
}
