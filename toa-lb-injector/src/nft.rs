//! The nftables rules that keep the LB host's kernel out of the flows
//! `toa-lb` handles: packets to VIPs and SNAT addresses are dropped if the
//! kernel would forward or take them in. The AF_PACKET taps have seen them by
//! then. (Not in prerouting: with br_netfilter, a bridge runs prerouting
//! before it hands a frame to its own device, and the tap would miss it.)

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// The table `toa-lb` owns; removing it removes every rule.
pub const TABLE: &str = "toa_lb";

/// Removes the table (left by a crash, or at exit). Absent is fine.
pub fn remove() -> Result<(), String> {
    let out = Command::new("nft")
        .args(["delete", "table", "inet", TABLE])
        .output()
        .map_err(|e| format!("cannot run nft ({e}): install nftables"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || err.contains("No such file") {
        Ok(())
    } else {
        Err(format!("nft delete table inet {TABLE}: {}", err.trim()))
    }
}

/// Whether the table exists.
pub fn present() -> bool {
    Command::new("nft").args(["list", "table", "inet", TABLE]).output().is_ok_and(|o| o.status.success())
}

/// Installs the table, replacing one that exists (a stale one, or the
/// previous set of a reload) in the same nftables transaction: there is no
/// moment without rules.
pub fn install(owned: &[IpAddr]) -> Result<(), String> {
    let (v4, v6): (Vec<String>, Vec<String>) = {
        let v4 = owned.iter().filter(|a| a.is_ipv4()).map(ToString::to_string).collect();
        let v6 = owned.iter().filter(|a| a.is_ipv6()).map(ToString::to_string).collect();
        (v4, v6)
    };
    // Create (if absent) and delete first, so the new table replaces any old one.
    let mut script = format!("table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    for hook in ["input", "forward"] {
        script += &format!("  chain {hook} {{\n    type filter hook {hook} priority -10; policy accept;\n");
        if !v4.is_empty() {
            script += &format!("    ip daddr {{ {} }} drop\n", v4.join(", "));
        }
        if !v6.is_empty() {
            script += &format!("    ip6 daddr {{ {} }} drop\n", v6.join(", "));
        }
        script += "  }\n";
    }
    script += "}\n";
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft ({e}): install nftables"))?;
    child.stdin.take().map(|mut s| s.write_all(script.as_bytes())).transpose().map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}
