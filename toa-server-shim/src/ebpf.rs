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

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, MapData, PerCpuArray, SkStorage};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SockOps};
use ipnet::IpNet;
use toa_core::{Format, Formats};

use crate::sys::bpf::{Config as RawConfig, Meta as RawMeta, Peer as RawPeer};
use crate::trust::TrustPolicy;

/// Where the helper's maps and links are pinned.
pub const PIN_DIR: &str = "/sys/fs/bpf/toa";

/// The compiled programs (`scripts/build-bpf.sh`).
static OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/toa.bpf.o");

#[cfg(test)]
const MAPS: [&str; 5] = ["toa_peers", "toa_trust", "toa_config", "toa_counters", "toa_meta"];
/// (program, pinned link name)
const PROGRAMS: [(&str, &str); 4] = [
    ("toa_sockops", "link_sockops"),
    ("toa_sockops_data", "link_sockops_data"),
    ("toa_getpeername4", "link_getpeername4"),
    ("toa_getpeername6", "link_getpeername6"),
];

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
}

/// The helper's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Trusted TOAs stored for a connection.
    pub found: u64,
    /// TOAs from untrusted sources, ignored.
    pub untrusted: u64,
    /// Malformed options where a TOA was looked for.
    pub malformed: u64,
    /// IPv6 clients on IPv4 sockets: no `sockaddr_in` can hold them, not rewritten.
    pub v6_on_v4: u64,
    /// `accept()`/`getpeername()` answers rewritten.
    pub rewritten: u64,
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
        let c = self.counters;
        write!(
            f,
            "counters: found={} untrusted={} malformed={} v6_on_v4={} rewritten={}",
            c.found, c.untrusted, c.malformed, c.v6_on_v4, c.rewritten
        )
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
    let release =
        nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version < (5, 10) {
        return Err(EbpfError::OldKernel(release));
    }
    Ok(())
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on hybrid systems).
pub fn cgroup2_root() -> Result<PathBuf, EbpfError> {
    let mounts =
        fs::read_to_string("/proc/mounts").map_err(|e| EbpfError::Io("read /proc/mounts".into(), e))?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, path, kind) = (fields.next()?, fields.next()?, fields.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(path))
        })
        .min_by_key(|p| p.as_os_str().len())
        .ok_or(EbpfError::NoCgroup2)
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
    if !cgroup.starts_with(&root) || !cgroup.join("cgroup.procs").exists() {
        return Err(EbpfError::NotACgroup(cgroup, root));
    }
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
    let result = attach_pinned(options, &cgroup);
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

fn attach_pinned(options: &AttachOptions, cgroup: &Path) -> Result<(), EbpfError> {
    let mut ebpf = aya::EbpfLoader::new()
        .default_map_pin_directory(PIN_DIR)
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
    for (name, link_name) in PROGRAMS {
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
        link.pin(&link_path)
            .map_err(|e| EbpfError::Bpf(format!("pin {}", link_path.display()), e.to_string()))?;
    }
    Ok(())
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
    let counters =
        Counters { found: sum(0), untrusted: sum(1), malformed: sum(2), v6_on_v4: sum(3), rewritten: sum(4) };
    Ok(Status { cgroup, trust: nets, trust_any: config.trust_any != 0, formats, counters })
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
    names.sort_by_key(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("link_")));
    let mut removed = 0;
    for path in names {
        fs::remove_file(&path).map_err(|e| EbpfError::Io(format!("remove {}", path.display()), e))?;
        removed += 1;
    }
    fs::remove_dir(dir).map_err(|e| EbpfError::Io(format!("remove {PIN_DIR}"), e))?;
    Ok(removed)
}

/// The helper's per-socket storage, for [`crate::ToaListener`] in auto mode.
pub(crate) struct PeerStore {
    map: SkStorage<MapData, RawPeer>,
}

impl std::fmt::Debug for PeerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerStore")
    }
}

/// What the helper knows about one socket.
pub(crate) enum Stored {
    /// A trusted TOA: the client and the real peer.
    Client { client: SocketAddr, lb: SocketAddr },
    /// The helper saw the connection but found no trusted TOA (yet).
    Nothing { lb: SocketAddr },
}

impl PeerStore {
    /// Opens the pinned storage, when the helper is attached and readable.
    pub(crate) fn open() -> Option<PeerStore> {
        let data = MapData::from_pin(Path::new(PIN_DIR).join("toa_peers")).ok()?;
        let map = SkStorage::try_from(aya::maps::Map::SkStorage(data)).ok()?;
        Some(PeerStore { map })
    }

    /// The helper's record of the accepted socket `fd` (None: the socket is
    /// not in the helper's cgroup, or the helper came after the connection).
    pub(crate) fn get(&self, fd: &impl AsRawFd, local_v6: bool) -> Option<Stored> {
        let raw = self.map.get(fd, 0).ok()?;
        let lb_ip = Ipv6Addr::from(u128::from_be_bytes(words_to_bytes(raw.lb_addr)));
        let lb_port = u16::from_be(raw.lb_port);
        let lb = match (lb_ip.to_ipv4_mapped(), local_v6) {
            (Some(v4), false) => SocketAddr::new(IpAddr::V4(v4), lb_port),
            _ => SocketAddr::V6(SocketAddrV6::new(lb_ip, lb_port, 0, 0)),
        };
        const ST_FOUND: u8 = 2;
        if raw.state != ST_FOUND {
            return Some(Stored::Nothing { lb });
        }
        let port = u16::from_be(raw.port);
        let client = if raw.family == 2 {
            let v4 = Ipv4Addr::from(raw.addr[0].to_ne_bytes());
            if local_v6 {
                SocketAddr::V6(SocketAddrV6::new(v4.to_ipv6_mapped(), port, 0, 0))
            } else {
                SocketAddr::new(IpAddr::V4(v4), port)
            }
        } else {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::from(words_to_bytes(raw.addr))), port)
        };
        Some(Stored::Client { client, lb })
    }
}

/// Network-order words as stored by the kernel, back to bytes.
fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_c_structs() {
        // struct toa_peer: 8 bytes of flags and port, 16 + 16 of addresses, 4 of lb port and pad.
        assert_eq!(size_of::<RawPeer>(), 44);
        assert_eq!(size_of::<RawConfig>(), 8 + 256);
        assert_eq!(size_of::<RawMeta>(), 256);
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
    fn the_object_has_every_program_and_map() {
        // Symbol names stand in the ELF string table as plain bytes.
        let text = String::from_utf8_lossy(OBJECT);
        for name in PROGRAMS.iter().map(|(p, _)| *p).chain(MAPS) {
            assert!(text.contains(name), "{name} missing from bpf/toa.bpf.o");
        }
    }
}
