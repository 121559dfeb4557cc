//! `toa-lb inject`: the TOA injector alone, for a NAT someone else runs
//! (their own nftables or iptables DNAT and SNAT, kube-proxy, Docker's
//! published ports). It attaches to the interface clients come in on, before
//! that NAT, and stays attached after the command exits: its maps and links
//! are pinned under `/sys/fs/bpf/toa-lb/IFACE/`.
//!
//! ```text
//! toa-lb inject attach --iface eth0 --listener 203.0.113.10:80 [--listener ...] [--format toa] [--placement syn,ack] [--mss-clamp auto]
//! toa-lb inject status
//! toa-lb inject detach [--iface eth0]
//! ```

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use toa_core::Format;

use crate::datapath::kernel::injector::{self, InjectError, InjectListener, Injector, InjectorOptions};
use crate::engine::config::{MssClamp, ObtainClientIp, Placement, Protocol};

/// Where `toa-lb inject` pins its state, one directory per interface.
pub const PIN_DIR: &str = "/sys/fs/bpf/toa-lb";

/// What `toa-lb inject` can fail on, worded for the operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InjectCliError {
    /// The injector itself.
    #[error(transparent)]
    Inject(#[from] InjectError),
    /// Attached already.
    #[error("the injector is already attached to {0} ({1}); run `toa-lb inject detach --iface {0}` first")]
    AlreadyAttached(String, String),
    /// Nothing attached.
    #[error("the injector is not attached{0}; run `toa-lb inject attach`")]
    NotAttached(String),
    /// `toa-lb run`'s injector is on the interface.
    #[error(
        "{0} has toa-lb's injector attached already, not by `toa-lb inject`: a `toa-lb run` with client_interface = \"{0}\"? It does what `inject` would: stop it first, or attach elsewhere. (If none runs, one that crashed before Linux 6.6 left its tc filters: starting and stopping `toa-lb run` removes them.)"
    )]
    Busy(String),
    /// No bpffs where pins would last.
    #[error("{0}")]
    Bpffs(String),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// A file-system step failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// What `attach` is asked for.
#[derive(Clone, Debug)]
pub struct AttachOptions {
    /// The interface clients come in on.
    pub interface: String,
    /// VIP:PORT as clients address it (before the NAT), TCP.
    pub listeners: Vec<SocketAddr>,
    /// The TOA format (an IPv6 client always gets an IPv6 format).
    pub format: Format,
    /// Which segments carry it.
    pub placement: Placement,
    /// Whether the backends' SYN-ACK MSS leaves room for it. A segment the
    /// option would push past the interface's MTU goes without it.
    pub mss_clamp: MssClamp,
    /// Flows remembered between SYN and handshake ACK (slots of a direct-mapped table).
    pub flows: u32,
    /// Where to pin (default [`PIN_DIR`]).
    pub pin_dir: PathBuf,
}

/// Parses `syn,ack,data` (any of them).
pub fn parse_placement(s: &str) -> Result<Placement, InjectCliError> {
    let mut p = Placement { syn: false, handshake_ack: false, data: false };
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "syn" => p.syn = true,
            "ack" => p.handshake_ack = true,
            "data" => p.data = true,
            other => {
                return Err(InjectCliError::Usage(format!("unknown placement {other:?}: syn, ack, data")));
            }
        }
    }
    if !(p.syn || p.handshake_ack || p.data) {
        return Err(InjectCliError::Usage("--placement names none of syn, ack, data".into()));
    }
    Ok(p)
}

fn same_mount_namespace_as_init() -> bool {
    match (std::fs::read_link("/proc/self/ns/mnt"), std::fs::read_link("/proc/1/ns/mnt")) {
        (Ok(a), Ok(b)) => a == b,
        _ => true,
    }
}

/// Makes sure pins under `dir` outlive this process: bpffs mounted at
/// /sys/fs/bpf (mounted here when it is not, as systemd would).
fn ensure_bpffs(dir: &Path) -> Result<(), InjectCliError> {
    let mounts =
        std::fs::read_to_string("/proc/mounts").map_err(|e| InjectCliError::Io("/proc/mounts".into(), e))?;
    let bpffs = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(2) == Some(&"bpf") && f.get(1).is_some_and(|m| dir.starts_with(m))
    });
    if bpffs {
        return Ok(());
    }
    if !same_mount_namespace_as_init() {
        // `ip netns exec` gives the command a mount namespace of its own with a
        // fresh /sys: a bpffs mounted there, and the pins in it, die with it.
        return Err(InjectCliError::Bpffs(format!(
            "{} is not on a bpffs in this mount namespace (ip netns exec remounts /sys): the pins would vanish with it; run `mount -t bpf bpf /sys/fs/bpf` on the host and use `nsenter --net=/run/netns/NAME toa-lb inject ...` instead",
            dir.display()
        )));
    }
    nix::mount::mount(Some("bpf"), "/sys/fs/bpf", Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| InjectCliError::Io("mount bpffs at /sys/fs/bpf".into(), e.into()))
}

/// Whether anything of an injector is pinned for `interface` under `pin_dir`
/// (all of it, or what an interrupted attach left).
pub(crate) fn is_pinned(pin_dir: &Path, interface: &str) -> bool {
    std::fs::read_dir(pin_dir.join(interface)).is_ok_and(|mut d| d.next().is_some())
}

/// Loads the injector, fills its listeners, attaches it to the interface and
/// pins it. On failure nothing is left behind.
pub fn attach(options: &AttachOptions) -> Result<(), InjectCliError> {
    injector::preflight()?;
    injector::check_interface(&options.interface)?;
    if options.listeners.is_empty() {
        return Err(InjectCliError::Usage("give at least one --listener VIP:PORT".into()));
    }
    if options.listeners.len() > injector::MAX_LISTENERS as usize {
        return Err(InjectError::TooManyListeners.into());
    }
    ensure_bpffs(&options.pin_dir)?;
    let dir = options.pin_dir.join(&options.interface);
    let pinned = is_pinned(&options.pin_dir, &options.interface);
    if !pinned && !injector::attached_programs(&options.interface).is_empty() {
        return Err(InjectCliError::Busy(options.interface.clone()));
    }
    if pinned {
        let complete = injector::PROGRAMS.iter().all(|(p, _)| dir.join(format!("link_{p}")).exists());
        let what = if complete {
            "pinned under ".to_owned() + &dir.display().to_string()
        } else {
            "partly: an earlier attach was interrupted".into()
        };
        return Err(InjectCliError::AlreadyAttached(options.interface.clone(), what));
    }
    std::fs::create_dir_all(&dir).map_err(|e| InjectCliError::Io(format!("create {}", dir.display()), e))?;
    let result = (|| {
        let mut injector = Injector::load(&InjectorOptions {
            flows: options.flows,
            transparent_mark: 0,
            data_placement: options.placement.data,
            udp_timeout: std::time::Duration::from_secs(60),
            // Someone else's NAT: no bound of ours.
            budget: i64::MAX,
            // Someone else's routes: the interface the segments come in on.
            mtu_ifindex: 0,
            // Someone else's NAT, which knows no mark of ours.
            gate_mark: 0,
        })?;
        for (slot, vip) in options.listeners.iter().enumerate() {
            injector.set_listener(&InjectListener {
                vip: *vip,
                protocol: Protocol::Tcp,
                slot: slot as u32,
                mode: ObtainClientIp::Toa(options.format),
                placement: options.placement,
                clamp_mss: options.mss_clamp.applies(options.placement),
            })?;
        }
        injector.attach(&options.interface)?;
        injector.pin(&dir)?;
        Ok::<(), InjectCliError>(())
    })();
    if result.is_err() {
        let _ = detach_dir(&dir, &options.interface);
    }
    result
}

/// The interfaces the injector is pinned for.
fn attached(pin_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(pin_dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Listeners and counters of every attached injector, for a person.
pub fn status(pin_dir: &Path) -> Result<String, InjectCliError> {
    injector::preflight()?;
    let interfaces = attached(pin_dir);
    if interfaces.is_empty() {
        return Err(InjectCliError::NotAttached(String::new()));
    }
    let mut out = String::new();
    for iface in interfaces {
        let dir = pin_dir.join(&iface);
        let links = injector::PROGRAMS.iter().filter(|(p, _)| dir.join(format!("link_{p}")).exists()).count();
        let exists = nix::net::if_::if_nametoindex(iface.as_str()).is_ok();
        let running = if exists { injector::running_programs(&iface) } else { Some(0) };
        let _ = writeln!(
            out,
            "interface {iface} ({links} of 2 programs pinned, {} running, {})",
            running.map_or("?".to_owned(), |n| n.to_string()),
            dir.display()
        );
        // Pins outlive the interface: the programs of one deleted (or deleted
        // and made again) are pinned, but run nowhere.
        let again = format!("run `toa-lb inject detach --iface {iface}`, then attach again");
        if !exists {
            let _ =
                writeln!(out, "  NOT RUNNING: interface {iface} is gone (deleted since the attach); {again}");
        } else if running.is_some_and(|n| n < injector::PROGRAMS.len()) {
            let _ = writeln!(
                out,
                "  NOT RUNNING: the injector's programs are not attached to {iface} (made again since the attach, or detached by someone else); {again}"
            );
        }
        for l in injector::pinned_listeners(&dir)? {
            let c = injector::pinned_counters(&dir, l.slot)?;
            let format = match l.mode {
                ObtainClientIp::Toa(f) => f.to_string(),
                other => format!("{other:?}"),
            };
            let mut placement = Vec::new();
            if l.placement.syn {
                placement.push("syn");
            }
            if l.placement.handshake_ack {
                placement.push("ack");
            }
            if l.placement.data {
                placement.push("data");
            }
            let _ = writeln!(
                out,
                "  listener {} format={format} placement={} mss_clamp={} injected={} no_room={} stripped={} malformed={} unreadable={} mss_clamped={}",
                l.vip,
                placement.join(","),
                if l.clamp_mss { "on" } else { "off" },
                c.injected,
                c.no_room,
                c.stripped,
                c.malformed,
                c.unreadable,
                c.mss_clamped
            );
        }
        let host = injector::pinned_counters(&dir, injector::HOST_SLOT)?;
        let _ = writeln!(
            out,
            "  no listener: unreadable={} (IPv6 packets whose extension headers are too many or cut short, dropped)",
            host.unreadable
        );
    }
    Ok(out)
}

fn detach_dir(dir: &Path, interface: &str) -> Result<usize, InjectCliError> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(0) };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    // Links first: the programs stop before their maps go.
    let is_link = |p: &Path| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("link_"));
    paths.sort_by_key(|p| !is_link(p));
    let mut removed = 0;
    for path in paths {
        if is_link(&path) {
            // Detached at once: removing the pin alone lets the programs run
            // on for a moment after this returns. Should the detach fail (the
            // interface already gone), removing the pin still releases the
            // link, only later.
            let _ = crate::sys::bpf::detach_pinned_link(&path);
        }
        std::fs::remove_file(&path)
            .map_err(|e| InjectCliError::Io(format!("remove {}", path.display()), e))?;
        removed += 1;
    }
    // Before TCX, the tc filters live on without pins: remove them by name.
    injector::detach_stale(interface);
    std::fs::remove_dir(dir).map_err(|e| InjectCliError::Io(format!("remove {}", dir.display()), e))?;
    Ok(removed)
}

/// Detaches the injector from `interface`, or from every interface; returns
/// the interfaces. Safe after an interrupted attach.
pub fn detach(pin_dir: &Path, interface: Option<&str>) -> Result<Vec<String>, InjectCliError> {
    injector::preflight()?;
    let all = attached(pin_dir);
    let chosen: Vec<String> = match interface {
        Some(i) if all.iter().any(|a| a == i) => vec![i.to_owned()],
        Some(i) => return Err(InjectCliError::NotAttached(format!(" to {i}"))),
        None if all.is_empty() => return Err(InjectCliError::NotAttached(String::new())),
        None => all,
    };
    for iface in &chosen {
        detach_dir(&pin_dir.join(iface), iface)?;
    }
    if attached(pin_dir).is_empty() {
        let _ = std::fs::remove_dir(pin_dir);
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_parse() {
        let p = parse_placement("syn,ack").unwrap();
        assert_eq!((p.syn, p.handshake_ack, p.data), (true, true, false));
        let p = parse_placement("data").unwrap();
        assert_eq!((p.syn, p.handshake_ack, p.data), (false, false, true));
        assert!(parse_placement("syn,fin").unwrap_err().to_string().contains("\"fin\""));
        assert!(parse_placement("").is_err());
    }
}
