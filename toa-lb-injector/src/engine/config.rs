//! What the engine is told: listeners, backends, SNAT pool, limits.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use toa_core::Format;
use toa_core::uoa::UoaFormat;

/// How a listener passes the client's address to its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObtainClientIp {
    /// Nothing: backends see the SNAT address.
    Off,
    /// A TOA option of this format. An IPv6 client is sent as `toa6`
    /// whatever the format, since the others carry IPv4 only.
    Toa(Format),
    /// DNAT only: the client's own address stays the source, as dedicated
    /// ELBs pass it. The backends must route replies through the LB.
    Transparent,
    /// UDP: a UOA (DPVS's format) in the first `datagrams` datagrams of each
    /// flow, as an IPv4 option (`ipo`) or a protocol-248 header (`opp`; IPv6
    /// packets always use it). SNAT as `Off`.
    Uoa {
        /// `ipo` or `opp`.
        format: UoaFormat,
        /// How many datagrams of a flow carry it (DPVS: 3).
        datagrams: u8,
    },
}

impl ObtainClientIp {
    /// Whether this mode fits a listener of `protocol`: TOA is a TCP option,
    /// UOA a UDP one.
    pub fn fits(self, protocol: Protocol) -> bool {
        match self {
            ObtainClientIp::Toa(_) => protocol == Protocol::Tcp,
            ObtainClientIp::Uoa { .. } => protocol == Protocol::Udp,
            ObtainClientIp::Off | ObtainClientIp::Transparent => true,
        }
    }
}

/// Which client segments carry the TOA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The SYN (for saved-SYN readers such as `toa_server_shim::ToaListener`).
    pub syn: bool,
    /// The ACK that completes the handshake (for toa.ko and LVS-style readers).
    pub handshake_ack: bool,
    /// Client data segments until the backend first sends data (DPVS style).
    pub data: bool,
}

impl Default for Placement {
    /// SYN and handshake ACK.
    fn default() -> Self {
        Placement { syn: true, handshake_ack: true, data: false }
    }
}

/// Whether the MSS of a backend's SYN-ACK is lowered by the option's size
/// (8 bytes, 20 for an IPv6 client), so that the client's segments leave room
/// for the TOA the LB adds to them.
///
/// Only data segments need that room: the SYN and the handshake's pure ACK
/// carry no data, save a TCP Fast Open SYN, which goes without the option
/// (counted `no_room`) when the option would push it past the MTU. Lowering
/// the MSS costs every client segment those bytes for the whole connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MssClamp {
    /// When the listener places the TOA in data ([`Placement::data`]).
    #[default]
    Auto,
    /// Always, in TOA mode.
    On,
    /// Never: a data segment the option would push past the MTU goes without it.
    Off,
}

impl MssClamp {
    /// Every value.
    pub const ALL: [MssClamp; 3] = [MssClamp::Auto, MssClamp::On, MssClamp::Off];

    /// The value as a configuration file writes it.
    pub fn name(self) -> &'static str {
        match self {
            MssClamp::Auto => "auto",
            MssClamp::On => "on",
            MssClamp::Off => "off",
        }
    }

    /// Whether a listener with this setting and `placement` lowers the MSS.
    pub fn applies(self, placement: Placement) -> bool {
        match self {
            MssClamp::Auto => placement.data,
            MssClamp::On => true,
            MssClamp::Off => false,
        }
    }
}

impl std::str::FromStr for MssClamp {
    type Err = UnknownMssClamp;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| UnknownMssClamp(s.to_owned()))
    }
}

impl std::fmt::Display for MssClamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An `mss_clamp` value that names none of [`MssClamp::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("mss_clamp must be auto, on or off, not {0:?}")]
pub struct UnknownMssClamp(pub String);

/// How a listener picks a backend for a new flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scheduler {
    /// Each backend in turn.
    #[default]
    RoundRobin,
    /// In turn, in proportion to the weights (smooth, as nginx does).
    WeightedRoundRobin,
    /// By a hash of the client's address and port (rendezvous hashing): a
    /// client keeps its backend while the backend set stays the same, and
    /// removing a backend moves only that backend's clients.
    ConsistentHash,
}

/// The transport protocol of a listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP: flows follow the handshake; TOA can be written.
    #[default]
    Tcp,
    /// UDP: a flow per client address and port, kept while datagrams pass
    /// (`Timeouts::udp`); `ObtainClientIp::Off`, `Transparent` or `Uoa`.
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A backend server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Its address and port.
    pub addr: SocketAddr,
    /// Its weight (weighted round robin), at least 1.
    pub weight: u32,
}

/// One listener: a VIP and port, and where its connections go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    /// The address and port clients connect to.
    pub vip: SocketAddr,
    /// TCP or UDP; a TCP and a UDP listener may share a VIP and port.
    pub protocol: Protocol,
    /// The backends.
    pub backends: Vec<Backend>,
    /// How a backend is picked.
    pub scheduler: Scheduler,
    /// Whether and how the client's address is passed on.
    pub obtain_client_ip: ObtainClientIp,
    /// Which segments carry it.
    pub placement: Placement,
    /// Whether the backends' SYN-ACKs leave room for it.
    pub mss_clamp: MssClamp,
}

/// Idle timeouts per flow state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Until the handshake completes.
    pub syn: Duration,
    /// Established.
    pub established: Duration,
    /// After a FIN.
    pub closing: Duration,
    /// A UDP flow without datagrams either way.
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            syn: Duration::from_secs(5),
            established: Duration::from_secs(900),
            closing: Duration::from_secs(10),
            udp: Duration::from_secs(60),
        }
    }
}

/// The engine's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// The listeners.
    pub listeners: Vec<ListenerConfig>,
    /// The addresses the LB talks to backends from (FULLNAT), e.g. inside 100.125.0.0/16.
    pub snat: Vec<IpAddr>,
    /// The SNAT ports used on each address.
    pub snat_ports: std::ops::RangeInclusive<u16>,
    /// The most flows kept at once, over all shards (each engine holds its
    /// share); a SYN flood evicts the oldest half-open flows.
    pub max_flows: usize,
    /// Idle timeouts.
    pub timeouts: Timeouts,
    /// Where SNAT port allocation starts. A driver passes something random
    /// (the time, say): an LB restarted with the same SNAT ports would collide
    /// with the TIME_WAIT state its previous run left on the backends.
    pub snat_seed: u64,
    /// Which share of the SNAT ports this engine allocates, when a datapath
    /// runs one engine per worker (see [`Shard`]).
    pub shard: Shard,
    /// The largest IP packet sent to backends (the backend interface's MTU):
    /// a datagram a UOA would push past it goes without one, counted.
    pub mtu: usize,
}

/// One engine's share of the SNAT ports: those whose [`Shard::steer`] value
/// is `index` modulo `count`.
///
/// A datapath with several workers gives each its own engine (nothing shared
/// on the hot path) and steers a backend's reply to worker `steer(dst_port) %
/// count`, which is then the engine that owns the flow. The ports are mixed
/// first (not `port % count`): Linux hosts `connect()` from even ports only,
/// which would leave every odd worker idle when `count` is even.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This engine's share.
    pub index: u16,
    /// How many engines share the ports.
    pub count: u16,
}

impl Shard {
    /// The multiplier of [`Shard::steer`]: 2^32 / the golden ratio.
    pub const STEER_MULTIPLIER: u32 = 0x9e37_79b1;

    /// The steering value of a port: the high half of `port *
    /// STEER_MULTIPLIER` (32-bit). A datapath computes the same (a classic
    /// BPF program can: a multiply and a shift) and takes it modulo `count`.
    pub fn steer(port: u16) -> u32 {
        u32::from(port).wrapping_mul(Self::STEER_MULTIPLIER) >> 16
    }

    /// Whether this share holds `port`.
    pub fn owns(&self, port: u16) -> bool {
        Self::steer(port) % u32::from(self.count.max(1)) == u32::from(self.index)
    }
}

impl Default for Shard {
    /// The whole range.
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

/// A configuration the engine refuses, said so that it can be fixed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A listener without backends.
    #[error("listener {0} has no backends")]
    NoBackends(SocketAddr),
    /// Two listeners on the same VIP, port and protocol.
    #[error("listeners overlap: {0} is configured twice")]
    Overlap(SocketAddr),
    /// TOA asked of a UDP listener, or UOA of a TCP one.
    #[error("listener {0}: obtain_client_ip does not fit its protocol (toa is for TCP, uoa for UDP)")]
    ToaOnUdp(SocketAddr),
    /// A backend of weight 0.
    #[error("backend {backend} of listener {listener} has weight 0 (use at least 1, or remove it)")]
    ZeroWeight {
        /// The listener.
        listener: SocketAddr,
        /// The backend.
        backend: SocketAddr,
    },
    /// No SNAT address of a family a backend needs.
    #[error("listener {listener} has an {family} backend but the SNAT pool has no {family} address")]
    NoSnatAddress {
        /// The listener.
        listener: SocketAddr,
        /// "IPv4" or "IPv6".
        family: &'static str,
    },
    /// A backend of the other IP version than its VIP (NAT64 is not supported yet).
    #[error("backend {backend} of listener {listener} is of another IP version (NAT64 is not supported)")]
    MixedFamilies {
        /// The listener.
        listener: SocketAddr,
        /// The backend.
        backend: SocketAddr,
    },
    /// An empty SNAT port range or a zero flow limit.
    #[error("{0}")]
    Limits(&'static str),
}

impl EngineConfig {
    /// The flows this engine may hold: its share of `max_flows` (the shares
    /// add up to `max_flows` exactly).
    pub(crate) fn engine_bound(&self) -> usize {
        let (index, count) = (usize::from(self.shard.index), usize::from(self.shard.count.max(1)));
        self.max_flows / count + usize::from(index < self.max_flows % count)
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_flows == 0 {
            return Err(ConfigError::Limits("max_flows must be at least 1"));
        }
        if self.snat_ports.is_empty() {
            return Err(ConfigError::Limits("the SNAT port range is empty"));
        }
        let Shard { index, count } = self.shard;
        let shard = self.shard;
        if count == 0 || index >= count || !self.snat_ports.clone().any(|p| shard.owns(p)) {
            return Err(ConfigError::Limits(
                "the shard owns no SNAT port (index < count, and a wide enough range)",
            ));
        }
        if self.max_flows < usize::from(count) {
            return Err(ConfigError::Limits("max_flows must be at least the number of workers"));
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            let same =
                |other: &ListenerConfig| other.vip == listener.vip && other.protocol == listener.protocol;
            if self.listeners[..i].iter().any(same) {
                return Err(ConfigError::Overlap(listener.vip));
            }
            if !listener.obtain_client_ip.fits(listener.protocol) {
                return Err(ConfigError::ToaOnUdp(listener.vip));
            }
            if listener.backends.is_empty() {
                return Err(ConfigError::NoBackends(listener.vip));
            }
            for backend in &listener.backends {
                if backend.weight == 0 {
                    return Err(ConfigError::ZeroWeight { listener: listener.vip, backend: backend.addr });
                }
                if backend.addr.is_ipv4() != listener.vip.is_ipv4() {
                    return Err(ConfigError::MixedFamilies { listener: listener.vip, backend: backend.addr });
                }
                if !self.snat.iter().any(|a| a.is_ipv4() == backend.addr.is_ipv4()) {
                    let family = if backend.addr.is_ipv4() { "IPv4" } else { "IPv6" };
                    return Err(ConfigError::NoSnatAddress { listener: listener.vip, family });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steering_spreads_even_ports() {
        // Linux connects from even ports: they must reach every worker anyway.
        for count in [2u16, 3, 4, 8] {
            let mut per = vec![0u32; usize::from(count)];
            for port in (1024..=65534u16).step_by(2) {
                per[(Shard::steer(port) % u32::from(count)) as usize] += 1;
            }
            let expected = 32256 / u32::from(count);
            assert!(per.iter().all(|n| n.abs_diff(expected) * 20 < expected), "{count} workers: {per:?}");
        }
        let shards: Vec<Shard> = (0..3).map(|index| Shard { index, count: 3 }).collect();
        for port in [0, 1, 1024, 40000, 65535] {
            assert_eq!(shards.iter().filter(|s| s.owns(port)).count(), 1, "port {port}");
        }
    }

    #[test]
    fn shard_bounds_add_up_to_max_flows() {
        for (max, count) in [(500, 3), (500, 1), (7, 7), (100_000, 64)] {
            let total: usize = (0..count)
                .map(|index| {
                    let config = EngineConfig {
                        listeners: Vec::new(),
                        snat: Vec::new(),
                        snat_ports: 1024..=65535,
                        max_flows: max,
                        timeouts: Timeouts::default(),
                        snat_seed: 0,
                        shard: Shard { index, count },
                        mtu: 1500,
                    };
                    config.engine_bound()
                })
                .sum();
            assert_eq!(total, max, "{count} shards of {max}");
        }
    }

    #[test]
    fn mss_clamp_follows_data_placement_unless_set() {
        let (plain, data) = (Placement::default(), Placement { data: true, ..Placement::default() });
        assert!(!MssClamp::Auto.applies(plain) && MssClamp::Auto.applies(data));
        assert!(MssClamp::On.applies(plain) && MssClamp::On.applies(data));
        assert!(!MssClamp::Off.applies(plain) && !MssClamp::Off.applies(data));
        for (clamp, name) in MssClamp::ALL.into_iter().zip(["auto", "on", "off"]) {
            assert_eq!((name.parse::<MssClamp>().unwrap(), clamp.to_string().as_str()), (clamp, name));
        }
        assert_eq!(MssClamp::default(), MssClamp::Auto);
        let err = "yes".parse::<MssClamp>().unwrap_err().to_string();
        assert!(err.contains("auto, on or off") && err.contains("\"yes\""), "{err}");
    }
}
