//! `toa-shim ebpf attach|status|detach` end to end (root): clear errors,
//! one attachment at a time, and nothing left behind, also after the CLI is
//! killed halfway through an attach. The CLI runs in a network namespace of
//! the test's own (with a dummy Ethernet interface), where the UDP program
//! goes by default; the host's interfaces are never touched.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use toa_server_shim::ebpf::PIN_DIR;
use toa_testkit::cgroup::Cgroup;
use toa_testkit::netns::Netns;
use toa_testkit::require_root;

/// The test's network namespace, where the CLI runs.
static NETNS: OnceLock<String> = OnceLock::new();

/// `toa-shim ARGS` in the test's network namespace (nsenter keeps /sys and
/// its bpffs, which `ip netns exec` would remount).
fn toa_shim_cmd(args: &[&str]) -> Command {
    let ns = NETNS.get().expect("the test's namespace");
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(env!("CARGO_BIN_EXE_toa-shim")).args(args);
    cmd
}

fn toa_shim(args: &[&str]) -> Output {
    toa_shim_cmd(args).output().expect("run toa-shim")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Whether any of the helper's programs is still loaded in the kernel
/// (names are cut to 15 characters). Freed programs go away asynchronously.
fn programs_loaded() -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let loaded = aya::programs::loaded_programs().filter_map(Result::ok).any(|p| {
            p.name_as_str().is_some_and(|n| n.starts_with("toa_sockops") || n.starts_with("toa_getpeername"))
        });
        if !loaded || Instant::now() > deadline {
            return loaded;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The names of the TCX ingress programs on the namespace's two interfaces.
fn tc_programs(netns: &Netns) -> Vec<String> {
    use aya::programs::SchedClassifier;
    use aya::programs::tc::TcAttachType;
    netns.run(|| {
        let mut names = Vec::new();
        for iface in ["d0", "d1.5"] {
            let (_, programs) = SchedClassifier::query_tcx(iface, TcAttachType::Ingress).expect("query tcx");
            names.extend(programs.iter().filter_map(|p| p.name_as_str().map(str::to_owned)));
        }
        names
    })
}

/// Detaches on drop, also when the test fails.
struct Cleanup;

/// Runs `toa-shim ebpf metrics` on a loopback port and returns one scrape.
fn scrape_metrics() -> String {
    use std::io::{Read, Write};
    let port = 20000 + (std::process::id() % 20000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let mut server = Command::new(env!("CARGO_BIN_EXE_toa-shim"))
        .args(["ebpf", "metrics", "--listen", &addr])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn metrics");
    let mut line = String::new();
    BufReader::new(server.stderr.take().expect("piped")).read_line(&mut line).expect("read");
    assert!(line.contains(&format!("serving the helper's metrics on http://{addr}/metrics")), "{line}");
    let mut stream = std::net::TcpStream::connect(&addr).expect("connect to the metrics endpoint");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = toa_shim(&["ebpf", "detach"]);
    }
}

#[test]
fn attach_status_detach() {
    require_root!();
    let _lock = toa_testkit::helper_lock();
    if Path::new(PIN_DIR).exists() {
        eprintln!("SKIP: the kernel helper is attached on this machine; not touching it");
        return;
    }
    let cgroup = Cgroup::new("cli");
    let path = cgroup.path().to_string_lossy().into_owned();
    let netns = Netns::new("cli");
    netns.exec(&["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1.5"]);
    NETNS.set(netns.name().to_owned()).unwrap();
    let _cleanup = Cleanup;

    // No trust, no helper.
    let out = toa_shim(&["ebpf", "attach", "--cgroup", &path]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("--trust"), "{}", text(&out.stderr));
    // Not a cgroup.
    let out = toa_shim(&["ebpf", "attach", "--cgroup", "/tmp", "--trust-any"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("is not a cgroup v2 directory"), "{}", text(&out.stderr));
    assert!(!Path::new(PIN_DIR).exists(), "a failed attach leaves nothing");
    // UDP on interfaces it cannot watch.
    for (iface, why) in [("lo", "is not Ethernet"), ("nope0", "No such device")] {
        let out = toa_shim(&["ebpf", "attach", "--cgroup", &path, "--trust-any", "--udp-iface", iface]);
        assert_eq!(out.status.code(), Some(1));
        let err = text(&out.stderr);
        assert!(err.contains(&format!("interface {iface}: ")) && err.contains(why), "{err}");
        assert!(err.contains("--no-udp"), "{err}");
        assert!(!Path::new(PIN_DIR).exists(), "a failed attach leaves nothing");
    }

    let out = toa_shim(&[
        "ebpf",
        "attach",
        "--cgroup",
        &path,
        "--trust-preset",
        "huawei-elb",
        "--trust",
        "2001:db8:64::/48",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains(&format!("attached to cgroup {path}")));
    assert!(
        text(&out.stdout).contains("udp: watching d0, d1.5 (65536 flows at most)"),
        "{}",
        text(&out.stdout)
    );

    let again = toa_shim(&["ebpf", "attach", "--cgroup", &path, "--trust-any"]);
    assert_eq!(again.status.code(), Some(1));
    let err = text(&again.stderr);
    assert!(err.contains("already attached") && err.contains("toa-shim ebpf detach"), "{err}");

    let status = toa_shim(&["ebpf", "status"]);
    assert!(status.status.success(), "{status:?}");
    let shown = text(&status.stdout);
    assert!(shown.contains(&format!("attached to cgroup {path}")), "{shown}");
    assert!(shown.contains("trust: 100.125.0.0/16, 2001:db8:64::/48"), "{shown}");
    assert!(shown.contains("formats: toa (kind 254), toa6 (kind 254)"), "{shown}");
    assert!(shown.contains("udp: interfaces d0, d1.5, flows 0 of 65536"), "{shown}");
    assert!(
        shown.contains("counters: found=0 untrusted=0 malformed=0 v6_on_v4=0 rewritten=0 udp_found=0"),
        "{shown}"
    );
    assert!(programs_loaded());
    assert_eq!(tc_programs(&netns), ["toa_udp_ingress", "toa_udp_ingress"]);

    // The same counters for Prometheus: a textfile, and over HTTP on loopback.
    let dir = std::env::temp_dir().join(format!("toa-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = toa_shim(&["ebpf", "metrics", "--textfile", dir.to_str().unwrap(), "--once"]);
    assert!(out.status.success(), "{out:?}");
    let file = std::fs::read_to_string(dir.join("toa_shim.prom")).unwrap();
    assert!(file.contains(&format!("toa_shim_ebpf_attached{{cgroup=\"{path}\"}} 1\n")), "{file}");
    assert!(file.contains("\ntoa_shim_ebpf_found_total 0\n"), "{file}");
    let served = scrape_metrics();
    assert_eq!(served, file, "the textfile and the endpoint say the same");

    // Only root may look.
    let nobody = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_toa-shim"),
            "ebpf",
            "status",
        ])
        .output()
        .expect("setpriv");
    assert_eq!(nobody.status.code(), Some(1));
    assert!(text(&nobody.stderr).contains("needs root"), "{}", text(&nobody.stderr));

    let out = toa_shim(&["ebpf", "detach"]);
    assert!(out.status.success());
    // 4 TCP links, 6 UDP cgroup links, 2 tc links, 7 maps.
    assert!(text(&out.stdout).contains("removed 19 pins"), "{}", text(&out.stdout));
    assert!(!Path::new(PIN_DIR).exists());
    assert!(!programs_loaded(), "programs still loaded after detach");
    assert_eq!(tc_programs(&netns), Vec::<String>::new(), "tc programs left after detach");

    // TCP only.
    let out = toa_shim(&["ebpf", "attach", "--cgroup", &path, "--trust-any", "--no-udp"]);
    assert!(out.status.success(), "{out:?}");
    assert!(!text(&out.stdout).contains("udp:"), "{}", text(&out.stdout));
    assert!(text(&toa_shim(&["ebpf", "status"]).stdout).contains("\nudp: off (--no-udp)\n"));
    assert_eq!(tc_programs(&netns), Vec::<String>::new());
    let out = toa_shim(&["ebpf", "detach"]);
    assert!(text(&out.stdout).contains("removed 11 pins"), "{}", text(&out.stdout));
    let out = toa_shim(&["ebpf", "status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not attached"));
    assert_eq!(text(&toa_shim(&["ebpf", "detach"]).stdout), "nothing attached\n");
    // Nothing attached is a value (0), not an error.
    let out = toa_shim(&["ebpf", "metrics", "--textfile", dir.to_str().unwrap(), "--once"]);
    assert!(out.status.success(), "{out:?}");
    let file = std::fs::read_to_string(dir.join("toa_shim.prom")).unwrap();
    assert!(file.ends_with("\ntoa_shim_ebpf_attached 0\n"), "{file}");
    std::fs::remove_dir_all(&dir).unwrap();

    // Killed halfway: maps pinned, no program attached yet.
    let mut child = toa_shim_cmd(&["ebpf", "attach", "--cgroup", &path, "--trust-any"])
        .env("TOA_SHIM_TEST_PAUSE_ATTACH", "30")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn attach");
    let mut line = String::new();
    BufReader::new(child.stderr.take().expect("piped")).read_line(&mut line).expect("read");
    assert!(line.contains("pausing"), "{line}");
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    assert!(Path::new(PIN_DIR).join("toa_peers").exists(), "the interrupted attach pinned its maps");
    let again = toa_shim(&["ebpf", "attach", "--cgroup", &path, "--trust-any"]);
    let err = text(&again.stderr);
    assert!(err.contains("interrupted") && err.contains("toa-shim ebpf detach"), "{err}");
    let out = toa_shim(&["ebpf", "detach"]);
    assert!(out.status.success(), "{out:?}");
    assert!(!Path::new(PIN_DIR).exists());
    assert!(!programs_loaded(), "programs still loaded after cleaning an interrupted attach");
}
