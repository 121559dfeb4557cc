//! The kernel helper: eBPF programs that make `accept()` and `getpeername()`
//! of unmodified servers in a cgroup return the client behind a TOA load
//! balancer, from trusted sources only.
//!
//! `bpf/toa.bpf.c` holds a `sockops` program (reads the TOA from the SYN, the
//! handshake ACK and the first client segments, checks the packet's source
//! against an LPM-trie trust map, keeps `{client, lb}` in socket storage) and
//! `cgroup/getpeername4|6` programs (rewrite the peer address from that
//! storage). Everything is pinned under [`PIN_DIR`], so it outlives the CLI;
//! [`detach`] removes it all.
//!
//! For UDP listeners behind a UOA load balancer ([`AttachOptions::udp`], on
//! by default in `toa-shim ebpf attach`), a tc ingress program on the
//! backend's interfaces records `(LB address:port, local port) -> client`
//! from trusted UOAs in a bounded LRU map and turns `opp` datagrams back into
//! plain UDP; `cgroup/recvmsg4|6` show the client to `recvfrom()`, and
//! `cgroup/sendmsg4|6` and `connect4|6` send what is addressed to that client
//! to its load balancer, so replies still pass through it.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapInfo, PerCpuArray};
use aya::programs::links::FdLink;
use aya::programs::tc::TcAttachType;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, SockOps};
use ipnet::IpNet;
use toa_core::{Format, Formats};

use crate::sys::bpf::{Config as RawConfig, Meta as RawMeta};
use crate::trust::TrustPolicy;

/// Where the helper's maps and links are pinned.
pub const PIN_DIR: &str = crate::helper::PIN_DIR;

/// The compiled programs (`scripts/build-bpf.sh`).
static OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/toa.bpf.o");

#[cfg(test)]
const MAPS: [&str; 7] =
    ["toa_peers", "toa_trust", "toa_config", "toa_counters", "toa_meta", "toa_udp_flows", "toa_udp_replies"];
/// (program, pinned link name)
const PROGRAMS: [(&str, &str); 4] = [
    ("toa_sockops", "link_sockops"),
    ("toa_sockops_data", "link_sockops_data"),
    ("toa_getpeername4", "link_getpeername4"),
    ("toa_getpeername6", "link_getpeername6"),
];
/// The cgroup programs of UDP (not attached with `udp: None`).
const UDP_PROGRAMS: [(&str, &str); 6] = [
    ("toa_udp_recvmsg4", "link_udp_recvmsg4"),
    ("toa_udp_recvmsg6", "link_udp_recvmsg6"),
    ("toa_udp_sendmsg4", "link_udp_sendmsg4"),
    ("toa_udp_sendmsg6", "link_udp_sendmsg6"),
    ("toa_udp_connect4", "link_udp_connect4"),
    ("toa_udp_connect6", "link_udp_connect6"),
];
/// The tc program of UDP, and its links' names: `link_udp_ingress_IFACE`,
/// with a `.` of the interface's name as `:` (bpffs refuses names with a
/// dot; interface names never hold a colon).
const UDP_INGRESS: &str = "toa_udp_ingress";
const UDP_INGRESS_LINK: &str = "link_udp_ingress_";
/// The UDP flows remembered by default (each of the two LRU maps).
pub const DEFAULT_UDP_FLOWS: u32 = 65536;

/// What can stop the helper, worded for the operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EbpfError {
    /// Not root.
    #[error("the kernel helper needs root: it loads eBPF programs and attaches them to a cgroup")]
    NotRoot,
    /// No cgroup v2 hierarchy.
    #[error(
        "no cgroup v2 hierarchy is mounted (none in /proc/mounts): mount one with `mount -t cgroup2 none /sys/fs/cgroup`"
    )]
    NoCgroup2,
    /// The cgroup given is not a directory of the cgroup v2 hierarchy.
    #[error("{0} is not a cgroup v2 directory (the hierarchy is at {1})")]
    NotACgroup(PathBuf, PathBuf),
    /// The kernel has no BTF.
    #[error("the kernel has no BTF (/sys/kernel/btf/vmlinux is missing): it needs CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf,
    /// The kernel is older than 5.10.
    #[error(
        "kernel {0} is too old: the helper needs Linux 5.10 or later (sockops header-option callbacks, socket storage in cgroup programs)"
    )]
    OldKernel(String),
    /// Attached already.
    #[error("the kernel helper is already attached ({0}); run `toa-shim ebpf detach` first")]
    AlreadyAttached(String),
    /// Nothing attached.
    #[error("the kernel helper is not attached (nothing under {PIN_DIR}); run `toa-shim ebpf attach`")]
    NotAttached,
    /// UDP needs TCX links to stay attached after the CLI exits.
    #[error(
        "kernel {0}: the UDP programs need Linux 6.6 or later (tc programs pinned as TCX links); attach with --no-udp for TCP only"
    )]
    UdpNeedsTcx(String),
    /// An interface for the UDP program that is missing or not Ethernet.
    #[error(
        "interface {0}: {1} (name Ethernet interfaces of this network namespace with --udp-iface, or attach with --no-udp)"
    )]
    BadInterface(String, String),
    /// A file-system step failed.
    #[error("{0}: {1}")]
    Io(String, io::Error),
    /// An eBPF step failed.
    #[error("{0}: {1}")]
    Bpf(String, String),
}

fn bpf_err(what: impl Into<String>) -> impl FnOnce(aya::EbpfError) -> EbpfError {
    let what = what.into();
    move |e| EbpfError::Bpf(what, e.to_string())
}

fn map_err(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    let what = what.into();
    move |e| EbpfError::Bpf(what, e.to_string())
}

fn prog_err(what: impl Into<String>) -> impl FnOnce(aya::programs::ProgramError) -> EbpfError {
    let what = what.into();
    move |e| EbpfError::Bpf(what, e.to_string())
}

/// How to attach.
#[derive(Clone, Debug)]
pub struct AttachOptions {
    /// The cgroup whose programs see clients (default: the cgroup v2 root, every program).
    pub cgroup: Option<PathBuf>,
    /// Trusted load balancers.
    pub policy: TrustPolicy,
    /// Formats to accept.
    pub formats: Formats,
    /// UDP (UOA) too; `None` attaches the TCP programs only.
    pub udp: Option<UdpOptions>,
}

/// The UDP half of the helper.
#[derive(Clone, Debug)]
pub struct UdpOptions {
    /// The interfaces whose ingress the tc program watches (in the network
    /// namespace of the caller); empty: every Ethernet interface there now.
    pub interfaces: Vec<String>,
    /// Flows remembered (the bound of each LRU map).
    pub flows: u32,
}

impl Default for UdpOptions {
    fn default() -> Self {
        UdpOptions { interfaces: Vec::new(), flows: DEFAULT_UDP_FLOWS }
    }
}

/// The helper's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Trusted TOAs stored for a connection.
    pub found: u64,
    /// Connections from peers outside the trust list: not searched for a TOA (one trie lookup).
    pub untrusted: u64,
    /// Malformed options where a TOA was looked for.
    pub malformed: u64,
    /// IPv6 clients on IPv4 sockets: no `sockaddr_in` can hold them, not rewritten.
    pub v6_on_v4: u64,
    /// `accept()`/`getpeername()` answers rewritten.
    pub rewritten: u64,
    /// Trusted UOAs recorded for a UDP flow.
    pub udp_found: u64,
    /// UOAs from sources outside the trust list, ignored.
    pub udp_untrusted: u64,
    /// Malformed UOAs or opp headers (passed as they came).
    pub udp_malformed: u64,
    /// opp headers removed (the datagram made plain UDP again).
    pub udp_stripped: u64,
    /// `recvfrom()`/`recvmsg()` answers rewritten to the client.
    pub udp_received: u64,
    /// Datagrams (or connects) to a client sent to its load balancer.
    pub udp_sent: u64,
    /// Empty datagrams that only carried a trusted UOA (sent by an LB ahead
    /// of a datagram with no room for it), dropped after recording.
    pub udp_carriers: u64,
}

/// One of the helper's counters: its name in `status`, its Prometheus
/// series, its help, and where it is in [`Counters`]. The one table both read.
pub struct CounterDef {
    /// The name in `toa-shim ebpf status`.
    pub name: &'static str,
    /// The Prometheus series.
    pub metric: &'static str,
    /// The series' help text.
    pub help: &'static str,
    /// Reads it.
    pub get: fn(&Counters) -> u64,
}

impl Counters {
    /// Every counter, in the order `status` prints them.
    pub const TABLE: [CounterDef; 12] = [
        CounterDef {
            name: "found",
            metric: "toa_shim_ebpf_found_total",
            help: "Trusted TOAs stored for a connection.",
            get: |c| c.found,
        },
        CounterDef {
            name: "untrusted",
            metric: "toa_shim_ebpf_untrusted_total",
            help: "Connections from peers outside the trust list, not searched for a TOA.",
            get: |c| c.untrusted,
        },
        CounterDef {
            name: "malformed",
            metric: "toa_shim_ebpf_malformed_total",
            help: "Malformed options where a TOA was looked for.",
            get: |c| c.malformed,
        },
        CounterDef {
            name: "v6_on_v4",
            metric: "toa_shim_ebpf_v6_on_v4_total",
            help: "IPv6 clients on IPv4 sockets, not rewritten.",
            get: |c| c.v6_on_v4,
        },
        CounterDef {
            name: "rewritten",
            metric: "toa_shim_ebpf_rewritten_total",
            help: "accept()/getpeername() answers rewritten.",
            get: |c| c.rewritten,
        },
        CounterDef {
            name: "udp_found",
            metric: "toa_shim_ebpf_udp_found_total",
            help: "Trusted UOAs recorded for a UDP flow.",
            get: |c| c.udp_found,
        },
        CounterDef {
            name: "udp_untrusted",
            metric: "toa_shim_ebpf_udp_untrusted_total",
            help: "UOAs from sources outside the trust list, ignored.",
            get: |c| c.udp_untrusted,
        },
        CounterDef {
            name: "udp_malformed",
            metric: "toa_shim_ebpf_udp_malformed_total",
            help: "Malformed UOAs or opp headers, passed as they came.",
            get: |c| c.udp_malformed,
        },
        CounterDef {
            name: "udp_stripped",
            metric: "toa_shim_ebpf_udp_stripped_total",
            help: "opp headers removed before the IP stack.",
            get: |c| c.udp_stripped,
        },
        CounterDef {
            name: "udp_received",
            metric: "toa_shim_ebpf_udp_received_total",
            help: "recvfrom()/recvmsg() answers rewritten to the client.",
            get: |c| c.udp_received,
        },
        CounterDef {
            name: "udp_sent",
            metric: "toa_shim_ebpf_udp_sent_total",
            help: "Datagrams or connects to a client sent to its load balancer.",
            get: |c| c.udp_sent,
        },
        CounterDef {
            name: "udp_carriers",
            metric: "toa_shim_ebpf_udp_carriers_total",
            help: "Empty datagrams that only carried a trusted UOA, dropped after recording.",
            get: |c| c.udp_carriers,
        },
    ];

    /// The counters from the map's slots, in the C program's order (`CNT_*`).
    fn from_slots(get: impl Fn(u32) -> u64) -> Counters {
        Counters {
            found: get(0),
            untrusted: get(1),
            malformed: get(2),
            v6_on_v4: get(3),
            rewritten: get(4),
            udp_found: get(5),
            udp_untrusted: get(6),
            udp_malformed: get(7),
            udp_stripped: get(8),
            udp_received: get(9),
            udp_sent: get(10),
            udp_carriers: get(11),
        }
    }
}

/// The gauge that says whether the helper is attached.
const ATTACHED: &str = "toa_shim_ebpf_attached";
/// The gauges of the UDP flow map.
const UDP_FLOWS: &str = "toa_shim_ebpf_udp_flows";
const UDP_FLOWS_MAX: &str = "toa_shim_ebpf_udp_flows_max";

/// Every series [`render_metrics`] exports (the dashboard test checks its queries against it).
pub fn metric_series() -> Vec<&'static str> {
    let mut all = vec![ATTACHED];
    all.extend(Counters::TABLE.iter().map(|d| d.metric));
    all.extend([UDP_FLOWS, UDP_FLOWS_MAX]);
    all
}

/// The helper's state in the Prometheus text format: `toa_shim_ebpf_attached`
/// (1, with the cgroup as a label, or 0 when nothing is attached) and its
/// counters, summed over CPUs.
pub fn render_metrics(status: Option<&Status>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP {ATTACHED} Whether the kernel helper is attached (label: its cgroup).");
    let _ = writeln!(out, "# TYPE {ATTACHED} gauge");
    let Some(status) = status else {
        let _ = writeln!(out, "{ATTACHED} 0");
        return out;
    };
    let cgroup = status.cgroup.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    let _ = writeln!(out, "{ATTACHED}{{cgroup=\"{cgroup}\"}} 1");
    for def in &Counters::TABLE {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} counter", def.metric, def.help, def.metric);
        let _ = writeln!(out, "{} {}", def.metric, (def.get)(&status.counters));
    }
    let (used, max) = status.udp.as_ref().map_or((0, 0), |u| (u.flows, u.max_flows));
    let _ = writeln!(out, "# HELP {UDP_FLOWS} UDP flows in the helper's LRU map (0 without UDP).");
    let _ = writeln!(out, "# TYPE {UDP_FLOWS} gauge\n{UDP_FLOWS} {used}");
    let _ = writeln!(out, "# HELP {UDP_FLOWS_MAX} The LRU map's bound (0 without UDP).");
    let _ = writeln!(out, "# TYPE {UDP_FLOWS_MAX} gauge\n{UDP_FLOWS_MAX} {max}");
    out
}

/// What `toa-shim ebpf status` shows.
#[derive(Clone, Debug)]
pub struct Status {
    /// The cgroup the programs are attached to.
    pub cgroup: String,
    /// Trusted sources; empty with `trust_any`.
    pub trust: Vec<IpNet>,
    /// Whether any source is trusted.
    pub trust_any: bool,
    /// Enabled formats and kinds.
    pub formats: Formats,
    /// The counters.
    pub counters: Counters,
    /// The UDP half, when attached.
    pub udp: Option<UdpStatus>,
}

/// The UDP half of [`Status`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpStatus {
    /// Interfaces whose ingress the tc program watches.
    pub interfaces: Vec<String>,
    /// Flows in the LRU map now.
    pub flows: u32,
    /// Its bound.
    pub max_flows: u32,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "attached to cgroup {}", self.cgroup)?;
        if self.trust_any {
            writeln!(f, "trust: any source (--trust-any)")?;
        } else {
            let list: Vec<String> = self.trust.iter().map(ToString::to_string).collect();
            writeln!(f, "trust: {}", list.join(", "))?;
        }
        let formats: Vec<String> =
            self.formats.iter().map(|fmt| format!("{fmt} (kind {})", self.formats.kind(fmt))).collect();
        writeln!(f, "formats: {}", formats.join(", "))?;
        match &self.udp {
            Some(udp) => writeln!(
                f,
                "udp: interfaces {}, flows {} of {}",
                udp.interfaces.join(", "),
                udp.flows,
                udp.max_flows
            )?,
            None => writeln!(f, "udp: off (--no-udp)")?,
        }
        let counters: Vec<String> =
            Counters::TABLE.iter().map(|d| format!("{}={}", d.name, (d.get)(&self.counters))).collect();
        write!(f, "counters: {}", counters.join(" "))
    }
}

/// Checks what the helper needs: root, BTF, Linux >= 5.10.
pub fn preflight() -> Result<(), EbpfError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(EbpfError::NotRoot);
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(EbpfError::NoBtf);
    }
    let (major, minor, release) = kernel_version();
    if (major, minor) < (5, 10) {
        return Err(EbpfError::OldKernel(release));
    }
    Ok(())
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on hybrid systems).
pub fn cgroup2_root() -> Result<PathBuf, EbpfError> {
    cgroup2_mounts()?.into_iter().min_by_key(|p| p.as_os_str().len()).ok_or(EbpfError::NoCgroup2)
}

/// Every cgroup v2 mount point. In a container there are often two: its own
/// cgroup namespace at /sys/fs/cgroup, and the node's tree mounted by the
/// operator (the DaemonSet's /host/sys/fs/cgroup).
fn cgroup2_mounts() -> Result<Vec<PathBuf>, EbpfError> {
    let mounts =
        fs::read_to_string("/proc/mounts").map_err(|e| EbpfError::Io("read /proc/mounts".into(), e))?;
    Ok(mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, path, kind) = (fields.next()?, fields.next()?, fields.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(path))
        })
        .collect())
}

/// Mounts bpffs at /sys/fs/bpf when it is not.
fn ensure_bpffs() -> Result<(), EbpfError> {
    let mounts =
        fs::read_to_string("/proc/mounts").map_err(|e| EbpfError::Io("read /proc/mounts".into(), e))?;
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf ")) {
        return Ok(());
    }
    nix::mount::mount(Some("bpf"), "/sys/fs/bpf", Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| EbpfError::Io("mount bpffs at /sys/fs/bpf".into(), e.into()))
}

/// Whether anything of the helper is pinned.
pub fn is_attached() -> bool {
    fs::read_dir(PIN_DIR).map(|mut d| d.next().is_some()).unwrap_or(false)
}

/// Loads the programs, fills the maps and attaches to the cgroup; returns the
/// cgroup used. On failure nothing is left behind.
pub fn attach(options: &AttachOptions) -> Result<PathBuf, EbpfError> {
    preflight()?;
    let root = cgroup2_root()?;
    let cgroup = options.cgroup.clone().unwrap_or_else(|| root.clone());
    let cgroup =
        fs::canonicalize(&cgroup).map_err(|e| EbpfError::Io(format!("cgroup {}", cgroup.display()), e))?;
    let under_a_mount = cgroup2_mounts()?.iter().any(|mount| cgroup.starts_with(mount));
    if !under_a_mount || !cgroup.join("cgroup.procs").exists() {
        return Err(EbpfError::NotACgroup(cgroup, root));
    }
    let interfaces = match &options.udp {
        Some(udp) => udp_interfaces(udp)?,
        None => Vec::new(),
    };
    ensure_bpffs()?;
    if is_attached() {
        let complete = PROGRAMS.iter().all(|(_, link)| Path::new(PIN_DIR).join(link).exists());
        let what = match read_meta() {
            Ok(path) if complete && !path.is_empty() => format!("to cgroup {path}"),
            _ => "partly: an earlier attach was interrupted".to_owned(),
        };
        return Err(EbpfError::AlreadyAttached(what));
    }
    fs::create_dir_all(PIN_DIR).map_err(|e| EbpfError::Io(format!("create {PIN_DIR}"), e))?;
    let result = attach_pinned(options, &cgroup, &interfaces);
    if result.is_err() {
        let _ = detach();
    }
    result.map(|()| cgroup)
}

/// The helper's table of option kinds: for each kind, a bit per enabled
/// format (in [`Format::ALL`] order) that uses it. `find_toa` in
/// `bpf/find_toa.h` classifies options with one lookup in it; `toa-bpf-parity`
/// checks the pair against [`toa_core::Options::first_toa`].
pub fn kind_formats(formats: &Formats) -> [u8; 256] {
    let mut table = [0u8; 256];
    for (i, format) in Format::ALL.iter().enumerate() {
        if formats.contains(*format) {
            table[usize::from(formats.kind(*format))] |= 1 << i;
        }
    }
    table
}

/// The kernel's version, from its release string ("6.1.0-18-amd64": (6, 1)).
fn kernel_version() -> (u32, u32, String) {
    let release =
        nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0), release)
}

/// The interfaces the UDP tc program goes on: the ones named (each must be
/// Ethernet), or every Ethernet interface of this network namespace.
fn udp_interfaces(udp: &UdpOptions) -> Result<Vec<String>, EbpfError> {
    let (major, minor, release) = kernel_version();
    if (major, minor) < (6, 6) {
        return Err(EbpfError::UdpNeedsTcx(release));
    }
    let ethernet = |name: &str| crate::sys::link::link_type(name).is_ok_and(|t| t == libc::ARPHRD_ETHER);
    if !udp.interfaces.is_empty() {
        for name in &udp.interfaces {
            match crate::sys::link::link_type(name) {
                Ok(libc::ARPHRD_ETHER) => {}
                Ok(kind) => {
                    let why =
                        format!("link type {kind} is not Ethernet (the program reads an Ethernet header)");
                    return Err(EbpfError::BadInterface(name.clone(), why));
                }
                Err(e) => return Err(EbpfError::BadInterface(name.clone(), e.to_string())),
            }
        }
        return Ok(udp.interfaces.clone());
    }
    let all = nix::net::if_::if_nameindex()
        .map_err(|e| EbpfError::Io("list the network interfaces".into(), e.into()))?;
    let names: Vec<String> = all
        .iter()
        .filter_map(|i| i.name().to_str().ok().map(str::to_owned))
        .filter(|name| ethernet(name))
        .collect();
    if names.is_empty() {
        return Err(EbpfError::BadInterface(
            "(any)".into(),
            "no Ethernet interface in this network namespace".into(),
        ));
    }
    Ok(names)
}

fn attach_pinned(options: &AttachOptions, cgroup: &Path, interfaces: &[String]) -> Result<(), EbpfError> {
    // Without UDP the LRU maps still exist (one object); keep them tiny.
    let flows = options.udp.as_ref().map_or(64, |u| u.flows.max(64));
    let mut ebpf = aya::EbpfLoader::new()
        .default_map_pin_directory(PIN_DIR)
        .map_max_entries("toa_udp_flows", flows)
        .map_max_entries("toa_udp_replies", flows)
        .load(OBJECT)
        .map_err(bpf_err("load the eBPF object"))?;

    // Configuration before programs: they must never run with an empty trust map.
    let mut config = RawConfig { trust_any: u8::from(options.policy.is_any()), ..Default::default() };
    for (i, format) in Format::ALL.iter().enumerate() {
        if options.formats.contains(*format) {
            config.enabled |= 1 << i;
        }
        config.kinds[i] = options.formats.kind(*format);
    }
    config.kind_formats = kind_formats(&options.formats);
    let mut config_map: Array<_, RawConfig> =
        Array::try_from(ebpf.map_mut("toa_config").ok_or_else(missing("toa_config"))?)
            .map_err(map_err("toa_config"))?;
    config_map.set(0, config, 0).map_err(map_err("write toa_config"))?;

    let mut trust: LpmTrie<_, [u8; 16], u8> =
        LpmTrie::try_from(ebpf.map_mut("toa_trust").ok_or_else(missing("toa_trust"))?)
            .map_err(map_err("toa_trust"))?;
    for net in options.policy.sources().nets() {
        let (prefix, bytes) = trie_key(net);
        trust.insert(&Key::new(prefix, bytes), 1, 0).map_err(map_err(format!("trust {net}")))?;
    }

    let mut meta = RawMeta { cgroup: [0; 256] };
    let path = cgroup.to_string_lossy();
    let n = path.len().min(255);
    meta.cgroup[..n].copy_from_slice(&path.as_bytes()[..n]);
    let mut meta_map: Array<_, RawMeta> =
        Array::try_from(ebpf.map_mut("toa_meta").ok_or_else(missing("toa_meta"))?)
            .map_err(map_err("toa_meta"))?;
    meta_map.set(0, meta, 0).map_err(map_err("write toa_meta"))?;

    // Lets a test kill the CLI halfway, with maps pinned and no program attached.
    if let Some(seconds) = std::env::var("TOA_SHIM_TEST_PAUSE_ATTACH").ok().and_then(|s| s.parse().ok()) {
        eprintln!("toa-shim: pausing {seconds}s mid-attach (TOA_SHIM_TEST_PAUSE_ATTACH)");
        std::thread::sleep(std::time::Duration::from_secs(seconds));
    }

    let cgroup_dir =
        fs::File::open(cgroup).map_err(|e| EbpfError::Io(format!("open {}", cgroup.display()), e))?;
    let udp_programs: &[(&str, &str)] = if options.udp.is_some() { &UDP_PROGRAMS } else { &[] };
    for &(name, link_name) in PROGRAMS.iter().chain(udp_programs) {
        let program = ebpf.program_mut(name).ok_or_else(missing(name))?;
        let link_path = Path::new(PIN_DIR).join(link_name);
        // A bpf_link coexists with other programs on the cgroup whatever the mode;
        // the kernel refuses the multi flag on links.
        let link: FdLink = if name.starts_with("toa_sockops") {
            let program: &mut SockOps = program.try_into().map_err(prog_err(name))?;
            program.load().map_err(prog_err(format!("load {name} (the kernel verifier said no)")))?;
            let id = program.attach(&cgroup_dir, CgroupAttachMode::Single).map_err(prog_err(name))?;
            program.take_link(id).map_err(prog_err(name))?.try_into().map_err(|e| link_err(name, e))?
        } else {
            let program: &mut CgroupSockAddr = program.try_into().map_err(prog_err(name))?;
            program.load().map_err(prog_err(format!("load {name} (the kernel verifier said no)")))?;
            let id = program.attach(&cgroup_dir, CgroupAttachMode::Single).map_err(prog_err(name))?;
            program.take_link(id).map_err(prog_err(name))?.try_into().map_err(|e| link_err(name, e))?
        };
        link.pin(&link_path).map_err(|e| pin_err(&link_path, e))?;
    }
    if interfaces.is_empty() {
        return Ok(());
    }
    let program: &mut SchedClassifier = ebpf
        .program_mut(UDP_INGRESS)
        .ok_or_else(missing(UDP_INGRESS))?
        .try_into()
        .map_err(prog_err(UDP_INGRESS))?;
    program.load().map_err(prog_err(format!("load {UDP_INGRESS} (the kernel verifier said no)")))?;
    for interface in interfaces {
        let what = format!("attach {UDP_INGRESS} to {interface} (tc ingress)");
        let id = program.attach(interface, TcAttachType::Ingress).map_err(prog_err(&what))?;
        let link: FdLink = program
            .take_link(id)
            .map_err(prog_err(&what))?
            .try_into()
            .map_err(|e| EbpfError::Bpf(format!("{what}: not a TCX link"), format!("{e}")))?;
        let link_path = Path::new(PIN_DIR).join(format!("{UDP_INGRESS_LINK}{}", interface.replace('.', ":")));
        link.pin(&link_path).map_err(|e| pin_err(&link_path, e))?;
    }
    Ok(())
}

fn pin_err(path: &Path, e: aya::pin::PinError) -> EbpfError {
    // PinError's message leaves out the system error: add it.
    let cause = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
    EbpfError::Bpf(format!("pin {}", path.display()), format!("{e}{cause}"))
}

fn link_err(name: &str, e: aya::programs::links::LinkError) -> EbpfError {
    EbpfError::Bpf(format!("{name}: the kernel attached it without a bpf_link (Linux < 5.7?)"), e.to_string())
}

fn missing(name: &str) -> impl FnOnce() -> EbpfError + '_ {
    move || EbpfError::Bpf(name.to_owned(), "missing from the eBPF object".into())
}

/// The trie key of a network: IPv4 as `::ffff:a.b.c.d/(96 + prefix)`.
fn trie_key(net: &IpNet) -> (u32, [u8; 16]) {
    match net {
        IpNet::V4(n) => (96 + u32::from(n.prefix_len()), n.network().to_ipv6_mapped().octets()),
        IpNet::V6(n) => (u32::from(n.prefix_len()), n.network().octets()),
    }
}

fn open_pinned(name: &str) -> Result<MapData, EbpfError> {
    let path = Path::new(PIN_DIR).join(name);
    if !path.exists() {
        return Err(EbpfError::NotAttached);
    }
    MapData::from_pin(&path).map_err(map_err(format!("open {}", path.display())))
}

fn read_meta() -> Result<String, EbpfError> {
    let meta: Array<_, RawMeta> =
        Array::try_from(aya::maps::Map::Array(open_pinned("toa_meta")?)).map_err(map_err("toa_meta"))?;
    let raw = meta.get(&0, 0).map_err(map_err("read toa_meta"))?;
    let end = raw.cgroup.iter().position(|b| *b == 0).unwrap_or(raw.cgroup.len());
    Ok(String::from_utf8_lossy(&raw.cgroup[..end]).into_owned())
}

/// Reads the attached helper's configuration and counters.
pub fn status() -> Result<Status, EbpfError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(EbpfError::NotRoot);
    }
    if !is_attached() {
        return Err(EbpfError::NotAttached);
    }
    let cgroup = read_meta()?;
    let config: Array<_, RawConfig> =
        Array::try_from(aya::maps::Map::Array(open_pinned("toa_config")?)).map_err(map_err("toa_config"))?;
    let config = config.get(&0, 0).map_err(map_err("read toa_config"))?;
    let mut formats = Formats::NONE;
    for (i, format) in Format::ALL.iter().enumerate() {
        formats = formats.with_kind(*format, config.kinds[i]);
        if config.enabled & (1 << i) != 0 {
            formats = formats.with(*format);
        }
    }
    let trust: LpmTrie<_, [u8; 16], u8> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(open_pinned("toa_trust")?))
            .map_err(map_err("toa_trust"))?;
    let mut nets = Vec::new();
    for key in trust.keys() {
        let key = key.map_err(map_err("read toa_trust"))?;
        let ip = Ipv6Addr::from(key.data());
        let net = match ip.to_ipv4_mapped() {
            Some(v4) if key.prefix_len() >= 96 => IpNet::new(IpAddr::V4(v4), (key.prefix_len() - 96) as u8),
            _ => IpNet::new(IpAddr::V6(ip), key.prefix_len() as u8),
        };
        nets.extend(net.ok());
    }
    nets.sort();
    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open_pinned("toa_counters")?))
            .map_err(map_err("toa_counters"))?;
    let sum = |i: u32| counters.get(&i, 0).map(|values| values.iter().sum::<u64>()).unwrap_or(0);
    let counters = Counters::from_slots(sum);
    Ok(Status {
        cgroup,
        trust: nets,
        trust_any: config.trust_any != 0,
        formats,
        counters,
        udp: udp_status()?,
    })
}

/// The UDP half's interfaces (from its pinned links) and map usage; `None`
/// when it was not attached.
fn udp_status() -> Result<Option<UdpStatus>, EbpfError> {
    let pins = fs::read_dir(PIN_DIR).map_err(|e| EbpfError::Io(format!("read {PIN_DIR}"), e))?;
    let names: Vec<String> = pins.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    if !names.iter().any(|n| n == UDP_PROGRAMS[0].1) {
        return Ok(None);
    }
    let mut interfaces: Vec<String> =
        names.iter().filter_map(|n| n.strip_prefix(UDP_INGRESS_LINK).map(|i| i.replace(':', "."))).collect();
    interfaces.sort();
    let path = Path::new(PIN_DIR).join("toa_udp_flows");
    let max_flows = MapInfo::from_pin(&path).map_err(map_err("toa_udp_flows"))?.max_entries();
    let map: BpfHashMap<_, [u8; 20], [u8; 20]> =
        BpfHashMap::try_from(aya::maps::Map::LruHashMap(open_pinned("toa_udp_flows")?))
            .map_err(map_err("toa_udp_flows"))?;
    let flows = u32::try_from(map.keys().filter(Result::is_ok).count()).unwrap_or(u32::MAX);
    Ok(Some(UdpStatus { interfaces, flows, max_flows }))
}

fn is_link_pin(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("link_"))
}

/// Removes every pin (links first, which detaches the programs, then maps)
/// and the pin directory. Returns how many pins were removed; 0 when nothing
/// was attached. Safe after an interrupted attach.
pub fn detach() -> Result<usize, EbpfError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(EbpfError::NotRoot);
    }
    let dir = Path::new(PIN_DIR);
    let Ok(entries) = fs::read_dir(dir) else { return Ok(0) };
    let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    // Links before maps: the programs stop before their maps go.
    names.sort_by_key(|p| !is_link_pin(p));
    let mut removed = 0;
    for path in names {
        if is_link_pin(&path) {
            // Detached at once: removing the pin alone lets the programs run
            // on for a moment after this returns. Should the detach fail
            // (a cgroup or interface already gone), removing the pin still
            // releases the link, only later.
            let _ = crate::sys::bpf::detach_pinned_link(&path);
        }
        fs::remove_file(&path).map_err(|e| EbpfError::Io(format!("remove {}", path.display()), e))?;
        removed += 1;
    }
    fs::remove_dir(dir).map_err(|e| EbpfError::Io(format!("remove {PIN_DIR}"), e))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::bpf::Peer as RawPeer;

    #[test]
    fn layouts_match_the_c_structs() {
        // struct toa_peer: 8 bytes of flags and port, 16 + 16 of addresses, 4 of lb port and pad.
        assert_eq!(size_of::<RawPeer>(), 44);
        assert_eq!(size_of::<RawConfig>(), 8 + 256);
        assert_eq!(size_of::<RawMeta>(), 256);
    }

    /// The map sizes the listeners and `UoaSocket` read with raw `bpf(2)`
    /// calls (`helper.rs`), from the committed object itself.
    #[test]
    fn raw_lookups_match_the_maps_in_the_object() {
        let object = aya_obj::Object::parse(OBJECT).expect("parse bpf/toa.bpf.o");
        let sizes = |name: &str| {
            let map = object.maps.get(name).unwrap_or_else(|| panic!("{name} in the object"));
            (map.key_size(), map.value_size())
        };
        assert_eq!(sizes("toa_udp_flows"), (20, 20));
        assert_eq!(sizes("toa_udp_replies"), (20, 20));
        assert_eq!(sizes("toa_peers").1, size_of::<RawPeer>() as u32);
        assert_eq!(sizes("toa_config").1, size_of::<RawConfig>() as u32);
        assert_eq!(sizes("toa_meta").1, size_of::<RawMeta>() as u32);
    }

    #[test]
    fn trie_keys_map_ipv4() {
        let (prefix, key) = trie_key(&"100.125.0.0/16".parse().unwrap());
        assert_eq!(prefix, 112);
        assert_eq!(Ipv6Addr::from(key).to_string(), "::ffff:100.125.0.0");
        let (prefix, _) = trie_key(&"2001:db8::/32".parse().unwrap());
        assert_eq!(prefix, 32);
    }

    #[test]
    fn metrics_name_every_counter_once() {
        assert_eq!(
            render_metrics(None),
            format!(
                "# HELP {ATTACHED} Whether the kernel helper is attached (label: its cgroup).\n# TYPE {ATTACHED} gauge\n{ATTACHED} 0\n"
            )
        );
        let status = Status {
            cgroup: "/sys/fs/cgroup/a \"b\"".into(),
            trust: vec!["100.125.0.0/16".parse().unwrap()],
            trust_any: false,
            formats: Formats::default(),
            counters: Counters::from_slots(|i| u64::from(i) + 1),
            udp: Some(UdpStatus { interfaces: vec!["b0".into()], flows: 7, max_flows: 65536 }),
        };
        let text = render_metrics(Some(&status));
        assert!(text.contains("toa_shim_ebpf_attached{cgroup=\"/sys/fs/cgroup/a \\\"b\\\"\"} 1\n"), "{text}");
        for (def, value) in Counters::TABLE.iter().zip(1..) {
            assert_eq!(text.matches(&format!("# TYPE {} counter\n", def.metric)).count(), 1, "{text}");
            assert!(text.contains(&format!("\n{} {value}\n", def.metric)), "{text}");
        }
        let samples: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(['{', ' ']).next().unwrap())
            .collect();
        assert_eq!(samples, metric_series());
        assert!(text.ends_with("\ntoa_shim_ebpf_udp_flows 7\n# HELP toa_shim_ebpf_udp_flows_max The LRU map's bound (0 without UDP).\n# TYPE toa_shim_ebpf_udp_flows_max gauge\ntoa_shim_ebpf_udp_flows_max 65536\n"), "{text}");
        let shown = status.to_string();
        assert!(shown.contains("\nudp: interfaces b0, flows 7 of 65536\n"), "{shown}");
        assert!(
            shown.ends_with(
                "counters: found=1 untrusted=2 malformed=3 v6_on_v4=4 rewritten=5 udp_found=6 udp_untrusted=7 udp_malformed=8 udp_stripped=9 udp_received=10 udp_sent=11 udp_carriers=12"
            ),
            "{shown}"
        );
    }

    #[test]
    fn the_object_has_every_program_and_map() {
        // Symbol names stand in the ELF string table as plain bytes.
        let text = String::from_utf8_lossy(OBJECT);
        for name in PROGRAMS.iter().chain(&UDP_PROGRAMS).map(|(p, _)| *p).chain([UDP_INGRESS]).chain(MAPS) {
            assert!(text.contains(name), "{name} missing from bpf/toa.bpf.o");
        }
    }
}
