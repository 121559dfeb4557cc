//! `toa-lb run --config FILE`: the TOML configuration.
//!
//! ```toml
//! client_interface = "toa-c"       # faces clients; VIPs are answered here
//! backend_interface = "toa-b"      # faces backends; SNAT addresses are answered here
//! snat = ["100.125.1.1"]           # default: 100.125.1.1
//! max_flows = 100000
//! metrics = "127.0.0.1:9947"      # Prometheus text at /metrics (loopback only)
//! health = { interval_ms = 2000, timeout_ms = 1000, rise = 2, fall = 3 }   # the defaults; enabled = false turns it off
//! timeouts = { syn_s = 5, established_s = 900, closing_s = 10, udp_s = 60 }  # idle timeouts (the defaults)
//! datapath = "kernel"              # nftables + tc-BPF injector (default); "ring" or "pnet": user space
//! transparent_mark = 0x20000000    # kernel: the skb mark bit of transparent flows
//! workers = 2                      # ring datapath workers; default one per CPU
//! busy_poll_us = 50                # an idle ring worker spins this long before it sleeps
//! offloads = "refuse"              # ring/pnet with offloads on: refuse to start, or "disable" them
//!
//! [[listener]]
//! vip = "203.0.113.10:80"
//! protocol = "tcp"                 # or "udp" (obtain_client_ip off or transparent)
//! scheduler = "round-robin"        # or weighted-round-robin, consistent-hash
//! obtain_client_ip = "toa"         # or "off", or "transparent" (DNAT only; backends route via the LB)
//! toa_format = "toa"               # toa, toa6, ali-v6, tencent
//! placement = { syn = true, ack = true, data = false }
//! mss_clamp = "auto"               # lower the backends' SYN-ACK MSS for the option: auto (with data placement), on, off
//!
//! [[listener.backend]]
//! address = "100.125.2.1:8080"
//! weight = 1
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::Deserialize;
use toa_core::Format;

use crate::engine::config::{
    Backend, EngineConfig, ListenerConfig, MssClamp, ObtainClientIp, Placement, Protocol, Scheduler, Shard,
    Timeouts,
};

/// A configuration file that cannot be used, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Unreadable.
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    /// Not valid TOML, or not this schema (the message names the line).
    #[error("{0}: {1}")]
    Parse(String, String),
    /// Valid TOML, invalid configuration.
    #[error("{0}: {1}")]
    Invalid(String, String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    client_interface: String,
    backend_interface: String,
    #[serde(default = "default_snat")]
    snat: Vec<IpAddr>,
    #[serde(default = "default_max_flows")]
    max_flows: usize,
    #[serde(default)]
    metrics: Option<SocketAddr>,
    #[serde(default)]
    health: Option<RawHealth>,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    datapath: Datapath,
    #[serde(default)]
    workers: Option<usize>,
    #[serde(default = "default_busy_poll")]
    busy_poll_us: u64,
    #[serde(default)]
    offloads: Offloads,
    #[serde(default = "default_transparent_mark")]
    transparent_mark: u32,
    #[serde(default = "default_mtu")]
    mtu: usize,
    #[serde(rename = "listener", default)]
    listeners: Vec<RawListener>,
}

/// What moves the packets (see [`crate::datapath`]).
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Datapath {
    /// The kernel forwards (nftables DNAT/SNAT); a tc-BPF injector writes
    /// the TOA. Offloads stay on.
    #[default]
    Kernel,
    /// PACKET_MMAP (TPACKET_V2) rings in user space, one worker per CPU,
    /// frames steered to workers by port (see [`crate::datapath::ring`]);
    /// for hosts without BPF. Needs offloads off.
    Ring,
    /// One frame per system call with pnet, two threads: the first version.
    Pnet,
}

/// What a user-space datapath does when its interfaces have offloads on
/// (it needs whole frames with finished checksums).
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Offloads {
    /// Refuse to start, naming the `ethtool -K` command.
    #[default]
    Refuse,
    /// Turn them off, and say so.
    Disable,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    syn_s: Option<u64>,
    established_s: Option<u64>,
    closing_s: Option<u64>,
    udp_s: Option<u64>,
}

fn default_snat() -> Vec<IpAddr> {
    vec![IpAddr::from([100, 125, 1, 1])]
}

fn default_busy_poll() -> u64 {
    50
}

fn default_transparent_mark() -> u32 {
    0x2000_0000
}

fn default_mtu() -> usize {
    1500
}

fn default_uoa_format() -> String {
    "opp".into()
}

fn default_uoa_datagrams() -> u8 {
    3
}

fn default_max_flows() -> usize {
    100_000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default = "yes")]
    enabled: bool,
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
    rise: Option<u32>,
    fall: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    vip: SocketAddr,
    #[serde(default = "default_protocol")]
    protocol: String,
    #[serde(default)]
    scheduler: RawScheduler,
    #[serde(default)]
    obtain_client_ip: RawObtain,
    #[serde(default = "default_format")]
    toa_format: String,
    #[serde(default = "default_uoa_format")]
    uoa_format: String,
    #[serde(default = "default_uoa_datagrams")]
    uoa_datagrams: u8,
    #[serde(default)]
    placement: RawPlacement,
    #[serde(default = "default_mss_clamp")]
    mss_clamp: String,
    #[serde(rename = "backend", default)]
    backends: Vec<RawBackend>,
}

fn default_protocol() -> String {
    "tcp".into()
}

fn default_format() -> String {
    "toa".into()
}

fn default_mss_clamp() -> String {
    MssClamp::default().to_string()
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum RawScheduler {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    ConsistentHash,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum RawObtain {
    #[default]
    Off,
    Toa,
    Transparent,
    Uoa,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlacement {
    #[serde(default = "yes")]
    syn: bool,
    #[serde(default = "yes")]
    ack: bool,
    #[serde(default)]
    data: bool,
}

fn yes() -> bool {
    true
}

impl Default for RawPlacement {
    fn default() -> Self {
        RawPlacement { syn: true, ack: true, data: false }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: SocketAddr,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

/// A parsed and checked configuration file.
#[derive(Clone, Debug)]
pub struct LbConfig {
    /// The interface facing clients.
    pub client_interface: String,
    /// The interface facing backends.
    pub backend_interface: String,
    /// The engine's configuration.
    pub engine: EngineConfig,
    /// Where to serve Prometheus metrics (a local address, e.g. 127.0.0.1:9947).
    pub metrics: Option<SocketAddr>,
    /// Health checks (on by default).
    pub health: Option<crate::control::health::HealthCheck>,
    /// What moves the packets.
    pub datapath: Datapath,
    /// Ring datapath workers (each with its own engine).
    pub workers: usize,
    /// How long an idle ring worker spins before it sleeps in `poll`.
    pub busy_poll: std::time::Duration,
    /// What the user-space datapaths do about offloads.
    pub offloads: Offloads,
    /// The kernel datapath's skb mark bit for transparent flows (their SNAT is skipped).
    pub transparent_mark: u32,
}

impl LbConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<LbConfig, FileError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| FileError::Read(name.clone(), e))?;
        Self::parse(&name, &text)
    }

    /// Parses and checks `text` (`name` is used in errors).
    pub fn parse(name: &str, text: &str) -> Result<LbConfig, FileError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            // "TOML parse error at line L, column C" and the message, without the source excerpt.
            let text = e.to_string();
            let mut lines = text.lines().filter(|l| !l.trim().is_empty());
            let (first, last) = (lines.next().unwrap_or_default(), text.lines().last().unwrap_or_default());
            FileError::Parse(name.to_owned(), format!("{}: {}", first.to_lowercase(), last.trim()))
        })?;
        let invalid = |msg: String| FileError::Invalid(name.to_owned(), msg);
        if raw.listeners.is_empty() {
            return Err(invalid("no [[listener]]: nothing to balance".into()));
        }
        let mut listeners = Vec::new();
        for l in raw.listeners {
            let protocol = match l.protocol.as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                other => {
                    return Err(invalid(format!("listener {}: protocol {other:?} is not tcp or udp", l.vip)));
                }
            };
            let format: Format = l
                .toa_format
                .parse()
                .map_err(|_| invalid(format!("listener {}: unknown toa_format {:?}", l.vip, l.toa_format)))?;
            if format == Format::AliCdn {
                return Err(invalid(format!("listener {}: ali-cdn is a CDN format, not an LB one", l.vip)));
            }
            listeners.push(ListenerConfig {
                vip: l.vip,
                protocol,
                backends: l.backends.iter().map(|b| Backend { addr: b.address, weight: b.weight }).collect(),
                scheduler: match l.scheduler {
                    RawScheduler::RoundRobin => Scheduler::RoundRobin,
                    RawScheduler::WeightedRoundRobin => Scheduler::WeightedRoundRobin,
                    RawScheduler::ConsistentHash => Scheduler::ConsistentHash,
                },
                obtain_client_ip: match l.obtain_client_ip {
                    RawObtain::Off => ObtainClientIp::Off,
                    RawObtain::Toa => ObtainClientIp::Toa(format),
                    RawObtain::Transparent => ObtainClientIp::Transparent,
                    RawObtain::Uoa => {
                        let format = l.uoa_format.parse().map_err(|_| {
                            invalid(format!(
                                "listener {}: uoa_format must be opp or ipo, not {:?}",
                                l.vip, l.uoa_format
                            ))
                        })?;
                        if l.uoa_datagrams == 0 {
                            return Err(invalid(format!(
                                "listener {}: uoa_datagrams must be at least 1",
                                l.vip
                            )));
                        }
                        ObtainClientIp::Uoa { format, datagrams: l.uoa_datagrams }
                    }
                },
                placement: Placement {
                    syn: l.placement.syn,
                    handshake_ack: l.placement.ack,
                    data: l.placement.data,
                },
                mss_clamp: l.mss_clamp.parse().map_err(|e| invalid(format!("listener {}: {e}", l.vip)))?,
            });
        }
        let t = Timeouts::default();
        let secs = |v: Option<u64>, d: std::time::Duration| v.map_or(d, std::time::Duration::from_secs);
        let timeouts = Timeouts {
            syn: secs(raw.timeouts.syn_s, t.syn),
            established: secs(raw.timeouts.established_s, t.established),
            closing: secs(raw.timeouts.closing_s, t.closing),
            udp: secs(raw.timeouts.udp_s, t.udp),
        };
        if [timeouts.syn, timeouts.established, timeouts.closing, timeouts.udp].iter().any(|d| d.is_zero()) {
            return Err(invalid("timeouts must be at least 1 s".into()));
        }
        let workers = match raw.workers {
            Some(0) => return Err(invalid("workers must be at least 1".into())),
            Some(n) if n > 64 => return Err(invalid("workers must be at most 64".into())),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get().min(64)),
        };
        if !(576..=65535).contains(&raw.mtu) {
            return Err(invalid(format!("mtu {} must be between 576 and 65535", raw.mtu)));
        }
        let engine = EngineConfig {
            listeners,
            snat: raw.snat,
            snat_ports: 1024..=65535,
            max_flows: raw.max_flows,
            timeouts,
            // Set by the driver at start (see EngineConfig::snat_seed).
            snat_seed: 0,
            // Set by the driver per worker.
            shard: Shard::default(),
            mtu: raw.mtu,
        };
        engine.validate().map_err(|e| invalid(e.to_string()))?;
        if raw.client_interface == raw.backend_interface {
            return Err(invalid("client_interface and backend_interface must differ".into()));
        }
        if raw.transparent_mark.count_ones() != 1 {
            return Err(invalid(format!(
                "transparent_mark {:#x} must be a single bit (e.g. 0x20000000), one no other rule on this host uses",
                raw.transparent_mark
            )));
        }
        let injectors =
            crate::datapath::kernel::ruleset::GATE_MARK | crate::datapath::kernel::injector::UOA_MARKS;
        if raw.transparent_mark & injectors != 0 {
            return Err(invalid(format!(
                "transparent_mark {:#x} is one of the injector's own mark bits ({injectors:#x}): choose another (e.g. 0x20000000)",
                raw.transparent_mark
            )));
        }
        if raw.metrics.is_some_and(|m| !m.ip().is_loopback()) {
            return Err(invalid("metrics must listen on a loopback address (e.g. 127.0.0.1:9947)".into()));
        }
        let defaults = crate::control::health::HealthCheck::default();
        let health = match raw.health {
            Some(h) if !h.enabled => None,
            h => {
                let h = h.unwrap_or(RawHealth {
                    enabled: true,
                    interval_ms: None,
                    timeout_ms: None,
                    rise: None,
                    fall: None,
                });
                let check = crate::control::health::HealthCheck {
                    interval: h
                        .interval_ms
                        .map(std::time::Duration::from_millis)
                        .unwrap_or(defaults.interval),
                    timeout: h.timeout_ms.map(std::time::Duration::from_millis).unwrap_or(defaults.timeout),
                    rise: h.rise.unwrap_or(defaults.rise),
                    fall: h.fall.unwrap_or(defaults.fall),
                };
                if check.rise == 0 || check.fall == 0 || check.interval.is_zero() || check.timeout.is_zero() {
                    return Err(invalid(
                        "health: interval_ms, timeout_ms, rise and fall must be at least 1".into(),
                    ));
                }
                Some(check)
            }
        };
        Ok(LbConfig {
            client_interface: raw.client_interface,
            backend_interface: raw.backend_interface,
            engine,
            metrics: raw.metrics,
            health,
            datapath: raw.datapath,
            workers,
            busy_poll: std::time::Duration::from_micros(raw.busy_poll_us),
            offloads: raw.offloads,
            transparent_mark: raw.transparent_mark,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_example_is_valid() {
        // deploy/debian/lb.toml is installed as /etc/toa-lb/lb.toml.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/debian/lb.toml");
        let config = LbConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.engine.listeners.len(), 1);
    }

    const GOOD: &str = r#"
client_interface = "toa-c"
backend_interface = "toa-b"

[[listener]]
vip = "203.0.113.10:80"
obtain_client_ip = "toa"

[[listener.backend]]
address = "100.125.2.1:8080"

[[listener.backend]]
address = "100.125.2.2:8080"
weight = 3
"#;

    #[test]
    fn parses_with_defaults() {
        let c = LbConfig::parse("lb.toml", GOOD).unwrap();
        assert_eq!(c.engine.snat, vec![IpAddr::from([100, 125, 1, 1])]);
        let l = &c.engine.listeners[0];
        assert_eq!(l.obtain_client_ip, ObtainClientIp::Toa(Format::Toa));
        assert_eq!(l.placement, Placement::default());
        assert_eq!(l.mss_clamp, MssClamp::Auto);
        assert_eq!(l.backends[1].weight, 3);
    }

    #[test]
    fn transparent_mark_is_a_bit_of_its_own() {
        let with =
            |mark: &str| GOOD.replace("[[listener]]", &format!("transparent_mark = {mark}\n[[listener]]"));
        assert_eq!(LbConfig::parse("lb.toml", &with("0x08000000")).unwrap().transparent_mark, 0x0800_0000);
        let two = LbConfig::parse("lb.toml", &with("0x30000000")).unwrap_err().to_string();
        assert!(two.contains("must be a single bit"), "{two}");
        for taken in ["0x10000000", "0x40000000", "0x00000001"] {
            let err = LbConfig::parse("lb.toml", &with(taken)).unwrap_err().to_string();
            assert!(err.contains("one of the injector's own mark bits"), "{taken}: {err}");
        }
    }

    #[test]
    fn mss_clamp_is_read_and_checked() {
        let on =
            GOOD.replace("obtain_client_ip = \"toa\"\n", "obtain_client_ip = \"toa\"\nmss_clamp = \"on\"\n");
        assert_eq!(LbConfig::parse("lb.toml", &on).unwrap().engine.listeners[0].mss_clamp, MssClamp::On);
        let bad = on.replace("\"on\"", "\"always\"");
        let err = LbConfig::parse("lb.toml", &bad).unwrap_err().to_string();
        assert!(err.contains("listener 203.0.113.10:80: mss_clamp must be auto, on or off"), "{err}");
    }

    #[test]
    fn errors_name_the_line_or_the_listener() {
        let typo = GOOD.replace("obtain_client_ip = \"toa\"", "obtain_client_ip = \"yes\"");
        let err = LbConfig::parse("lb.toml", &typo).unwrap_err().to_string();
        assert!(err.starts_with("lb.toml: ") && err.contains("line 7"), "{err}");
        let unknown = GOOD.replace("weight = 3", "wieght = 3");
        let err = LbConfig::parse("lb.toml", &unknown).unwrap_err().to_string();
        assert!(err.contains("wieght") && err.contains("line 14"), "{err}");
        let empty = GOOD.split("[[listener.backend]]").next().unwrap().to_owned();
        let err = LbConfig::parse("lb.toml", &empty).unwrap_err().to_string();
        assert_eq!(err, "lb.toml: listener 203.0.113.10:80 has no backends");
        let twice = format!(
            "{GOOD}\n[[listener]]\nvip = \"203.0.113.10:80\"\n[[listener.backend]]\naddress = \"100.125.2.1:1\"\n"
        );
        let err = LbConfig::parse("lb.toml", &twice).unwrap_err().to_string();
        assert!(err.contains("configured twice"), "{err}");
    }

    #[test]
    fn udp_listeners_timeouts_and_the_datapath() {
        let udp = format!(
            "datapath = \"pnet\"\nworkers = 3\nbusy_poll_us = 0\ntimeouts = {{ udp_s = 30 }}\n{GOOD}\n[[listener]]\nvip = \"203.0.113.10:80\"\nprotocol = \"udp\"\nobtain_client_ip = \"transparent\"\n[[listener.backend]]\naddress = \"100.125.2.1:53\"\n"
        );
        let c = LbConfig::parse("lb.toml", &udp).unwrap();
        assert_eq!((c.datapath, c.workers, c.busy_poll), (Datapath::Pnet, 3, std::time::Duration::ZERO));
        assert_eq!(c.engine.timeouts.udp, std::time::Duration::from_secs(30));
        assert_eq!(c.engine.timeouts.syn, Timeouts::default().syn);
        let l = &c.engine.listeners[1];
        assert_eq!((l.protocol, l.obtain_client_ip), (Protocol::Udp, ObtainClientIp::Transparent));
        let toa = udp.replace("obtain_client_ip = \"transparent\"", "obtain_client_ip = \"toa\"");
        let err = LbConfig::parse("lb.toml", &toa).unwrap_err().to_string();
        assert!(err.contains("203.0.113.10:80") && err.contains("toa is for TCP, uoa for UDP"), "{err}");
        let uoa = udp.replace(
            "obtain_client_ip = \"transparent\"",
            "obtain_client_ip = \"uoa\"\nuoa_format = \"ipo\"\nuoa_datagrams = 2",
        );
        let l = LbConfig::parse("lb.toml", &uoa).unwrap().engine.listeners[1].clone();
        assert_eq!(
            l.obtain_client_ip,
            ObtainClientIp::Uoa { format: toa_core::uoa::UoaFormat::Ipo, datagrams: 2 }
        );
        let bad = uoa.replace("uoa_format = \"ipo\"", "uoa_format = \"gre\"");
        assert!(
            LbConfig::parse("lb.toml", &bad)
                .unwrap_err()
                .to_string()
                .contains("uoa_format must be opp or ipo")
        );
        let on_tcp = GOOD.replace("obtain_client_ip = \"toa\"", "obtain_client_ip = \"uoa\"");
        if on_tcp != GOOD {
            assert!(LbConfig::parse("lb.toml", &on_tcp).is_err(), "uoa on a TCP listener");
        }
        let mtu = format!("mtu = 100\n{udp}");
        assert!(LbConfig::parse("lb.toml", &mtu).unwrap_err().to_string().contains("mtu 100"));
        let sctp = udp.replace("protocol = \"udp\"", "protocol = \"sctp\"");
        let err = LbConfig::parse("lb.toml", &sctp).unwrap_err().to_string();
        assert!(err.contains("protocol \"sctp\" is not tcp or udp"), "{err}");
        let zero = udp.replace("workers = 3", "workers = 0");
        assert!(
            LbConfig::parse("lb.toml", &zero).unwrap_err().to_string().contains("workers must be at least 1")
        );
    }
}
