//! The sans-IO FULLNAT + TOA engine: one packet in, one verdict out.
//!
//! [`Engine::handle_packet`] takes one IP packet in the caller's buffer (from
//! a client to a VIP, or from a backend to an SNAT address), rewrites it in
//! place and says where it goes ([`Verdict`]). It never opens a socket or
//! reads a clock: the driver passes the time, so every decision is testable
//! without root, and any userspace datapath can drive it. It is the
//! reference the kernel datapath's nftables rules and injector follow.
//!
//! - [`config`]: what the engine is told;
//! - [`listeners`]: the listeners as they run (modes, backends' health and
//!   drain), shared with the kernel datapath;
//! - [`counters`]: the counters, defined once for the struct, `ctl stats` and
//!   the metrics;
//! - `flow` and `schedule`: the flow table and the schedulers.

pub mod config;
pub mod counters;
mod flow;
pub mod listeners;
mod schedule;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use toa_core::{
    Format, Formats, TcpFlags, TcpPacket, Toa, UdpPacket, clamp_mss, insert, rewrite_endpoints, strip,
};

use self::config::{ConfigError, EngineConfig, ObtainClientIp, Protocol};
pub use self::counters::{BackendCounters, Counters, ListenerKey};
use self::flow::{Flow, FlowTable, Full, State};
use self::listeners::{BackendError, Listeners};
use self::schedule::Picker;
pub(crate) use self::schedule::rendezvous;

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
    /// The first packet of a new flow, on an engine that its client port does
    /// not steer to (a datapath of several engines handed it to the wrong
    /// one): no flow is made here, where the client's next segments would not
    /// come, and the client's retransmission finds the right engine.
    WrongEngine,
}

/// Counts a drop on a listener's counters and says so.
fn drop(counters: &mut Counters, reason: DropReason) -> Verdict {
    match reason {
        DropReason::Malformed => counters.dropped_malformed += 1,
        DropReason::NoFlow => counters.dropped_no_flow += 1,
        DropReason::TableFull => counters.dropped_table_full += 1,
        DropReason::NoSnatPort => counters.dropped_no_snat += 1,
        DropReason::NoBackend => counters.dropped_no_backend += 1,
        DropReason::WrongEngine => counters.dropped_wrong_engine += 1,
    }
    Verdict::Drop(reason)
}

/// The sans-IO FULLNAT + TOA engine.
#[derive(Debug)]
pub struct Engine {
    /// The configuration (its listener list is the one at the start or the
    /// last reload; `listeners` holds them as they run).
    config: EngineConfig,
    listeners: Listeners,
    pickers: Vec<Picker>,
    flows: FlowTable,
    counters: Vec<Counters>,
    /// Packets that could not be parsed at all (no listener to count them on).
    unparsed: u64,
    /// Per (listener, backend) traffic; flows point into it.
    backend_stats: Vec<(ListenerKey, SocketAddr, BackendCounters)>,
    backend_index: HashMap<(ListenerKey, SocketAddr), usize>,
    /// The UOA carrier to send ahead of the datagram the last
    /// [`Engine::handle_packet`] returned (see [`Engine::take_carrier`]).
    carrier: Option<Vec<u8>>,
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
        Ok(Engine {
            listeners: Listeners::new(&config.listeners),
            config,
            pickers,
            flows,
            counters,
            unparsed: 0,
            backend_stats: Vec::new(),
            backend_index: HashMap::new(),
            carrier: None,
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
        let before: Vec<_> = self.listeners.all().to_vec();
        let map = self.listeners.reconfigure(&config.listeners);
        let mut pickers = Vec::new();
        let mut counters = Vec::new();
        for (new, listener) in config.listeners.iter().enumerate() {
            let old = map.iter().position(|m| *m == Some(new));
            let same_backends = old.is_some_and(|b| {
                let was = &before[b].config;
                was.backends == listener.backends && was.scheduler == listener.scheduler
            });
            pickers.push(match old {
                Some(b) if same_backends => {
                    std::mem::replace(&mut self.pickers[b], Picker::new(listener.scheduler, 0))
                }
                _ => Picker::new(listener.scheduler, listener.backends.len()),
            });
            counters.push(old.map(|b| self.counters[b]).unwrap_or_default());
        }
        self.flows.remap_listeners(&map);
        self.flows.set_limits(config.snat.clone(), config.engine_bound());
        self.pickers = pickers;
        self.counters = counters;
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

    /// The listeners as they run: current modes, backends, health, drain.
    pub fn listeners(&self) -> &Listeners {
        &self.listeners
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
        self.listeners.set_mode(index, mode)
    }

    /// Marks the backend at `addr` of listener `listener` up or down. A
    /// backend that is down gets no new flow; its existing flows are kept
    /// until they end or time out. Returns whether the state changed.
    pub fn set_backend_up(&mut self, listener: usize, addr: SocketAddr, up: bool) -> bool {
        let changed = self.listeners.set_up(listener, addr, up);
        if changed {
            self.counters[listener].health_changes += 1;
        }
        changed
    }

    /// Adds a backend to listener `listener`; it gets new flows at once.
    pub fn add_backend(&mut self, listener: usize, backend: config::Backend) -> Result<(), BackendError> {
        self.listeners.add_backend(listener, backend, &self.config.snat)?;
        let count = self.listeners.get(listener).map_or(0, |l| l.config.backends.len());
        self.pickers[listener].resize(count, None);
        Ok(())
    }

    /// Removes a backend: it gets no new flow; its existing flows go on until
    /// they end or time out. The last backend cannot be removed.
    pub fn remove_backend(&mut self, listener: usize, addr: SocketAddr) -> Result<(), BackendError> {
        let removed = self.listeners.remove_backend(listener, addr)?;
        let count = self.listeners.get(listener).map_or(0, |l| l.config.backends.len());
        self.pickers[listener].resize(count, Some(removed));
        Ok(())
    }

    /// Drains a backend (or undrains it): no new flows while draining, existing ones go on.
    pub fn drain_backend(
        &mut self,
        listener: usize,
        addr: SocketAddr,
        drain: bool,
    ) -> Result<(), BackendError> {
        self.listeners.drain(listener, addr, drain)
    }

    /// Removes the flows that have been idle too long; call it every second or so.
    pub fn poll_expired(&mut self, now: Duration) -> usize {
        let expired = self.flows.expire(now, &self.config.timeouts);
        for listener in &expired {
            self.counters[*listener].expired += 1;
        }
        expired.len()
    }

    /// The UOA carrier that goes to the backend just before the datagram the
    /// last [`Engine::handle_packet`] returned (`Verdict::ToBackend`), when
    /// that datagram had no room for its flow's UOA: an empty datagram of the
    /// flow that carries it (an IP packet, as [`toa_core::uoa::uoa_carrier`]
    /// writes it). Send it first, so that the backend learns the client
    /// before the data; `None` otherwise.
    pub fn take_carrier(&mut self) -> Option<Vec<u8>> {
        self.carrier.take()
    }

    /// Handles one IP packet in `buf[..len]` (the buffer needs 40 spare bytes
    /// for a TOA) at time `now` (any monotonic clock, as a duration since its
    /// start), rewriting it in place. Then ask [`Engine::take_carrier`] for a
    /// UOA carrier to send ahead of it.
    pub fn handle_packet(&mut self, now: Duration, buf: &mut [u8], len: usize) -> Verdict {
        self.carrier = None;
        let packet = &buf[..len.min(buf.len())];
        let segment = match TcpPacket::new_checked(packet) {
            Ok(packet) => Segment {
                proto: Protocol::Tcp,
                src: packet.src(),
                dst: packet.dst(),
                flags: packet.tcp().flags(),
                seq: packet.tcp().seq_number(),
                // The edits below change headers only: the payload keeps this length.
                payload: packet.tcp().payload().len(),
            },
            Err(toa_core::Error::NotTcp { protocol: 17, .. }) => match UdpPacket::new_checked(packet) {
                Ok(packet) => Segment {
                    proto: Protocol::Udp,
                    src: packet.src(),
                    dst: packet.dst(),
                    flags: TcpFlags::default(),
                    seq: 0,
                    payload: packet.payload().len(),
                },
                Err(_) => {
                    self.unparsed += 1;
                    return Verdict::Drop(DropReason::Malformed);
                }
            },
            // A client's own opp header (protocol 248): plain UDP again, then served.
            Err(toa_core::Error::NotTcp { protocol: toa_core::uoa::IPPROTO_OPT, .. }) => {
                return self.handle_client_opp(now, buf, len);
            }
            // Other protocols and fragments are someone else's business.
            Err(toa_core::Error::NotTcp { .. } | toa_core::Error::Fragment { .. }) => {
                return Verdict::NotMine;
            }
            Err(_) => {
                self.unparsed += 1;
                return Verdict::Drop(DropReason::Malformed);
            }
        };
        let listener = self.listeners.for_packet(segment.proto, segment.dst);
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

    /// A datagram with an opp header: to a UDP listener, the header goes
    /// (a client may not speak for itself) and it is served as plain UDP.
    fn handle_client_opp(&mut self, now: Duration, buf: &mut [u8], len: usize) -> Verdict {
        let mut plain = buf[..len].to_vec();
        let Ok((stripped_len, _)) = toa_core::uoa::strip_uoa(&mut plain, len) else {
            self.unparsed += 1;
            return Verdict::Drop(DropReason::Malformed);
        };
        let Ok(packet) = UdpPacket::new_checked(&plain[..stripped_len]) else {
            self.unparsed += 1;
            return Verdict::Drop(DropReason::Malformed);
        };
        let segment = Segment {
            proto: Protocol::Udp,
            src: packet.src(),
            dst: packet.dst(),
            flags: TcpFlags::default(),
            seq: 0,
            payload: packet.payload().len(),
        };
        let Some(listener) = self.listeners.for_packet(Protocol::Udp, segment.dst) else {
            return Verdict::NotMine;
        };
        buf[..stripped_len].copy_from_slice(&plain[..stripped_len]);
        self.counters[listener].uoa_stripped += 1;
        self.handle_udp_client(now, buf, stripped_len, listener, segment)
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
        // A client may not speak for itself: its own UOA (an IPv4 option) goes.
        let len = match toa_core::uoa::strip_uoa(buf, len) {
            Ok((len, found)) => {
                self.counters[listener].uoa_stripped += u64::from(found.is_some());
                len
            }
            Err(_) => return drop(&mut self.counters[listener], DropReason::Malformed),
        };
        let id = match self.flows.by_client(Protocol::Udp, client, vip) {
            Some(id) => id,
            None => match self.new_flow(now, listener, Protocol::Udp, client, vip, 0) {
                Ok(id) => id,
                Err(reason) => return drop(&mut self.counters[listener], reason),
            },
        };
        let Some(flow) = self.flows.get_mut(id) else {
            return drop(&mut self.counters[listener], DropReason::NoFlow);
        };
        flow.last_seen = now;
        let (snat, backend, stats, mode) = (flow.snat, flow.backend, flow.stats, flow.mode);
        if rewrite_endpoints(buf, len, snat, backend).is_err() {
            return drop(&mut self.counters[listener], DropReason::Malformed);
        }
        let mut len = len;
        if let (ObtainClientIp::Uoa { format, .. }, true) = (mode, flow.uoa_left > 0) {
            // IPv6 packets have no header options: opp there.
            let format = if backend.is_ipv6() { toa_core::uoa::UoaFormat::Opp } else { format };
            let mtu = self.config.mtu.min(buf.len());
            match toa_core::uoa::insert_uoa(&mut buf[..mtu], len, client, format) {
                Ok(new_len) => {
                    len = new_len;
                    flow.uoa_left -= 1;
                    self.counters[listener].uoa_injected += 1;
                }
                // Past the MTU, or no room among the IPv4 options: an empty
                // datagram of the flow carries the UOA ahead of this one (DPVS's way).
                Err(_) => {
                    let counters = &mut self.counters[listener];
                    counters.uoa_no_room += 1;
                    let mut carrier = vec![0u8; 128];
                    if let Ok(n) = toa_core::uoa::uoa_carrier(&buf[..len], client, format, &mut carrier) {
                        carrier.truncate(n);
                        self.carrier = Some(carrier);
                        flow.uoa_left -= 1;
                        counters.uoa_carriers += 1;
                    }
                }
            }
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
            return drop(&mut self.counters[listener], DropReason::Malformed);
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
        let Segment { src: client, dst: vip, flags, seq, payload, .. } = segment;
        // A client may not speak for itself: strip forged TOAs in every mode.
        let len = match strip(buf, len, &Formats::ALL) {
            Ok(stripped) => {
                self.counters[listener].stripped += stripped.removed as u64;
                stripped.len
            }
            Err(_) => return drop(&mut self.counters[listener], DropReason::Malformed),
        };
        let syn = flags.contains(TcpFlags::SYN) && !flags.contains(TcpFlags::ACK);
        // A SYN with the flow's ISN during the handshake is a retransmission: the
        // client has not seen the SYN-ACK yet, or it crossed this SYN. Any other
        // SYN is a new connection reusing the client port (the old one is
        // closing, or was abandoned): it gets a flow, and the mode, of its own.
        if let Some(old) = self.flows.by_client(Protocol::Tcp, client, vip) {
            let retransmission =
                |f: &Flow| f.client_isn == seq && matches!(f.state, State::SynSent | State::SynReceived);
            if syn && !self.flows.get(old).is_some_and(retransmission) {
                self.flows.remove(old);
            }
        }
        let id = match self.flows.by_client(Protocol::Tcp, client, vip) {
            Some(id) => id,
            None if syn => match self.new_flow(now, listener, Protocol::Tcp, client, vip, seq) {
                Ok(id) => id,
                Err(reason) => return drop(&mut self.counters[listener], reason),
            },
            None => return drop(&mut self.counters[listener], DropReason::NoFlow),
        };
        let Some(flow) = self.flows.get_mut(id) else {
            return drop(&mut self.counters[listener], DropReason::NoFlow);
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
            return drop(&mut self.counters[listener], DropReason::Malformed);
        }
        let counters = &mut self.counters[listener];
        let mut len = len;
        if let Some(toa) = toa {
            // Past the MTU the segment would not reach the backend: it goes without.
            let mtu = self.config.mtu.min(buf.len());
            match insert(&mut buf[..mtu], len, &toa, &KINDS) {
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
        client_isn: u32,
    ) -> Result<usize, DropReason> {
        if !self.config.shard.owns(client.port()) {
            return Err(DropReason::WrongEngine);
        }
        if self.flows.len() >= self.config.engine_bound() {
            match self.flows.evict_half_open() {
                Some(owner) => self.counters[owner].evicted += 1,
                None => return Err(DropReason::TableFull),
            }
        }
        let Some(state) = self.listeners.get(listener) else { return Err(DropReason::NoFlow) };
        let config = &state.config;
        let Some(pick) = self.pickers[listener].pick(&config.backends, |i| state.eligible(i), client) else {
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
            clamp_mss: config.mss_clamp.applies(config.placement),
            client_isn,
            state: State::SynSent,
            created: now,
            last_seen: now,
            backend_sent_data: false,
            uoa_left: match config.obtain_client_ip {
                ObtainClientIp::Uoa { datagrams, .. } => datagrams,
                _ => 0,
            },
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
        let (vip, client, mode, stats, clamp) =
            (flow.vip, flow.client, flow.mode, flow.stats, flow.clamp_mss);
        if flags.contains(TcpFlags::RST) {
            self.flows.remove(id);
        }
        let counters = &mut self.counters[listener];
        if let (ObtainClientIp::Toa(format), true) = (mode, clamp) {
            // The client must leave room for the option the LB will add to its segments.
            let room = toa_for(format, client).wire_len().next_multiple_of(4) as u16;
            match clamp_mss(buf, len, room) {
                Ok(Some(_)) => counters.mss_clamped += 1,
                Ok(None) => {}
                Err(_) => return drop(counters, DropReason::Malformed),
            }
        }
        if rewrite_endpoints(buf, len, vip, client).is_err() {
            return drop(counters, DropReason::Malformed);
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
    /// TCP: the sequence number (a SYN's is the client's ISN); UDP: 0.
    seq: u32,
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
