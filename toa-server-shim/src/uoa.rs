//! `UoaSocket`: a UDP socket whose `recv_from` names the client a UOA load
//! balancer (DPVS, `toa-lb` with `obtain_client_ip = "uoa"`) wrote into the
//! first datagrams of a flow, and whose `send_to(client)` goes back to that
//! load balancer, so replies still pass through it.
//!
//! - Without the kernel helper it reads the `ipo` format (an IPv4 option,
//!   through `IP_RECVOPTS`): an IPv4 socket, any kernel, no privilege. The
//!   `opp` format never reaches a socket without the helper (the IP stack
//!   drops protocol 248).
//! - With the helper attached with UDP (`toa-shim ebpf attach`, when the
//!   socket is made), both formats, IPv4 and IPv6: the socket reads the
//!   helper's flow map (root, or read access to the pins). In the helper's
//!   cgroup the kernel already shows the client; the map then names the LB.
//!
//! Only datagrams from trusted load balancers are believed. A flow's later
//! datagrams carry no UOA: the socket remembers which LB address and port
//! speaks for which client (at most [`MAX_FLOWS`], each for [`FLOW_TTL`]
//! after its last datagram).
//!
//! ```no_run
//! use toa_server_shim::uoa::UoaSocket;
//! use toa_server_shim::TrustPolicy;
//!
//! let socket = UoaSocket::bind("0.0.0.0:5353", TrustPolicy::new("huawei-elb".parse()?)?)?;
//! let mut buf = [0u8; 1500];
//! loop {
//!     let (n, peer) = socket.recv_from(&mut buf)?;
//!     println!("{} via {}", peer.client, peer.lb);
//!     socket.send_to(&buf[..n], peer.client)?; // through the LB
//! }
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::peer::Source;
use crate::sys;
use crate::trust::TrustPolicy;

/// Flows remembered at most.
pub const MAX_FLOWS: usize = 65536;
/// How long a flow is remembered after its last datagram.
pub const FLOW_TTL: Duration = Duration::from_secs(300);

/// Who sent a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UdpPeer {
    /// The client: from a trusted UOA (or remembered for its flow), else the real source.
    pub client: SocketAddr,
    /// The real source: the load balancer (or a client that came directly).
    pub lb: SocketAddr,
    /// `Uoa` when a UOA (now or earlier in the flow) named the client, else `None`.
    pub source: Source,
}

/// What a [`UoaSocket`] saw so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UoaStats {
    /// Datagrams received.
    pub received: u64,
    /// Datagrams that carried a trusted UOA.
    pub uoa: u64,
    /// Datagrams named by a UOA seen earlier in their flow.
    pub remembered: u64,
    /// UOAs from untrusted sources, ignored.
    pub untrusted: u64,
    /// Option areas that did not parse (the source is used).
    pub malformed: u64,
    /// Empty datagrams that only carried a trusted UOA (an LB sends one
    /// ahead of a datagram with no room for it): recorded, not returned.
    pub carriers: u64,
    /// Datagrams named by the kernel helper's flow map.
    pub helper: u64,
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    uoa: AtomicU64,
    remembered: AtomicU64,
    untrusted: AtomicU64,
    malformed: AtomicU64,
    carriers: AtomicU64,
    helper: AtomicU64,
}

#[derive(Debug, Default)]
struct Flows {
    /// LB address and port -> (client, last seen).
    by_lb: HashMap<SocketAddr, (SocketAddr, Instant)>,
    /// client -> LB address and port.
    by_client: HashMap<SocketAddr, SocketAddr>,
}

/// What the std and tokio sockets share: the trust policy, the flows, the
/// counters, and the helper's maps when it is attached.
#[derive(Debug)]
struct Resolver {
    policy: TrustPolicy,
    flows: Mutex<Flows>,
    counters: Counters,
    helper: Option<crate::helper::UdpFlows>,
    local: SocketAddr,
}

impl Resolver {
    fn new(policy: TrustPolicy, local: SocketAddr) -> Self {
        let helper = crate::helper::UdpFlows::open();
        Resolver { policy, flows: Mutex::default(), counters: Counters::default(), helper, local }
    }

    /// What the helper's map says of a datagram from `source`: in its cgroup
    /// the source is the client already (the map names its LB), outside it
    /// the source is the LB (the map names the client, remembered here for
    /// `send_to`).
    fn helper_peer(&self, source: SocketAddr) -> Option<UdpPeer> {
        let helper = self.helper.as_ref()?;
        let (port, v6) = (self.local.port(), self.local.is_ipv6());
        let (peer, outside) = match helper.lb(source, port, v6) {
            Some(lb) => (UdpPeer { client: source, lb, source: Source::Uoa }, false),
            None => {
                (UdpPeer { client: helper.client(source, port, v6)?, lb: source, source: Source::Uoa }, true)
            }
        };
        // The helper trusts its own list; this socket's policy has the last word.
        if !self.policy.trusts(peer.lb.ip()) {
            bump(&self.counters.untrusted);
            return None;
        }
        if outside {
            let mut flows = self.flows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            remember(&mut flows, peer.lb, peer.client, Instant::now());
        }
        bump(&self.counters.received);
        bump(&self.counters.helper);
        Some(peer)
    }

    /// Who sent a datagram of `len` bytes from `lb` whose IPv4 options were
    /// `opts`; `None` for an empty carrier of a trusted UOA (recorded, and
    /// not for the application).
    fn datagram(&self, len: usize, lb: SocketAddr, opts: &[u8]) -> Option<UdpPeer> {
        if let Some(peer) = self.helper_peer(lb) {
            return Some(peer);
        }
        let peer = self.peer(lb, opts);
        if len == 0
            && peer.source == Source::Uoa
            && matches!(toa_core::uoa::find_uoa_in_options(opts), Ok(Some(_)))
        {
            bump(&self.counters.carriers);
            return None;
        }
        Some(peer)
    }

    /// Who sent a datagram from `lb` whose IPv4 options were `opts`.
    fn peer(&self, lb: SocketAddr, opts: &[u8]) -> UdpPeer {
        bump(&self.counters.received);
        let direct = UdpPeer { client: lb, lb, source: Source::None };
        let found = match toa_core::uoa::find_uoa_in_options(opts) {
            Ok(found) => found,
            Err(_) => {
                bump(&self.counters.malformed);
                None
            }
        };
        let mut flows = self.flows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        match found {
            Some(_) if !self.policy.trusts(lb.ip()) => {
                bump(&self.counters.untrusted);
                direct
            }
            Some(client) => {
                bump(&self.counters.uoa);
                remember(&mut flows, lb, client, now);
                UdpPeer { client, lb, source: Source::Uoa }
            }
            None => match flows.by_lb.get_mut(&lb) {
                Some((client, seen)) if now.duration_since(*seen) < FLOW_TTL => {
                    *seen = now;
                    bump(&self.counters.remembered);
                    UdpPeer { client: *client, lb, source: Source::Uoa }
                }
                _ => direct,
            },
        }
    }

    /// Where a datagram to `to` goes: the LB that speaks for it, if any.
    fn via(&self, to: SocketAddr) -> SocketAddr {
        let flows = self.flows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        flows.by_client.get(&to).copied().unwrap_or(to)
    }

    fn stats(&self) -> UoaStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counters;
        UoaStats {
            received: get(&c.received),
            uoa: get(&c.uoa),
            remembered: get(&c.remembered),
            untrusted: get(&c.untrusted),
            malformed: get(&c.malformed),
            carriers: get(&c.carriers),
            helper: get(&c.helper),
        }
    }
}

/// A UDP socket that sees through UOA load balancers; see the module docs.
#[derive(Debug)]
pub struct UoaSocket {
    inner: UdpSocket,
    resolver: Resolver,
}

impl UoaSocket {
    /// Binds `addr` (IPv4: the `ipo` format is an IPv4 option).
    pub fn bind(addr: impl ToSocketAddrs, policy: TrustPolicy) -> io::Result<Self> {
        Self::from_std(UdpSocket::bind(addr)?, policy)
    }

    /// Wraps a bound UDP socket.
    pub fn from_std(socket: UdpSocket, policy: TrustPolicy) -> io::Result<Self> {
        let local = socket.local_addr()?;
        if local.is_ipv4() {
            sys::udp::set_recv_opts(socket.as_fd())?;
        }
        Ok(UoaSocket { inner: socket, resolver: Resolver::new(policy, local) })
    }

    /// Receives a datagram and tells who sent it. Empty datagrams that only
    /// carried a trusted UOA are recorded and skipped.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, UdpPeer)> {
        loop {
            let (n, lb, opts, opts_len) = sys::udp::recv_with_opts(self.inner.as_fd(), buf)?;
            if let Some(peer) = self.resolver.datagram(n, lb, &opts[..opts_len]) {
                return Ok((n, peer));
            }
        }
    }

    /// Sends `buf` to `to`: when `to` is a client a UOA named, to the load
    /// balancer that speaks for it (so the reply passes through it).
    pub fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.inner.send_to(buf, self.resolver.via(to))
    }

    /// The counters so far.
    pub fn stats(&self) -> UoaStats {
        self.resolver.stats()
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// The wrapped socket.
    pub fn get_ref(&self) -> &UdpSocket {
        &self.inner
    }
}

/// The tokio `UoaSocket` (feature `tokio`): the same, `async`.
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub struct TokioUoaSocket {
    inner: tokio::net::UdpSocket,
    resolver: Resolver,
}

#[cfg(feature = "tokio")]
impl TokioUoaSocket {
    /// Binds `addr`.
    pub async fn bind(addr: impl tokio::net::ToSocketAddrs, policy: TrustPolicy) -> io::Result<Self> {
        Self::from_tokio(tokio::net::UdpSocket::bind(addr).await?, policy)
    }

    /// Wraps a bound tokio UDP socket.
    pub fn from_tokio(socket: tokio::net::UdpSocket, policy: TrustPolicy) -> io::Result<Self> {
        let local = socket.local_addr()?;
        if local.is_ipv4() {
            sys::udp::set_recv_opts(socket.as_fd())?;
        }
        Ok(TokioUoaSocket { inner: socket, resolver: Resolver::new(policy, local) })
    }

    /// Receives a datagram and tells who sent it (empty carriers skipped, as
    /// [`UoaSocket::recv_from`]).
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, UdpPeer)> {
        loop {
            let (n, lb, opts, opts_len) = self
                .inner
                .async_io(tokio::io::Interest::READABLE, || sys::udp::recv_with_opts(self.inner.as_fd(), buf))
                .await?;
            if let Some(peer) = self.resolver.datagram(n, lb, &opts[..opts_len]) {
                return Ok((n, peer));
            }
        }
    }

    /// Sends `buf` to `to`, through the load balancer that speaks for it.
    pub async fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.inner.send_to(buf, self.resolver.via(to)).await
    }

    /// The counters so far.
    pub fn stats(&self) -> UoaStats {
        self.resolver.stats()
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Remembers that `lb` speaks for `client` (within [`MAX_FLOWS`]).
fn remember(flows: &mut Flows, lb: SocketAddr, client: SocketAddr, now: Instant) {
    if flows.by_lb.len() >= MAX_FLOWS && !flows.by_lb.contains_key(&lb) {
        expire(flows, now);
    }
    if flows.by_lb.len() < MAX_FLOWS || flows.by_lb.contains_key(&lb) {
        flows.by_lb.insert(lb, (client, now));
        flows.by_client.insert(client, lb);
    }
}

/// Forgets flows idle for longer than [`FLOW_TTL`].
fn expire(flows: &mut Flows, now: Instant) {
    let Flows { by_lb, by_client } = flows;
    by_lb.retain(|_, (client, seen)| {
        let live = now.duration_since(*seen) < FLOW_TTL;
        if !live {
            by_client.remove(client);
        }
        live
    });
}
