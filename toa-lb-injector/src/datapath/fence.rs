//! The nftables rules that keep the LB host's kernel out of the flows a
//! user-space datapath (ring, pnet) handles: packets to VIPs and SNAT
//! addresses are dropped before the kernel's IP layer sees them. The
//! AF_PACKET taps have copied them by then.
//!
//! Two tables, both named `toa_lb`, installed and removed together:
//! - `netdev toa_lb`: an ingress chain per interface. The ingress hook runs
//!   after the packet taps and before IP, so the kernel spends nothing on
//!   these packets (no routing lookup, no bridge netfilter on the way up).
//! - `inet toa_lb`: the same drops in input and forward, in case a packet
//!   reaches IP another way. (Not in prerouting: with br_netfilter, a bridge
//!   runs prerouting before it hands a frame to its own device, and the tap
//!   would miss it.)

use std::net::IpAddr;

use crate::nft::{self, NftError};

/// The tables `toa-lb` owns; removing them removes every rule.
pub const TABLE: &str = "toa_lb";

/// The families of the tables.
const FAMILIES: [&str; 2] = ["inet", "netdev"];

/// Removes the tables (left by a crash, or at exit). Absent is fine.
pub fn remove() -> Result<(), NftError> {
    for family in FAMILIES {
        nft::delete_table(family, TABLE)?;
    }
    Ok(())
}

/// Whether both tables exist.
pub fn present() -> std::io::Result<bool> {
    Ok(nft::table_exists("inet", TABLE)? && nft::table_exists("netdev", TABLE)?)
}

/// The drop rules for `owned`, one line per family present.
fn drops(owned: &[IpAddr]) -> String {
    let v4: Vec<String> = owned.iter().filter(|a| a.is_ipv4()).map(ToString::to_string).collect();
    let v6: Vec<String> = owned.iter().filter(|a| a.is_ipv6()).map(ToString::to_string).collect();
    let mut rules = String::new();
    if !v4.is_empty() {
        rules += &format!("    ip daddr {{ {} }} drop\n", v4.join(", "));
    }
    if !v6.is_empty() {
        rules += &format!("    ip6 daddr {{ {} }} drop\n", v6.join(", "));
    }
    rules
}

/// The nft script for `owned` on `interfaces`: it replaces tables that exist
/// (a stale one, or the previous set of a reload) in one transaction, so
/// there is no moment without rules.
pub(crate) fn script(owned: &[IpAddr], interfaces: &[&str]) -> String {
    let drops = drops(owned);
    let mut script = String::new();
    // Create (if absent) and delete first, so the new tables replace any old ones.
    for family in FAMILIES {
        script += &format!("table {family} {TABLE}\ndelete table {family} {TABLE}\n");
    }
    script += &format!("table inet {TABLE} {{\n");
    for hook in ["input", "forward"] {
        script += &format!("  chain {hook} {{\n    type filter hook {hook} priority -10; policy accept;\n");
        script += &drops;
        script += "  }\n";
    }
    script += "}\n";
    script += &format!("table netdev {TABLE} {{\n");
    for (i, interface) in interfaces.iter().enumerate() {
        script += &format!(
            "  chain ingress{i} {{\n    type filter hook ingress device \"{interface}\" priority -500; policy accept;\n"
        );
        script += &drops;
        script += "  }\n";
    }
    script += "}\n";
    script
}

/// Installs the tables for `owned` addresses on `interfaces`, replacing old ones.
pub fn install(owned: &[IpAddr], interfaces: &[&str]) -> Result<(), NftError> {
    nft::apply(&script(owned, interfaces))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_transaction_replaces_both_tables() {
        let owned: Vec<IpAddr> = vec!["203.0.113.10".parse().unwrap(), "2001:db8:c::10".parse().unwrap()];
        let s = script(&owned, &["lb-c", "lb-br"]);
        assert!(s.starts_with("table inet toa_lb\ndelete table inet toa_lb\ntable netdev toa_lb\n"), "{s}");
        assert_eq!(s.matches("ip daddr { 203.0.113.10 } drop").count(), 4, "{s}");
        assert_eq!(s.matches("ip6 daddr { 2001:db8:c::10 } drop").count(), 4, "{s}");
        assert!(s.contains("hook ingress device \"lb-br\" priority -500"), "{s}");
    }
}
