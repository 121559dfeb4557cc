//! The engine: one packet in, one verdict out.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use toa_core::{Format, Formats, TcpFlags, TcpPacket, Toa, clamp_mss, insert, rewrite_endpoints, strip};

use crate::config::{ConfigError, EngineConfig, ObtainClientIp};
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
    /// Not a valid IPv4/IPv6 TCP packet, or malformed TCP options.
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
            config.max_flows,
            config.snat_seed,
        );
        let up = config.listeners.iter().map(|l| vec![true; l.backends.len()]).collect();
        Ok(Engine { config, pickers, flows, counters, up, draining: Vec::new(), unparsed: 0 })
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
    /// started with; new flows use this one.
    pub fn set_obtain_client_ip(&mut self, index: usize, mode: ObtainClientIp) -> bool {
        match self.config.listeners.get_mut(index) {
            Some(listener) => {
                listener.obtain_client_ip = mode;
                true
            }
            None => false,
        }
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
        let packet = match TcpPacket::new_checked(&buf[..len.min(buf.len())]) {
            Ok(packet) => packet,
            // Other protocols and fragments are someone else's business.
            Err(toa_core::Error::NotTcp { .. } | toa_core::Error::Fragment { .. }) => {
                return Verdict::NotMine;
            }
            Err(_) => {
                self.unparsed += 1;
                return Verdict::Drop(DropReason::Malformed);
            }
        };
        let segment = Segment {
            src: packet.src(),
            dst: packet.dst(),
            flags: packet.tcp().flags(),
            // The edits below change headers only: the payload keeps this length.
            payload: packet.tcp().payload().len(),
        };
        if let Some(listener) = self.config.listeners.iter().position(|l| l.vip == segment.dst) {
            return self.handle_client(now, buf, len, listener, segment);
        }
        if let Some(id) = self.flows.by_backend(segment.src, segment.dst) {
            return self.handle_backend(now, buf, len, id, segment);
        }
        Verdict::NotMine
    }

    fn handle_client(
        &mut self,
        now: Duration,
        buf: &mut [u8],
        len: usize,
        listener: usize,
        segment: Segment,
    ) -> Verdict {
        let Segment { src: client, dst: vip, flags, payload } = segment;
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
        if let Some(old) = self.flows.by_client(client, vip) {
            if syn && self.flows.get(old).is_some_and(|f| f.state != State::SynSent) {
                self.flows.remove(old);
            }
        }
        let id = match self.flows.by_client(client, vip) {
            Some(id) => id,
            None if syn => match self.new_flow(now, listener, client, vip) {
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
        let (snat, backend) = (flow.snat, flow.backend);
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
        counters.to_backend += 1;
        Verdict::ToBackend { len, next_hop: backend.ip() }
    }

    fn new_flow(
        &mut self,
        now: Duration,
        listener: usize,
        client: SocketAddr,
        vip: SocketAddr,
    ) -> Result<usize, DropReason> {
        if self.flows.len() >= self.config.max_flows {
            match self.flows.evict_half_open() {
                Some(owner) => self.counters[owner].evicted += 1,
                None => return Err(DropReason::TableFull),
            }
        }
        let config = &self.config.listeners[listener];
        let eligible: Vec<bool> = config
            .backends
            .iter()
            .zip(&self.up[listener])
            .map(|(b, up)| *up && !self.draining.contains(&(listener, b.addr)))
            .collect();
        let Some(pick) = self.pickers[listener].pick(&config.backends, &eligible, client) else {
            return Err(DropReason::NoBackend);
        };
        let backend = config.backends[pick].addr;
        let flow = Flow {
            client,
            vip,
            backend,
            snat: backend, // replaced by the table's SNAT allocation
            listener,
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
        let (vip, client, mode) = (flow.vip, flow.client, flow.mode);
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
        counters.to_client += 1;
        Verdict::ToClient { len, next_hop: client.ip() }
    }
}

/// What the engine reads of a packet once, before editing it.
#[derive(Clone, Copy)]
struct Segment {
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
