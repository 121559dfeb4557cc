//! The flow table: both directions of every connection, bounded.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::config::{ObtainClientIp, Placement, Timeouts};

pub(crate) type FlowId = usize;

/// Where a connection is.
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
    pub(crate) client: SocketAddr,
    pub(crate) vip: SocketAddr,
    pub(crate) backend: SocketAddr,
    pub(crate) snat: SocketAddr,
    pub(crate) listener: usize,
    /// The mode in force when the flow started: a later switch does not change it.
    pub(crate) mode: ObtainClientIp,
    pub(crate) placement: Placement,
    pub(crate) state: State,
    pub(crate) created: Duration,
    pub(crate) last_seen: Duration,
    pub(crate) backend_sent_data: bool,
}

impl Flow {
    /// Whether the backend side uses an address from the SNAT pool (not in transparent mode).
    fn snat_allocated(&self) -> bool {
        self.mode != ObtainClientIp::Transparent
    }
}

/// A bounded table of flows, looked up from either side.
#[derive(Debug)]
pub(crate) struct FlowTable {
    slots: Vec<Option<Flow>>,
    free: Vec<FlowId>,
    by_client: HashMap<(SocketAddr, SocketAddr), FlowId>,
    by_backend: HashMap<(SocketAddr, SocketAddr), FlowId>,
    /// Half-open flows in creation order (entries may be stale): evicted first under a SYN flood.
    half_open: VecDeque<(FlowId, Duration)>,
    snat_used: HashSet<SocketAddr>,
    snat: Vec<IpAddr>,
    ports: std::ops::RangeInclusive<u16>,
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
            ports,
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

    pub(crate) fn by_client(&self, client: SocketAddr, vip: SocketAddr) -> Option<FlowId> {
        self.by_client.get(&(client, vip)).copied()
    }

    pub(crate) fn by_backend(&self, backend: SocketAddr, snat: SocketAddr) -> Option<FlowId> {
        self.by_backend.get(&(backend, snat)).copied()
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
            self.allocate_snat(flow.backend.is_ipv4()).ok_or(Full::Snat)?
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
        self.by_client.insert((flow.client, flow.vip), id);
        self.by_backend.insert((flow.backend, flow.snat), id);
        self.half_open.push_back((id, flow.created));
        self.slots[id] = Some(flow);
        self.len += 1;
        Ok(id)
    }

    /// The next free SNAT address and port of the family.
    fn allocate_snat(&mut self, v4: bool) -> Option<SocketAddr> {
        let addrs: Vec<IpAddr> = self.snat.iter().copied().filter(|a| a.is_ipv4() == v4).collect();
        let ports = u64::from(*self.ports.end()) - u64::from(*self.ports.start()) + 1;
        let space = ports * addrs.len() as u64;
        for _ in 0..space.min(1 << 20) {
            let n = self.cursor % space;
            self.cursor = self.cursor.wrapping_add(1);
            // Spread consecutive flows over the addresses first, then the ports.
            let addr = addrs[(n % addrs.len() as u64) as usize];
            let port = *self.ports.start() + (n / addrs.len() as u64) as u16;
            let candidate = SocketAddr::new(addr, port);
            if self.snat_used.insert(candidate) {
                return Some(candidate);
            }
        }
        None
    }

    pub(crate) fn remove(&mut self, id: FlowId) -> Option<Flow> {
        let flow = self.slots.get_mut(id)?.take()?;
        self.by_client.remove(&(flow.client, flow.vip));
        self.by_backend.remove(&(flow.backend, flow.snat));
        if flow.snat_allocated() {
            self.snat_used.remove(&flow.snat);
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
                let limit = match f.state {
                    State::SynSent | State::SynReceived => timeouts.syn,
                    State::Established => timeouts.established,
                    State::Closing => timeouts.closing,
                };
                (now.saturating_sub(f.last_seen) > limit).then_some(id)
            })
            .collect();
        expired.into_iter().filter_map(|id| self.remove(id).map(|f| f.listener)).collect()
    }
}
