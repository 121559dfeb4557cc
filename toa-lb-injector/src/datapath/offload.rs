//! The offload check of the user-space datapaths.
//!
//! A ring or pnet datapath rewrites frames it copied off the interface, so
//! it needs each one whole, with a finished checksum. Offloads hand over
//! something else: GRO/LRO batch segments into one frame of up to 64 KiB
//! (longer than a ring slot), and a peer with tx checksum offload (a veth,
//! a bridge port) hands over only the pseudo-header sum, which a rewrite
//! carries into an invalid packet. On the testbed with offloads on, the ring
//! datapath answered 0 of 20 requests. So at start `toa-lb` checks its
//! interfaces (and a bridge's ports): it refuses, naming the `ethtool -K`
//! command, or, with `offloads = "disable"`, turns them off and says so.
//! The kernel datapath needs none of this: offloads stay on.

use std::path::Path;

use crate::file::Offloads;

/// One offload, by its `ethtool -K` name, and its legacy get/set commands.
struct Feature {
    name: &'static str,
    get: u32,
    set: u32,
    /// For flags read with ETHTOOL_GFLAGS: the flag's bit.
    flag: Option<u32>,
}

// linux/ethtool.h
const FEATURES: [Feature; 5] = [
    Feature { name: "tx", get: 0x16, set: 0x17, flag: None }, // ETHTOOL_GTXCSUM / STXCSUM
    Feature { name: "tso", get: 0x1e, set: 0x1f, flag: None }, // ETHTOOL_GTSO / STSO
    Feature { name: "gso", get: 0x23, set: 0x24, flag: None }, // ETHTOOL_GGSO / SGSO
    Feature { name: "gro", get: 0x2b, set: 0x2c, flag: None }, // ETHTOOL_GGRO / SGRO
    Feature { name: "lro", get: 0x25, set: 0x26, flag: Some(1 << 15) }, // ETHTOOL_GFLAGS / SFLAGS, ETH_FLAG_LRO
];

/// Why a user-space datapath cannot start on these interfaces.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OffloadError {
    /// Offloads are on and `offloads = "refuse"` (the default).
    #[error(
        "offloads are on ({on}): the {datapath} datapath needs whole frames with finished checksums. Run `{fix}`{peers}, or set offloads = \"disable\" to let toa-lb do it, or use datapath = \"kernel\" (offloads stay on)"
    )]
    On {
        /// The datapath.
        datapath: &'static str,
        /// What is on, per interface.
        on: String,
        /// The commands that turn it off.
        fix: String,
        /// A note on veth peers, which toa-lb cannot reach.
        peers: &'static str,
    },
    /// Reading or changing a setting failed.
    #[error("{0}: {1}")]
    Ethtool(String, std::io::Error),
}

/// The offloads on for interface `name`, by `ethtool -K` name.
pub fn enabled(name: &str) -> std::io::Result<Vec<&'static str>> {
    let mut on = Vec::new();
    for feature in &FEATURES {
        let value = match crate::sys::ethtool(name, feature.get, 0) {
            Ok(v) => v,
            // A driver without this setting (EOPNOTSUPP) does not do it.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => continue,
            Err(e) => return Err(e),
        };
        let set = match feature.flag {
            Some(bit) => value & bit != 0,
            None => value != 0,
        };
        if set {
            on.push(feature.name);
        }
    }
    Ok(on)
}

fn disable(name: &str, feature: &Feature) -> std::io::Result<()> {
    let value = match feature.flag {
        Some(bit) => crate::sys::ethtool(name, feature.get, 0)? & !bit,
        None => 0,
    };
    crate::sys::ethtool(name, feature.set, value).map(drop)
}

/// The interfaces to check for `interfaces`: each, and a bridge's ports.
fn with_ports(interfaces: &[&str]) -> Vec<String> {
    let mut all = Vec::new();
    for name in interfaces {
        all.push((*name).to_owned());
        if let Ok(ports) = std::fs::read_dir(Path::new("/sys/class/net").join(name).join("brif")) {
            let mut ports: Vec<String> =
                ports.flatten().map(|p| p.file_name().to_string_lossy().into_owned()).collect();
            ports.sort();
            all.extend(ports);
        }
    }
    all
}

/// Whether `name` is a veth (its peer, often in another namespace, hands it
/// frames made by its own offloads).
fn is_veth(name: &str) -> bool {
    let read = |f: &str| std::fs::read_to_string(Path::new("/sys/class/net").join(name).join(f)).ok();
    matches!((read("ifindex"), read("iflink")), (Some(a), Some(b)) if a != b)
}

/// Checks the offloads of `interfaces` (and their bridge ports) for
/// `datapath`: refuses, or turns them off and logs it, as `mode` says.
pub fn check(datapath: &'static str, interfaces: &[&str], mode: Offloads) -> Result<(), OffloadError> {
    let all = with_ports(interfaces);
    let mut found = Vec::new();
    for name in &all {
        let on =
            enabled(name).map_err(|e| OffloadError::Ethtool(format!("reading the offloads of {name}"), e))?;
        if !on.is_empty() {
            found.push((name.clone(), on));
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    let veth = found.iter().any(|(name, _)| is_veth(name));
    match mode {
        Offloads::Refuse => Err(OffloadError::On {
            datapath,
            on: found.iter().map(|(n, on)| format!("{n}: {}", on.join(" "))).collect::<Vec<_>>().join("; "),
            fix: found
                .iter()
                .map(|(n, on)| {
                    format!(
                        "ethtool -K {n} {}",
                        on.iter().map(|f| format!("{f} off")).collect::<Vec<_>>().join(" ")
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            peers: if veth { " (and the same on each veth's peer)" } else { "" },
        }),
        Offloads::Disable => {
            for (name, on) in &found {
                for feature in FEATURES.iter().filter(|f| on.contains(&f.name)) {
                    disable(name, feature).map_err(|e| {
                        OffloadError::Ethtool(format!("turning {} off on {name}", feature.name), e)
                    })?;
                }
                tracing::warn!(interface = %name, "offloads turned off for the {datapath} datapath: {}", on.join(" "));
            }
            if veth {
                tracing::warn!(
                    "a veth's peer still hands over what its own offloads make: turn them off there too \
                     (ethtool -K PEER tx off tso off gso off gro off)"
                );
            }
            Ok(())
        }
    }
}
