//! Several engines, one per datapath worker, seen as one by the control
//! plane (`toa-lb ctl`, metrics, health checks, reload).
//!
//! Each worker locks only its own engine, so the hot path shares nothing; a
//! control request locks them all (in order, so two requests cannot
//! deadlock), reads the first for the configuration, sums the counters, and
//! applies a change to every engine.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::engine::config::{ConfigError, EngineConfig, Shard};
use crate::engine::listeners::Listeners;
use crate::engine::{BackendCounters, Counters, Engine, ListenerKey};

/// The engines of one `toa-lb`, and the datapath's own counters.
#[derive(Debug)]
pub struct Shards {
    engines: Vec<Mutex<Engine>>,
    /// Frames the datapath dropped before or after the engines.
    pub datapath: DatapathCounters,
}

/// Frames a driver dropped on its own (the engines count the rest). Workers
/// add to these only when they drop something: no sharing on the hot path.
#[derive(Debug, Default)]
pub struct DatapathCounters {
    /// Received frames longer than a ring slot (GSO/GRO super-packets: offloads on).
    pub truncated: AtomicU64,
    /// Received frames with a VLAN tag (not handled).
    pub vlan: AtomicU64,
    /// Frames the kernel would not take for sending (device queue full).
    pub tx_dropped: AtomicU64,
}

impl Shards {
    /// `count` engines for `config`, engine `i` owning the SNAT ports with
    /// `port % count == i` (see [`Shard`]).
    pub fn new(config: &EngineConfig, count: usize) -> Result<Self, ConfigError> {
        let count = u16::try_from(count).map_err(|_| ConfigError::Limits("too many workers"))?;
        if count == 0 {
            return Err(ConfigError::Limits("at least one engine is needed"));
        }
        let engines = (0..count)
            .map(|index| {
                let mut config = config.clone();
                config.shard = Shard { index, count };
                // Different starting points, so the engines do not walk the ports in step.
                config.snat_seed = config.snat_seed.wrapping_add(u64::from(index).wrapping_mul(0x9e37_79b9));
                Engine::new(config).map(Mutex::new)
            })
            .collect::<Result<_, _>>()?;
        Ok(Shards { engines, datapath: DatapathCounters::default() })
    }

    /// How many engines.
    pub fn len(&self) -> usize {
        self.engines.len()
    }

    /// Whether there are none (never, for shards built by [`Shards::new`]).
    pub fn is_empty(&self) -> bool {
        self.engines.is_empty()
    }

    /// Engine `i`, for its worker.
    pub fn engine(&self, i: usize) -> &Mutex<Engine> {
        &self.engines[i]
    }

    /// Every engine, locked, for a control request.
    pub fn lock(&self) -> Locked<'_> {
        Locked {
            guards: self.engines.iter().map(|e| e.lock().unwrap_or_else(PoisonError::into_inner)).collect(),
            datapath: &self.datapath,
        }
    }
}

/// All engines locked: one view for the control plane.
pub struct Locked<'a> {
    guards: Vec<MutexGuard<'a, Engine>>,
    datapath: &'a DatapathCounters,
}

impl Locked<'_> {
    /// The datapath's own drops.
    pub fn datapath(&self) -> &DatapathCounters {
        self.datapath
    }

    fn first(&self) -> &Engine {
        &self.guards[0]
    }

    /// The listeners as they run (the same in every engine).
    pub fn listeners(&self) -> &Listeners {
        self.first().listeners()
    }

    /// Listener `i`'s counters, summed over the engines.
    pub fn counters(&self, i: usize) -> Option<Counters> {
        let first = *self.first().counters(i)?;
        let mut sum = first;
        for engine in &self.guards[1..] {
            sum += engine.counters(i)?;
        }
        // Every engine hears of each health change: it happened once.
        sum.health_changes = first.health_changes;
        Some(sum)
    }

    /// Flows in all tables.
    pub fn flow_count(&self) -> usize {
        self.guards.iter().map(|e| e.flow_count()).sum()
    }

    /// Unparseable packets, summed.
    pub fn unparsed(&self) -> u64 {
        self.guards.iter().map(|e| e.unparsed()).sum()
    }

    /// Per (listener, backend) traffic summed over the engines, in a stable order.
    pub fn backend_counters(&self) -> BTreeMap<(ListenerKey, SocketAddr), BackendCounters> {
        let mut sum: BTreeMap<(ListenerKey, SocketAddr), BackendCounters> = BTreeMap::new();
        for engine in &self.guards {
            for (listener, backend, c) in engine.backend_counters() {
                *sum.entry((listener, backend)).or_default() += c;
            }
        }
        sum
    }

    /// The SNAT addresses flows use now, in any engine.
    pub fn snat_in_use(&self) -> HashSet<IpAddr> {
        self.guards.iter().flat_map(|e| e.snat_in_use()).collect()
    }

    /// Applies a change to every engine. It is tried on the first: if it
    /// fails there, nothing changed anywhere (the engines hold the same
    /// configuration, so it would fail on each); otherwise every engine gets it.
    pub fn apply<T, E>(&mut self, mut change: impl FnMut(&mut Engine) -> Result<T, E>) -> Result<T, E> {
        let (first, rest) =
            self.guards.split_first_mut().unwrap_or_else(|| unreachable!("one engine at least"));
        let result = change(first)?;
        for engine in rest {
            change(engine)?;
        }
        Ok(result)
    }

    /// Runs `f` on every engine (expiry, say).
    pub fn for_each(&mut self, mut f: impl FnMut(&mut Engine)) {
        for engine in &mut self.guards {
            f(engine);
        }
    }
}
