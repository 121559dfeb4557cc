//! The engine: one packet in, one verdict out.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use std::collections::HashMap;

use toa_core::{
    Format, Formats, TcpFlags, TcpPacket, Toa, UdpPacket, clamp_mss, insert, rewrite_endpoints, strip,
};

use crate::config::{ConfigError, EngineConfig, ObtainClientIp, Protocol};
use crate::flow::{Flow, FlowTable, Full, State};
use crate::schedule::Picker;

/// What to do with a packet after [`Engine::handle_packet`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send the rewritten packet (`buf[..len]`) to the backend.
    ToBackend {
        /// Its length now.
        len: usize,
        /// Its destination address now (the backend), for the next-hop lookup.
        next_hop: IpAddr,
    },
    /// Send the rewritten packet (`buf[..len]`) to the client.
    ToClient {
        /// Its length now.
        len: usize,
        /// Its destination address now (the client), for the next-hop lookup.
        next_hop: IpAddr,
    },
    /// Drop it.
    Drop(DropReason),
    /// Not for this engine (no listener, no flow): leave it to others.
    NotMine,
}

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a valid IPv4/IPv6 TCP or UDP packet, or malformed TCP options.
    Malformed,
    /// A client segment other than SYN for a connection the engine does not know.
    NoFlow,
    /// The flow table is at its bound and holds no half-open flow to evict.
    TableFull,
    /// No free SNAT address and port.
    NoSnatPort,
    /// Every backend of the listener is down (health checks).
    NoBackend,
}

/// Counters of one listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Flows created.
    pub flows: u64,
    /// Flows evicted to make room under a SYN flood.
    pub evicted: u64,
    /// Flows that timed out.
    pub expired: u64,
    /// TOA options written.
    pub injected: u64,
    /// Segments that should have carried a TOA but had no room for it.
    pub no_room: u64,
    /// TOA-format options removed from what clients sent.
    pub stripped: u64,
    /// SYN-ACKs whose MSS was lowered.
    pub mss_clamped: u64,
    /// Packets forwarded to backends.
    pub to_backend: u64,
    /// Packets forwarded to clients.
    pub to_client: u64,
    /// IP bytes forwarded to backends (as sent, TOAs included).
    pub bytes_to_backend: u64,
    /// IP bytes forwarded to clients.
    pub bytes_to_client: u64,
    /// Drops: malformed packets.
    pub dropped_malformed: u64,
    /// Drops: segments without a flow.
    pub dropped_no_flow: u64,
    /// Drops: flow table full.
    pub dropped_table_full: u64,
    /// Drops: no SNAT port.
    pub dropped_no_snat: u64,
    /// Drops: every backend down.
    pub dropped_no_backend: u64,
    /// Backends that went down or came back (health checks).
    pub health_changes: u64,
}

impl std::ops::AddAssign<&Counters> for Counters {
    /// Field by field: the sum over several engines (one per datapath worker).
    fn add_assign(&mut self, o: &Counters) {
        let Counters {
            flows,
            evicted,
            expired,
            injected,
            no_room,
            stripped,
            mss_clamped,
            to_backend,
            to_client,
            bytes_to_backend,
            bytes_to_client,
            dropped_malformed,
            dropped_no_flow,
            dropped_table_full,
            dropped_no_snat,
            dropped_no_backend,
            health_changes,
        } = self;
        *flows += o.flows;
        *evicted += o.evicted;
        *expired += o.expired;
        *injected += o.injected;
        *no_room += o.no_room;
        *stripped += o.stripped;
        *mss_clamped += o.mss_clamped;
        *to_backend += o.to_backend;
        *to_client += o.to_client;
        *bytes_to_backend += o.bytes_to_backend;
        *bytes_to_client += o.bytes_to_client;
        *dropped_malformed += o.dropped_malformed;
        *dropped_no_flow += o.dropped_no_flow;
        *dropped_table_full += o.dropped_table_full;
        *dropped_no_snat += o.dropped_no_snat;
        *dropped_no_backend += o.dropped_no_backend;
        *health_changes += o.health_changes;
    }
}

/// Traffic of one backend of one listener, since the engine started (kept
/// after the backend is removed, while its flows go on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendCounters {
    /// Flows given to it.
    pub flows: u64,
    /// Packets sent to it.
    pub to_backend: u64,
    /// Packets from it, sent on to clients.
    pub to_client: u64,
    /// IP bytes sent to it.
    pub bytes_to_backend: u64,
    /// IP bytes from it.
    pub bytes_to_client: u64,
}

impl std::ops::AddAssign<&BackendCounters> for BackendCounters {
    fn add_assign(&mut self, o: &BackendCounters) {
        self.flows += o.flows;
        self.to_backend += o.to_backend;
        self.to_client += o.to_client;
        self.bytes_to_backend += o.bytes_to_backend;
        self.bytes_to_client += o.bytes_to_client;
    }
}

/// A listener's identity across reloads: protocol and VIP.
pub type ListenerKey = (Protocol, SocketAddr);

impl Counters {
    fn drop(&mut self, reason: DropReason) -> Verdict {
        match reason {
            DropReason::Malformed => self.dropped_malformed += 1,
            DropReason::NoFlow => self.dropped_no_flow += 1,
            DropReason::TableFull => self.dropped_table_full += 1,
            DropReason::NoSnatPort => self.dropped_no_snat += 1,
            DropReason::NoBackend => self.dropped_no_backend += 1,
        }
        Verdict::Drop(reason)
    }
}

/// The sans-IO FULLNAT + TOA engine.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    pickers: Vec<Picker>,
    flows: FlowTable,
    counters: Vec<Counters>,
    /// Per listener, per backend: whether health checks say it is up.
    up: Vec<Vec<bool>>,
    /// Draining backends: (listener, address).
    draining: Vec<(usize, SocketAddr)>,
    /// Packets that could not be parsed at all (no listener to count them on).
    unparsed: u64,
    /// Per (listener, backend) traffic; flows point into it.
    backend_stats: Vec<(ListenerKey, SocketAddr, BackendCounters)>,
    backend_index: HashMap<(ListenerKey, SocketAddr), usize>,
}

/// The TOA kinds written: the vendors' defaults.
const KINDS: Formats = Formats::ALL;

impl Engine {
    /// An engine for a validated `config`.
    pub fn new(config: EngineConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let pickers = config.listeners.iter().map(|l| Picker::new(l.scheduler, l.backends.len())).collect();
        let counters = vec![Counters::default(); config.listeners.len()];
        let flows = FlowTable::new(
            config.snat.clone(),
            config.snat_ports.clone(),
            config.shard,
            config.engine_bound(),
            config.snat_seed,
        );
        let up = config.listeners.iter().map(|l| vec![true; l.backends.len()]).collect();
        Ok(Engine {
            config,
            pickers,
            flows,
            counters,
            up,
            draining: Vec::new(),
            unparsed: 0,
            backend_stats: Vec::new(),
            backend_index: HashMap::new(),
        })
    }

    /// Takes a new configuration (a reload) with the guarantees of a live
    /// switch: flows that exist keep their backend, SNAT address and mode;
    /// new flows follow `config`. Listeners are matched by protocol and VIP:
    /// one that stays keeps its counters, and its backends that stay keep
    /// their health and drain state; the flows of a listener that is gone are
    /// dropped. `snat_seed` and `shard` stay this engine's. On error nothing
    /// changes.
    pub fn reconfigure(&mut self, config: EngineConfig) -> Result<(), ConfigError> {
        let config = EngineConfig { snat_seed: self.config.snat_seed, shard: self.config.shard, ..config };
        config.validate()?;
        let key = |l: &crate::config::ListenerConfig| (l.protocol, l.vip);
        let old: Vec<ListenerKey> = self.config.listeners.iter().map(key).collect();
        let map: Vec<Option<usize>> =
            old.iter().map(|k| config.listeners.iter().position(|l| key(l) == *k)).collect();
        let mut pickers = Vec::new();
        let mut counters = Vec::new();
        let mut up = Vec::new();
        let mut draining = Vec::new();
        for (new, listener) in config.listeners.iter().enumerate() {
            let before = map.iter().position(|m| *m == Some(new));
            let same_backends = before.is_some_and(|b| {
                let was = &self.config.listeners[b];
                was.backends == listener.backends && was.scheduler == listener.scheduler
            });
            pickers.push(match before {
                Some(b) if same_backends => {
                    std::mem::replace(&mut self.pickers[b], Picker::new(listener.scheduler, 0))
                }
                _ => Picker::new(listener.scheduler, listener.backends.len()),
            });
            counters.push(before.map(|b| self.counters[b]).unwrap_or_default());
            up.push(
                listener
                    .backends
                    .iter()
                    .map(|backend| {
                        let was = before.and_then(|b| {
                            let i = self.config.listeners[b]
                                .backends
                                .iter()
                                .position(|x| x.addr == backend.addr)?;
                            Some(self.up[b][i])
                        });
                        was.unwrap_or(true)
                    })
                    .collect(),
            );
            if let Some(b) = before {
                for (l, addr) in &self.draining {
                    if *l == b && listener.backends.iter().any(|x| x.addr == *addr) {
                        draining.push((new, *addr));
                    }
                }
            }
        }
        self.flows.remap_listeners(&map);
        self.flows.set_limits(config.snat.clone(), config.engine_bound());
        self.pickers = pickers;
        self.counters = counters;
        self.up = up;
        self.draining = draining;
        self.config = config;
        Ok(())
    }

    /// The SNAT addresses that flows use now (a reload must keep answering
    /// ARP for them until those flows end).
    pub fn snat_in_use(&self) -> std::collections::HashSet<IpAddr> {
        self.flows.snat_in_use()
    }

    /// Per (listener, backend) traffic, including backends since removed.
    pub fn backend_counters(&self) -> impl Iterator<Item = (ListenerKey, SocketAddr, &BackendCounters)> {
        self.backend_stats.iter().map(|(l, b, c)| (*l, *b, c))
    }

    /// The counters of listener `index` (configuration order).
    pub fn counters(&self, index: usize) -> Option<&Counters> {
        self.counters.get(index)
    }

    /// The listeners, in configuration order (with their current modes).
    pub fn listeners(&self) -> &[crate::config::ListenerConfig] {
        &self.config.listeners
    }

    /// Flows in the table.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Packets dropped before a listener could be told (unparseable).
    pub fn unparsed(&self) -> u64 {
        self.unparsed
    }

    /// Switches listener `index`'s mode. Flows that exist keep the mode they
    /// started with; new flows use this one. A UDP listener cannot use TOA.
    pub fn set_obtain_client_ip(&mut self, index: usize, mode: ObtainClientIp) -> Result<(), ConfigError> {
        let listener = self.config.listeners.get_mut(index).ok_or(ConfigError::Limits("no such listener"))?;
        if listener.protocol == Protocol::Udp && matches!(mode, ObtainClientIp::Toa(_)) {
            return Err(ConfigError::ToaOnUdp(listener.vip));
        }
        listener.obtain_client_ip = mode;
        Ok(())
    }

    /// Marks the backend at `addr` of listener `listener` up or down. A
    /// backend that is down gets no new flow; its existing flows are kept
    /// until they end or time out. Returns whether the state changed.
    pub fn set_backend_up(&mut self, listener: usize, addr: SocketAddr, up: bool) -> bool {
        let Some(index) =
            self.config.listeners.get(listener).and_then(|l| l.backends.iter().position(|b| b.addr == addr))
        else {
            return false;
        };
        let state = &mut self.up[listener][index];
        if *state == up {
            return false;
        }
        *state = up;
        self.counters[listener].health_changes += 1;
        true
    }

    /// Adds a backend to listener `listener`; it gets new flows at once.
    pub fn add_backend(&mut self, listener: usize, backend: crate::config::Backend) -> Result<(), String> {
        let config = self.config.listeners.get_mut(listener).ok_or("no such listener")?;
        if backend.weight == 0 {
            return Err("weight must be at least 1".into());
        }
        if backend.addr.is_ipv4() != config.vip.is_ipv4() {
            return Err(format!("{} is not of the VIP's IP version", backend.addr));
        }
        if !self.config.snat.iter().any(|a| a.is_ipv4() == backend.addr.is_ipv4()) {
            return Err(format!("no SNAT address of {}'s IP version", backend.addr));
        }
        if config.backends.iter().any(|b| b.addr == backend.addr) {
            return Err(format!("{} is already a backend", backend.addr));
        }
        config.backends.push(backend);
        self.up[listener].push(true);
        self.pickers[listener].resize(config.backends.len(), None);
        Ok(())
    }

    /// Removes a backend: it gets no new flow; its existing flows go on until
    /// they end or time out. The last backend cannot be removed.
    pub fn remove_backend(&mut self, listener: usize, addr: SocketAddr) -> Result<(), String> {
        let config = self.config.listeners.get_mut(listener).ok_or("no such listener")?;
        let i =
            config.backends.iter().position(|b| b.addr == addr).ok_or(format!("{addr} is not a backend"))?;
        if config.backends.len() == 1 {
            return Err("cannot remove the last backend (drain it, or add another first)".into());
        }
        config.backends.remove(i);
        self.up[listener].remove(i);
        self.draining.retain(|d| *d != (listener, addr));
        self.pickers[listener].resize(config.backends.len(), Some(i));
        Ok(())
    }

    /// Drains a backend (or undrains it): no new flows while draining, existing ones go on.
    pub fn drain_backend(&mut self, listener: usize, addr: SocketAddr, drain: bool) -> Result<(), String> {
        let config = self.config.listeners.get(listener).ok_or("no such listener")?;
        if !config.backends.iter().any(|b| b.addr == addr) {
            return Err(format!("{addr} is not a backend"));
        }
        self.draining.retain(|d| *d != (listener, addr));
        if drain {
            self.draining.push((listener, addr));
        }
        Ok(())
    }

    /// Whether a backend is draining.
    pub fn is_draining(&self, listener: usize, addr: SocketAddr) -> bool {
        self.draining.contains(&(listener, addr))
    }

    /// Whether backend `backend` of listener `listener` is up.
    pub fn backend_up(&self, listener: usize, backend: usize) -> Option<bool> {
        self.up.get(listener)?.get(backend).copied()
    }

    /// Removes the flows that have been idle too long; call it every second or so.
    pub fn poll_expired(&mut self, now: Duration) -> usize {
        let expired = self.flows.expire(now, &self.config.timeouts);
        for listener in &expired {
            self.counters[*listener].expired += 1;
        }
        expired.len()
    }

    /// Handles one IP packet in `buf[..len]` (the buffer needs 40 spare bytes
    /// for a TOA) at time `now` (any monotonic clock, as a duration since its
    /// start), rewriting it in place.
    pub fn handle_packet(&mut self, now: Duration, buf: &mut [u8], len: usize) -> Verdict {
        let packet = &buf[..len.min(buf.len())];
        let segment = match TcpPacket::new_checked(packet) {
            Ok(packet) => Segment {
                proto: Protocol::Tcp,
                src: packet.src(),
                dst: packet.dst(),
                flags: packet.tcp().flags(),
                // The edits below change headers only: the payload keeps this length.
                payload: packet.tcp().payload().len(),
            },
            Err(toa_core::Error::NotTcp { protocol: 17, .. }) => match UdpPacket::new_checked(packet) {
                Ok(packet) => Segment {
                    proto: Protocol::Udp,
                    src: packet.src(),
                    dst: packet.dst(),
                    flags: TcpFlags::default(),
                    payload: packet.payload().len(),
                },
                Err(_) => {
                    self.unparsed += 1;
                    return Verdict::Drop(DropReason::Malformed);
                }
            },
            // Other protocols and fragments are someone else's business.
            Err(toa_core::Error::NotTcp { .. } | toa_core::Error::Fragment { .. }) => {
                return Verdict::NotMine;
            }
            Err(_) => {
                self.unparsed += 1;
                return Verdict::Drop(DropReason::Malformed);
            }
        };
        let listener =
            self.config.listeners.iter().position(|l| l.vip == segment.dst && l.protocol == segment.proto);
        match (listener, segment.proto) {
            (Some(listener), Protocol::Tcp) => self.handle_client(now, buf, len, listener, segment),
            (Some(listener), Protocol::Udp) => self.handle_udp_client(now, buf, len, listener, segment),
            (None, proto) => match self.flows.by_backend(proto, segment.src, segment.dst) {
                Some(id) if proto == Protocol::Tcp => self.handle_backend(now, buf, len, id, segment),
                Some(id) => self.handle_udp_backend(now, buf, len, id),
                None => Verdict::NotMine,
            },
        }
    }

    /// A datagram from a client: find or make its flow, rewrite, count.
    fn handle_udp_client(
        &mut self,
        now: Duration,
        buf: &mut [u8],
        len: usize,
        listener: usize,
        segment: Segment,
    ) -> Verdict {
        let (client, vip) = (segment.src, segment.dst);
        let id = match self.flows.by_client(Protocol::Udp, client, vip) {
            Some(id) => id,
            None => match self.new_flow(now, listener, Protocol::Udp, client, vip) {
                Ok(id) => id,
                Err(reason) => return self.counters[listener].drop(reason),
            },
        };
        let Some(flow) = self.flows.get_mut(id) else {
            return self.counters[listener].drop(DropReason::NoFlow);
        };
        flow.last_seen = now;
        let (snat, backend, stats) = (flow.snat, flow.backend, flow.stats);
        if rewrite_endpoints(buf, len, snat, backend).is_err() {
            return self.counters[listener].drop(DropReason::Malformed);
        }
        self.count_to_backend(listener, stats, len);
        Verdict::ToBackend { len, next_hop: backend.ip() }
    }

    /// A datagram from a backend: the flow has been answered; rewrite back.
    fn handle_udp_backend(&mut self, now: Duration, buf: &mut [u8], len: usize, id: usize) -> Verdict {
        let Some(flow) = self.flows.get_mut(id) else { return Verdict::NotMine };
        flow.last_seen = now;
        flow.state = State::Established;
        let (vip, client, listener, stats) = (flow.vip, flow.client, flow.listener, flow.stats);
        if rewrite_endpoints(buf, len, vip, client).is_err() {
            return self.counters[listener].drop(DropReason::Malformed);
        }
        self.count_to_client(listener, stats, len);
        Verdict::ToClient { len, next_hop: client.ip() }
    }

    fn count_to_backend(&mut self, listener: usize, stats: usize, len: usize) {
        let c = &mut self.counters[listener];
        c.to_backend += 1;
        c.bytes_to_backend += len as u64;
        let b = &mut self.backend_stats[stats].2;
        b.to_backend += 1;
        b.bytes_to_backend += len as u64;
    }

    fn count_to_client(&mut self, listener: usize, stats: usize, len: usize) {
        let c = &mut self.counters[listener];
        c.to_client += 1;
        c.bytes_to_client += len as u64;
        let b = &mut self.backend_stats[stats].2;
        b.to_client += 1;
        b.bytes_to_client += len as u64;
    }

    fn handle_client(
        &mut self,
        now: Duration,
        buf: &mut [u8],
        len: usize,
        listener: usize,
        segment: Segment,
    ) -> Verdict {
        let Segment { src: client, dst: vip, flags, payload, .. } = segment;
        // A client may not speak for itself: strip forged TOAs in every mode.
        let len = match strip(buf, len, &Formats::ALL) {
            Ok(stripped) => {
                self.counters[listener].stripped += stripped.removed as u64;
                stripped.len
            }
            Err(_) => return self.counters[listener].drop(DropReason::Malformed),
        };
        let syn = flags.contains(TcpFlags::SYN) && !flags.contains(TcpFlags::ACK);
        // A SYN on a flow past its handshake is a new connection reusing the client
        // port (the old one is closing): it gets a flow, and the mode, of its own.
        if let Some(old) = self.flows.by_client(Protocol::Tcp, client, vip) {
            if syn && self.flows.get(old).is_some_and(|f| f.state != State::SynSent) {
                self.flows.remove(old);
            }
        }
        let id = match self.flows.by_client(Protocol::Tcp, client, vip) {
            Some(id) => id,
            None if syn => match self.new_flow(now, listener, Protocol::Tcp, client, vip) {
                Ok(id) => id,
                Err(reason) => return self.counters[listener].drop(reason),
            },
            None => return self.counters[listener].drop(DropReason::NoFlow),
        };
        let Some(flow) = self.flows.get_mut(id) else {
            return self.counters[listener].drop(DropReason::NoFlow);
        };
        flow.last_seen = now;
        let handshake_ack = !syn && flags.contains(TcpFlags::ACK) && flow.state == State::SynReceived;
        if handshake_ack {
            flow.state = State::Established;
        }
        if flags.contains(TcpFlags::FIN) {
            flow.state = State::Closing;
        }
        let wants_toa = (syn && flow.placement.syn)
            || (handshake_ack && flow.placement.handshake_ack)
            || (payload > 0 && flow.placement.data && !flow.backend_sent_data);
        let toa = match flow.mode {
            ObtainClientIp::Toa(format) if wants_toa => Some(toa_for(format, client)),
            _ => None,
        };
        let (snat, backend, stats) = (flow.snat, flow.backend, flow.stats);
        if flags.contains(TcpFlags::RST) {
            self.flows.remove(id);
        }
        if rewrite_endpoints(buf, len, snat, backend).is_err() {
            return self.counters[listener].drop(DropReason::Malformed);
        }
        let counters = &mut self.counters[listener];
        let mut len = len;
        if let Some(toa) = toa {
            match insert(buf, len, &toa, &KINDS) {
                Ok(new_len) => {
                    len = new_len;
                    counters.injected += 1;
                }
                // No room even after reclaiming NOPs: the segment goes without.
                Err(_) => counters.no_room += 1,
            }
        }
        self.count_to_backend(listener, stats, len);
        Verdict::ToBackend { len, next_hop: backend.ip() }
    }

    fn new_flow(
        &mut self,
        now: Duration,
        listener: usize,
        proto: Protocol,
        client: SocketAddr,
        vip: SocketAddr,
    ) -> Result<usize, DropReason> {
        if self.flows.len() >= self.config.engine_bound() {
            match self.flows.evict_half_open() {
                Some(owner) => self.counters[owner].evicted += 1,
                None => return Err(DropReason::TableFull),
            }
        }
        let config = &self.config.listeners[listener];
        let (up, draining) = (&self.up[listener], &self.draining);
        let eligible = |i: usize| up[i] && !draining.contains(&(listener, config.backends[i].addr));
        let Some(pick) = self.pickers[listener].pick(&config.backends, eligible, client) else {
            return Err(DropReason::NoBackend);
        };
        let backend = config.backends[pick].addr;
        let key = ((config.protocol, config.vip), backend);
        let stats = *self.backend_index.entry(key).or_insert_with(|| {
            self.backend_stats.push((key.0, key.1, BackendCounters::default()));
            self.backend_stats.len() - 1
        });
        let flow = Flow {
            proto,
            client,
            vip,
            backend,
            snat: backend, // replaced by the table's SNAT allocation
            listener,
            stats,
            mode: config.obtain_client_ip,
            placement: config.placement,
            state: State::SynSent,
            created: now,
            last_seen: now,
            backend_sent_data: false,
        };
        let id = self.flows.insert(flow).map_err(|full| match full {
            Full::Table => DropReason::TableFull,
            Full::Snat => DropReason::NoSnatPort,
        })?;
        self.counters[listener].flows += 1;
        self.backend_stats[stats].2.flows += 1;
        Ok(id)
    }

    fn handle_backend(
        &mut self,
        now: Duration,
        buf: &mut [u8],
        len: usize,
        id: usize,
        segment: Segment,
    ) -> Verdict {
        let Some(flow) = self.flows.get_mut(id) else { return Verdict::NotMine };
        let (flags, listener) = (segment.flags, flow.listener);
        flow.last_seen = now;
        if segment.payload > 0 {
            flow.backend_sent_data = true;
        }
        if flags.contains(TcpFlags::SYN) && flags.contains(TcpFlags::ACK) && flow.state == State::SynSent {
            flow.state = State::SynReceived;
        }
        if flags.contains(TcpFlags::FIN) {
            flow.state = State::Closing;
        }
        let (vip, client, mode, stats) = (flow.vip, flow.client, flow.mode, flow.stats);
        if flags.contains(TcpFlags::RST) {
            self.flows.remove(id);
        }
        let counters = &mut self.counters[listener];
        if let ObtainClientIp::Toa(format) = mode {
            // The client must leave room for the option the LB will add to its segments.
            let room = toa_for(format, client).wire_len().next_multiple_of(4) as u16;
            match clamp_mss(buf, len, room) {
                Ok(Some(_)) => counters.mss_clamped += 1,
                Ok(None) => {}
                Err(_) => return counters.drop(DropReason::Malformed),
            }
        }
        if rewrite_endpoints(buf, len, vip, client).is_err() {
            return counters.drop(DropReason::Malformed);
        }
        self.count_to_client(listener, stats, len);
        Verdict::ToClient { len, next_hop: client.ip() }
    }
}

/// What the engine reads of a packet once, before editing it.
#[derive(Clone, Copy)]
struct Segment {
    proto: Protocol,
    src: SocketAddr,
    dst: SocketAddr,
    flags: TcpFlags,
    payload: usize,
}

/// The TOA for `client` in the listener's `format`: an IPv6 client needs an
/// IPv6 format (`toa6` unless the listener uses `ali-v6`), an IPv4 client an
/// IPv4 one (`toa` unless the listener uses `tencent`).
fn toa_for(format: Format, client: SocketAddr) -> Toa {
    let format = match (format, client.is_ipv6()) {
        (Format::AliV6, true) | (Format::Tencent, false) => format,
        (_, true) => Format::Toa6,
        (_, false) => Format::Toa,
    };
    Toa::new(format, client).unwrap_or_else(|_| unreachable!("the family matches the format"))
}
