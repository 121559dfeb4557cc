//! A child cgroup (v2) for a test, removed with everything in it on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A cgroup under the v2 hierarchy's root.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

/// The cgroup v2 mount point (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
pub fn root() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .min_by_key(|p| p.as_os_str().len())
        .expect("a cgroup v2 hierarchy")
}

impl Cgroup {
    /// Creates `toa-TAG-PID` under the root.
    pub fn new(tag: &str) -> Cgroup {
        let path = root().join(format!("toa-{tag}-{}", std::process::id()));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Cgroup { path }
    }

    /// Creates `NAME` inside this cgroup, as Kubernetes nests a pod's cgroup
    /// under `kubepods.slice`. Drop it before its parent.
    pub fn child(&self, name: &str) -> Cgroup {
        let path = self.path.join(name);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Cgroup { path }
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command that runs `program` inside this cgroup and the network
    /// namespace `netns`. The shell joins the cgroup first, then enters the
    /// namespace with `nsenter --net`, which (unlike `ip netns exec`) does not
    /// remount /sys, so the program still sees /sys/fs/bpf and the helper's pins.
    pub fn command_in(&self, netns: &str, program: &str, args: &[&str]) -> Command {
        let procs = self.path.join("cgroup.procs");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("echo $$ > {} && exec nsenter --net=/run/netns/\"$0\" -- \"$@\"", procs.display()))
            .arg(netns)
            .arg(program)
            .args(args);
        cmd
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Kill what is left inside (cgroup.kill exists since Linux 5.14), then remove it.
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..50 {
            let procs = fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                break;
            }
            for pid in procs.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).stderr(Stdio::null()).status();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = fs::remove_dir(&self.path);
    }
}
