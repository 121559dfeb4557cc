//! The flow table: both directions of every connection, bounded.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::engine::config::{ObtainClientIp, Placement, Protocol, Shard, Timeouts};

pub(crate) type FlowId = usize;

/// Where a connection is. A UDP flow is `SynSent` until the backend first
/// answers (and evictable under a flood until then), `Established` after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// The client's SYN went to the backend.
    SynSent,
    /// The backend answered with SYN-ACK.
    SynReceived,
    /// The client completed the handshake.
    Established,
    /// Someone sent FIN.
    Closing,
}

/// One connection: client <-> VIP on the client side, SNAT <-> backend on the other.
#[derive(Clone, Debug)]
pub(crate) struct Flow {
    pub(crate) proto: Protocol,
    pub(crate) client: SocketAddr,
    pub(crate) vip: SocketAddr,
    pub(crate) backend: SocketAddr,
    pub(crate) snat: SocketAddr,
    pub(crate) listener: usize,
    /// Its backend's entry in the engine's per-backend statistics.
    pub(crate) stats: usize,
    /// The mode in force when the flow started: a later switch does not change it.
    pub(crate) mode: ObtainClientIp,
    pub(crate) placement: Placement,
    /// Whether the backend's SYN-ACK MSS is lowered (the listener's
    /// `mss_clamp` when the flow started).
    pub(crate) clamp_mss: bool,
    /// TCP: the sequence number of the client's SYN, which tells its
    /// retransmissions from a new connection on the same port; UDP: 0.
    pub(crate) client_isn: u32,
    pub(crate) state: State,
    pub(crate) created: Duration,
    pub(crate) last_seen: Duration,
    pub(crate) backend_sent_data: bool,
    /// UDP with UOA: datagrams still to carry it.
    pub(crate) uoa_left: u8,
}

impl Flow {
    /// Whether the backend side uses an address from the SNAT pool (not in transparent mode).
    fn snat_allocated(&self) -> bool {
        self.mode != ObtainClientIp::Transparent
    }
}

/// A lookup key: protocol, then the two endpoints of one side.
type Key = (Protocol, SocketAddr, SocketAddr);

/// A bounded table of flows, looked up from either side.
#[derive(Debug)]
pub(crate) struct FlowTable {
    slots: Vec<Option<Flow>>,
    free: Vec<FlowId>,
    by_client: HashMap<Key, FlowId>,
    by_backend: HashMap<Key, FlowId>,
    /// Half-open flows in creation order (entries may be stale): evicted first under a SYN flood.
    half_open: VecDeque<(FlowId, Duration)>,
    snat_used: HashSet<(Protocol, SocketAddr)>,
    snat: Vec<IpAddr>,
    /// This shard's SNAT ports.
    ports: Vec<u16>,
    cursor: u64,
    max: usize,
    len: usize,
}

/// Why a flow could not be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Full {
    /// The table is at its bound and nothing can be evicted.
    Table,
    /// No free SNAT address and port of the backend's family.
    Snat,
}

impl FlowTable {
    pub(crate) fn new(
        snat: Vec<IpAddr>,
        ports: std::ops::RangeInclusive<u16>,
        shard: Shard,
        max: usize,
        seed: u64,
    ) -> Self {
        FlowTable {
            slots: Vec::new(),
            free: Vec::new(),
            by_client: HashMap::new(),
            by_backend: HashMap::new(),
            half_open: VecDeque::new(),
            snat_used: HashSet::new(),
            snat,
            ports: ports.filter(|p| shard.owns(*p)).collect(),
            cursor: seed,
            max,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn get(&self, id: FlowId) -> Option<&Flow> {
        self.slots.get(id).and_then(Option::as_ref)
    }

    pub(crate) fn get_mut(&mut self, id: FlowId) -> Option<&mut Flow> {
        self.slots.get_mut(id).and_then(Option::as_mut)
    }

    pub(crate) fn by_client(&self, proto: Protocol, client: SocketAddr, vip: SocketAddr) -> Option<FlowId> {
        self.by_client.get(&(proto, client, vip)).copied()
    }

    pub(crate) fn by_backend(
        &self,
        proto: Protocol,
        backend: SocketAddr,
        snat: SocketAddr,
    ) -> Option<FlowId> {
        self.by_backend.get(&(proto, backend, snat)).copied()
    }

    /// Takes a new SNAT pool and bound (a reload); flows that exist keep their addresses.
    pub(crate) fn set_limits(&mut self, snat: Vec<IpAddr>, max: usize) {
        self.snat = snat;
        self.max = max;
    }

    /// The SNAT addresses flows use now.
    pub(crate) fn snat_in_use(&self) -> HashSet<IpAddr> {
        self.snat_used.iter().map(|(_, a)| a.ip()).collect()
    }

    /// Gives every flow its listener's new index (a reload), removing the
    /// flows whose listener is gone; returns how many were removed.
    pub(crate) fn remap_listeners(&mut self, map: &[Option<usize>]) -> usize {
        let mut gone = Vec::new();
        for id in 0..self.slots.len() {
            let Some(flow) = self.slots[id].as_mut() else { continue };
            match map.get(flow.listener).copied().flatten() {
                Some(new) => flow.listener = new,
                None => gone.push(id),
            }
        }
        gone.into_iter().filter(|id| self.remove(*id).is_some()).count()
    }

    /// Evicts the oldest half-open flow, if any; returns its listener.
    pub(crate) fn evict_half_open(&mut self) -> Option<usize> {
        while let Some((id, created)) = self.half_open.pop_front() {
            let live = self.get(id).is_some_and(|f| {
                f.created == created && matches!(f.state, State::SynSent | State::SynReceived)
            });
            if live {
                return self.remove(id).map(|f| f.listener);
            }
        }
        None
    }

    /// Creates a flow; the caller has made room (see `evict_half_open`).
    pub(crate) fn insert(&mut self, mut flow: Flow) -> Result<FlowId, Full> {
        if self.len >= self.max {
            return Err(Full::Table);
        }
        flow.snat = if flow.snat_allocated() {
            self.allocate_snat(flow.proto, flow.backend.is_ipv4()).ok_or(Full::Snat)?
        } else {
            // Transparent: the backend sees, and answers, the client itself.
            flow.client
        };
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.by_client.insert((flow.proto, flow.client, flow.vip), id);
        self.by_backend.insert((flow.proto, flow.backend, flow.snat), id);
        self.half_open.push_back((id, flow.created));
        self.slots[id] = Some(flow);
        self.len += 1;
        Ok(id)
    }

    /// The next free SNAT address and port of the family, among this shard's
    /// ports (see [`Shard`]).
    fn allocate_snat(&mut self, proto: Protocol, v4: bool) -> Option<SocketAddr> {
        let addrs: Vec<IpAddr> = self.snat.iter().copied().filter(|a| a.is_ipv4() == v4).collect();
        if addrs.is_empty() || self.ports.is_empty() {
            return None;
        }
        let space = self.ports.len() as u64 * addrs.len() as u64;
        for _ in 0..space.min(1 << 20) {
            let n = self.cursor % space;
            self.cursor = self.cursor.wrapping_add(1);
            // Spread consecutive flows over the addresses first, then the ports.
            let addr = addrs[(n % addrs.len() as u64) as usize];
            let port = self.ports[(n / addrs.len() as u64) as usize];
            let candidate = SocketAddr::new(addr, port);
            if self.snat_used.insert((proto, candidate)) {
                return Some(candidate);
            }
        }
        None
    }

    pub(crate) fn remove(&mut self, id: FlowId) -> Option<Flow> {
        let flow = self.slots.get_mut(id)?.take()?;
        self.by_client.remove(&(flow.proto, flow.client, flow.vip));
        self.by_backend.remove(&(flow.proto, flow.backend, flow.snat));
        if flow.snat_allocated() {
            self.snat_used.remove(&(flow.proto, flow.snat));
        }
        self.free.push(id);
        self.len -= 1;
        Some(flow)
    }

    /// Removes the flows idle longer than their state allows; returns their listeners.
    pub(crate) fn expire(&mut self, now: Duration, timeouts: &Timeouts) -> Vec<usize> {
        let expired: Vec<FlowId> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(id, f)| {
                let f = f.as_ref()?;
                let limit = match (f.proto, f.state) {
                    (Protocol::Udp, _) => timeouts.udp,
                    (Protocol::Tcp, State::SynSent | State::SynReceived) => timeouts.syn,
                    (Protocol::Tcp, State::Established) => timeouts.established,
                    (Protocol::Tcp, State::Closing) => timeouts.closing,
                };
                (now.saturating_sub(f.last_seen) > limit).then_some(id)
            })
            .collect();
        expired.into_iter().filter_map(|id| self.remove(id).map(|f| f.listener)).collect()
    }
}
