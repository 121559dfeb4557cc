//! What moves the packets, and the one interface the control plane (`ctl`,
//! metrics, health checks, reload) drives them through: [`Balancer`].
//!
//! - [`kernel`] (the default): the kernel forwards every byte. `toa-lb`
//!   renders the configuration into one nftables table (DNAT by scheduler,
//!   SNAT to the pool, counters) and attaches a tc-BPF injector to the
//!   client-facing interface, which writes the TOA into the few segments
//!   that carry it, before the kernel's NAT.
//! - [`ring`]: PACKET_MMAP rings and the sans-IO engine in user space, one
//!   worker per CPU; for hosts without BPF. It needs offloads off.
//! - [`pnet`]: one frame per system call; the first version, kept as a fallback.
//!
//! The user-space datapaths share [`frames`] (ARP, NDP, next hops),
//! [`shards`] (an engine per worker), [`fence`] (nftables rules that keep
//! the host's IP stack out of their flows) and [`offload`] (the check that
//! the interfaces hand over whole frames).

pub mod fence;
pub mod frames;
pub mod kernel;
pub mod offload;
pub mod pnet;
pub mod ring;
pub mod shards;
pub mod userspace;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::engine::config::{Backend, ListenerConfig, ObtainClientIp};
use crate::engine::listeners::BackendError;
use crate::engine::{BackendCounters, Counters, ListenerKey};
use crate::file::LbConfig;

/// A running load balancer as the control plane sees it, whatever moves its
/// packets. Listener indexes are in configuration order.
pub trait Balancer: Send + Sync {
    /// The listeners, their backends and every counter, now.
    fn snapshot(&self) -> Snapshot;

    /// Switches a listener's mode for new flows (existing flows keep theirs).
    fn set_mode(&self, listener: usize, mode: ObtainClientIp) -> Result<(), ControlError>;

    /// Adds a backend; it gets new flows at once.
    fn add_backend(&self, listener: usize, backend: Backend) -> Result<(), ControlError>;

    /// Removes a backend: no new flows; its connections go on.
    fn remove_backend(&self, listener: usize, addr: SocketAddr) -> Result<(), ControlError>;

    /// Drains a backend (no new flows) or undrains it.
    fn drain(&self, listener: usize, addr: SocketAddr, drain: bool) -> Result<(), ControlError>;

    /// Marks a backend up or down (health checks); returns whether it changed.
    fn set_backend_up(&self, listener: ListenerKey, addr: SocketAddr, up: bool) -> bool;

    /// Applies a reloaded configuration (already checked for changes that
    /// need a restart): flows that exist keep their backend, SNAT address
    /// and mode. Returns how many flows of removed listeners were dropped, when known.
    fn reconfigure(&self, config: &LbConfig) -> Result<Option<usize>, ControlError>;
}

/// Why the control plane's request was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// A backend change the listener does not allow.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A configuration the engine refuses (e.g. TOA on a UDP listener).
    #[error(transparent)]
    Config(#[from] crate::engine::config::ConfigError),
    /// The datapath could not apply it (nftables, BPF maps, addresses); nothing changed.
    #[error("{0}")]
    Datapath(String),
}

/// What the control plane shows of a running load balancer.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The listeners, in configuration order.
    pub listeners: Vec<ListenerView>,
    /// Per (listener, backend) traffic, including backends since removed.
    pub backends: BTreeMap<(ListenerKey, SocketAddr), BackendCounters>,
    /// Flows now (the user-space tables, or the kernel's connection tracking).
    pub flows: usize,
    /// Frames the datapath itself dropped, by reason.
    pub datapath_drops: Vec<(&'static str, u64)>,
    /// Packets that were not valid IP.
    pub unparsed: u64,
    /// What someone else removed and the datapath put back (`toa-lb run`'s
    /// watch), by what: `table` (the nftables table, or the user-space
    /// datapaths' fence), and on the kernel datapath `address` (a VIP or SNAT
    /// address), `forwarding` (an interface's forwarding sysctl), `programs`
    /// (the injector's, attached again).
    pub put_back: Vec<(&'static str, u64)>,
}

/// One listener in a [`Snapshot`].
#[derive(Clone, Debug)]
pub struct ListenerView {
    /// Its configuration, with its current mode and backends.
    pub config: ListenerConfig,
    /// Its counters.
    pub counters: Counters,
    /// Flows now, when the datapath counts them per listener.
    pub flows: Option<usize>,
    /// Its backends, in order.
    pub backends: Vec<BackendView>,
}

/// One backend in a [`Snapshot`].
#[derive(Clone, Copy, Debug)]
pub struct BackendView {
    /// Address and weight.
    pub backend: Backend,
    /// Whether health checks say it is up.
    pub up: bool,
    /// Whether it is draining.
    pub draining: bool,
}

impl ListenerView {
    /// The view of `listener` with `counters`.
    pub(crate) fn of(listener: &crate::engine::listeners::Listener, counters: Counters) -> Self {
        ListenerView {
            config: listener.config.clone(),
            counters,
            flows: None,
            backends: listener
                .config
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| BackendView {
                    backend: *b,
                    up: listener.up(i) != Some(false),
                    draining: listener.draining(b.addr),
                })
                .collect(),
        }
    }
}

/// The periodic watch's failures, said once a minute each: it looks twice a
/// second, and a failure that lasts (nftables broken, an address refused)
/// would otherwise fill the log with the same line.
#[derive(Debug, Default)]
pub(crate) struct Complaints(HashMap<String, Instant>);

impl Complaints {
    /// How often the same complaint is said.
    const EVERY: Duration = Duration::from_secs(60);

    /// Logs `message` as an error, unless it was said in the last minute.
    pub(crate) fn error(&mut self, message: String) {
        if self.fresh_at(&message, Instant::now()) {
            tracing::error!("{message}");
        }
    }

    /// Logs `message` as a warning, unless it was said in the last minute.
    pub(crate) fn warn(&mut self, message: String) {
        if self.fresh_at(&message, Instant::now()) {
            tracing::warn!("{message}");
        }
    }

    fn fresh_at(&mut self, message: &str, now: Instant) -> bool {
        if self.0.get(message).is_some_and(|at| now.saturating_duration_since(*at) < Self::EVERY) {
            return false;
        }
        // Messages that vary (an errno, an address) must not pile up.
        if self.0.len() >= 64 {
            self.0.retain(|_, at| now.saturating_duration_since(*at) < Self::EVERY);
        }
        self.0.insert(message.to_owned(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_complaint_is_said_once_a_minute() {
        let mut c = Complaints::default();
        let t0 = Instant::now();
        assert!(c.fresh_at("nft: broken", t0));
        assert!(!c.fresh_at("nft: broken", t0 + Duration::from_millis(500)));
        assert!(c.fresh_at("another", t0 + Duration::from_millis(500)));
        assert!(!c.fresh_at("nft: broken", t0 + Duration::from_secs(59)));
        assert!(c.fresh_at("nft: broken", t0 + Duration::from_secs(61)));
        // Bounded: old ones go when many differ.
        for i in 0..200 {
            assert!(c.fresh_at(&format!("errno {i}"), t0 + Duration::from_secs(200 + i)));
        }
        assert!(c.0.len() <= 64, "{}", c.0.len());
    }
}
