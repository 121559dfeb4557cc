//! What the kernel datapath changes on the host besides its table and its
//! injector: the VIPs and SNAT addresses on the interfaces, and forwarding.
//!
//! Every change is written to a state file before it is made
//! (`/run/toa-lb/netns-<inode>.state`, one per network namespace), and
//! undone at exit. A run that crashed leaves its file; the next start in
//! that namespace undoes what it lists. An address that was already there
//! is not added, so it is never removed; a sysctl goes back to the value it had.
//!
//! One `toa-lb` per namespace: a lock (`netns-<inode>.lock`, held while it
//! runs, released by the kernel however it ends) keeps a second one from
//! undoing the first one's changes. The files of namespaces that no longer
//! exist (the inode is free for another) are removed at start.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

/// Where the state files live (a tmpfs: a reboot clears them, and the addresses with them).
pub const STATE_DIR: &str = "/run/toa-lb";

/// One change, as the state file records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// `ip addr add ADDR dev IFACE` (a /32 or /128).
    Address {
        /// The interface.
        interface: String,
        /// The address.
        addr: IpAddr,
    },
    /// A sysctl under /proc/sys, with the value it had.
    Sysctl {
        /// Its path under /proc/sys, with dots (`net.ipv4.conf.lb-c.forwarding`
        /// is written `net/ipv4/conf/lb-c/forwarding`).
        path: String,
        /// The value before.
        old: String,
    },
}

impl Change {
    fn line(&self) -> String {
        match self {
            Change::Address { interface, addr } => format!("addr {interface} {addr}"),
            Change::Sysctl { path, old } => format!("sysctl {path} {old}"),
        }
    }

    fn parse(line: &str) -> Option<Change> {
        let mut words = line.split_whitespace();
        match (words.next()?, words.next()?, words.next()?) {
            ("addr", interface, addr) => {
                Some(Change::Address { interface: interface.into(), addr: addr.parse().ok()? })
            }
            ("sysctl", path, old) => Some(Change::Sysctl { path: path.into(), old: old.into() }),
            _ => None,
        }
    }
}

/// What went wrong changing the host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The state file.
    #[error("{0}: {1}")]
    State(String, std::io::Error),
    /// A command or a sysctl.
    #[error("{0}")]
    Change(String),
    /// Another toa-lb runs in this network namespace.
    #[error("another toa-lb is running in this network namespace ({0} is locked): stop it first")]
    Running(String),
}

/// The changes this run made, kept in the state file as they happen.
#[derive(Debug)]
pub struct Host {
    path: PathBuf,
    done: Vec<Change>,
    /// Held while this run lives.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// The inode of a network namespace file (`net:[4026531840]`).
fn netns_inode(link: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_link(link).ok()?.to_string_lossy().into_owned();
    text.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Where the kernel datapath keeps its backend ids between runs in this
/// namespace (`netns-<inode>.ids`; removed with the namespace's other files
/// when the namespace is gone).
pub fn ids_path() -> PathBuf {
    netns_file(this_netns(), "ids")
}

/// The file of `kind` (`lock`, `state`, `ids`) of the namespace `inode`.
fn netns_file(inode: u64, kind: &str) -> PathBuf {
    PathBuf::from(STATE_DIR).join(format!("netns-{inode}.{kind}"))
}

/// This network namespace's inode.
fn this_netns() -> u64 {
    netns_inode(std::path::Path::new("/proc/self/ns/net")).unwrap_or(0)
}

/// The inodes of every network namespace that exists: any process's, and
/// those `ip netns` keeps (bind mounts under /run/netns).
fn live_netns() -> std::collections::HashSet<u64> {
    let mut live = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Some(inode) = netns_inode(&entry.path().join("ns/net")) {
            live.insert(inode);
        }
    }
    for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        if let Ok(meta) = std::fs::metadata(entry.path()) {
            live.insert(std::os::unix::fs::MetadataExt::ino(&meta));
        }
    }
    live
}

/// Removes the state and lock files of namespaces that are gone (their
/// addresses and sysctls went with them).
fn remove_dead_files() {
    let live = live_netns();
    for entry in std::fs::read_dir(STATE_DIR).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let inode = name
            .strip_prefix("netns-")
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse::<u64>().ok());
        if inode.is_some_and(|i| !live.contains(&i)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn ip(args: &[&str]) -> Result<(), HostError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| HostError::Change(format!("cannot run ip ({e}): install iproute2")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HostError::Change(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn prefix(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// `ip addr add` of one of toa-lb's addresses.
fn ip_add(interface: &str, addr: IpAddr) -> Result<(), HostError> {
    let family = if addr.is_ipv4() { "-4" } else { "-6" };
    let mut args = vec![family, "addr", "add"];
    let p = prefix(addr);
    args.extend([p.as_str(), "dev", interface]);
    if addr.is_ipv6() {
        // Usable at once (no duplicate address detection), and never picked
        // as the source of the host's own connections (deprecated).
        args.extend(["nodad", "preferred_lft", "0"]);
    }
    ip(&args)
}

/// A sysctl's value (`net/ipv4/conf/lb-c/forwarding`), trimmed.
fn read_sysctl(path: &str) -> Result<String, HostError> {
    let value = std::fs::read_to_string(PathBuf::from("/proc/sys").join(path))
        .map_err(|e| HostError::Change(format!("read {path}: {e}")))?;
    Ok(value.trim().to_owned())
}

fn write_sysctl(path: &str, value: &str) -> Result<(), HostError> {
    std::fs::write(PathBuf::from("/proc/sys").join(path), value)
        .map_err(|e| HostError::Change(format!("set {path} to {value}: {e}")))
}

/// Whether `interface` has `addr`, in a listing of the interfaces.
fn has_address(interfaces: &[pnet_datalink::NetworkInterface], interface: &str, addr: IpAddr) -> bool {
    interfaces.iter().any(|i| i.name == interface && i.ips.iter().any(|n| n.ip() == addr))
}

/// Sets a sysctl to `value` if it has another one (someone else changed it
/// after this run set it); returns whether it did. Not recorded: the value
/// to restore at exit is the one before the run.
pub fn put_back_sysctl(path: &str, value: &str) -> Result<bool, HostError> {
    if read_sysctl(path)? == value {
        return Ok(false);
    }
    write_sysctl(path, value)?;
    Ok(true)
}

fn undo(change: &Change) -> Result<(), HostError> {
    match change {
        Change::Address { interface, addr } => {
            let family = if addr.is_ipv4() { "-4" } else { "-6" };
            match ip(&[family, "addr", "del", &prefix(*addr), "dev", interface]) {
                // Gone already (the interface went, or someone removed it): fine.
                Err(HostError::Change(e))
                    if ["Cannot assign", "Cannot find device", "Address not found"]
                        .iter()
                        .any(|gone| e.contains(gone)) =>
                {
                    Ok(())
                }
                other => other,
            }
        }
        Change::Sysctl { path, old } => match std::fs::write(PathBuf::from("/proc/sys").join(path), old) {
            // An interface's setting that went with its interface: nothing to restore.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other.map_err(|e| HostError::Change(format!("restore {path} to {old}: {e}"))),
        },
    }
}

impl Host {
    /// Undoes what a crashed run in this namespace left (its state file),
    /// saying so, then starts a new record.
    pub fn recover() -> Result<Host, HostError> {
        std::fs::create_dir_all(STATE_DIR).map_err(|e| HostError::State(STATE_DIR.into(), e))?;
        let inode = this_netns();
        let lock_path = netns_file(inode, "lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| HostError::State(lock_path.display().to_string(), e))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| HostError::Running(lock_path.display().to_string()))?;
        remove_dead_files();
        let path = netns_file(inode, "state");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let left: Vec<Change> = text.lines().filter_map(Change::parse).collect();
            // Last change first.
            for change in left.iter().rev() {
                if let Err(e) = undo(change) {
                    tracing::warn!("cleaning up after a crash: {e}");
                }
            }
            if !left.is_empty() {
                tracing::warn!(
                    "undid {} changes a previous run left after it stopped without cleaning up",
                    left.len()
                );
            }
        }
        std::fs::write(&path, "").map_err(|e| HostError::State(path.display().to_string(), e))?;
        Ok(Host { path, done: Vec::new(), _lock: lock })
    }

    fn record(&mut self, change: Change) -> Result<(), HostError> {
        let mut file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| HostError::State(self.path.display().to_string(), e))?;
        writeln!(file, "{}", change.line())
            .map_err(|e| HostError::State(self.path.display().to_string(), e))?;
        self.done.push(change);
        Ok(())
    }

    /// Adds `addr` to `interface` unless it is there already.
    pub fn add_address(&mut self, interface: &str, addr: IpAddr) -> Result<(), HostError> {
        if has_address(&pnet_datalink::interfaces(), interface, addr) {
            return Ok(());
        }
        self.record(Change::Address { interface: interface.into(), addr })?;
        ip_add(interface, addr)
    }

    /// Adds again the addresses this run added that are no longer there
    /// (someone else removed them: a network manager reconfiguring the
    /// interface, `ip addr flush`); returns each with how that went.
    pub fn put_back_addresses(&self) -> Vec<((String, IpAddr), Result<(), HostError>)> {
        let interfaces = pnet_datalink::interfaces();
        self.addresses()
            .into_iter()
            .filter(|(interface, addr)| !has_address(&interfaces, interface, *addr))
            .map(|(interface, addr)| {
                let done = ip_add(&interface, addr);
                ((interface, addr), done)
            })
            .collect()
    }

    /// Removes an address this run added (a reload dropped it).
    pub fn remove_address(&mut self, interface: &str, addr: IpAddr) -> Result<(), HostError> {
        let change = Change::Address { interface: interface.into(), addr };
        let Some(i) = self.done.iter().position(|c| *c == change) else { return Ok(()) };
        undo(&change)?;
        self.done.remove(i);
        self.rewrite()
    }

    /// The addresses this run added.
    pub fn addresses(&self) -> Vec<(String, IpAddr)> {
        self.done
            .iter()
            .filter_map(|c| match c {
                Change::Address { interface, addr } => Some((interface.clone(), *addr)),
                Change::Sysctl { .. } => None,
            })
            .collect()
    }

    /// Sets a sysctl (`net/ipv4/conf/lb-c/forwarding`) unless it has that value.
    pub fn set_sysctl(&mut self, path: &str, value: &str) -> Result<(), HostError> {
        let old = read_sysctl(path)?;
        if old == value {
            return Ok(());
        }
        self.record(Change::Sysctl { path: path.into(), old })?;
        write_sysctl(path, value)?;
        tracing::info!("set {} = {value} (restored at exit)", path.replace('/', "."));
        Ok(())
    }

    fn rewrite(&self) -> Result<(), HostError> {
        let text: String = self.done.iter().map(|c| c.line() + "\n").collect();
        std::fs::write(&self.path, text).map_err(|e| HostError::State(self.path.display().to_string(), e))
    }

    /// Undoes every change, last first, and removes the state file.
    pub fn restore(mut self) -> Result<(), HostError> {
        let mut first_error = None;
        while let Some(change) = self.done.pop() {
            if let Err(e) = undo(&change) {
                first_error.get_or_insert(e);
            }
        }
        let _ = std::fs::remove_file(&self.path);
        // (The lock file stays: removing it while another start waits on it would
        // let two runs hold two different locks.)
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_trip_through_their_lines() {
        for change in [
            Change::Address { interface: "lb-c".into(), addr: "203.0.113.10".parse().unwrap() },
            Change::Address { interface: "lb-br".into(), addr: "2001:db8:64::1:1".parse().unwrap() },
            Change::Sysctl { path: "net/ipv4/conf/lb-c/forwarding".into(), old: "0".into() },
        ] {
            assert_eq!(Change::parse(&change.line()), Some(change));
        }
        assert_eq!(Change::parse("garbage"), None);
        assert_eq!(Change::parse("addr lb-c not-an-address"), None);
    }
}
