//! `ToaListener`: `accept()` that returns the original client.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use toa_core::Formats;

use crate::helper::PeerStore;
use crate::peer::{PeerInfo, Resolver, SAVED_SYN_MAX, StatsSnapshot};
use crate::proxy::{self, ProxyError, ProxyHeader, ProxyProtocol, Step};
use crate::sys;
use crate::tap::Tap;
use crate::trust::TrustPolicy;

/// How a listener learns the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The kernel helper's record when it is attached (and readable: root)
    /// and the socket is in its cgroup; else the saved SYN, and capture mode
    /// when CAP_NET_RAW is held.
    #[default]
    Auto,
    /// Read the TOA from the connection's SYN (`TCP_SAVED_SYN`). Unprivileged,
    /// any kernel since 4.2; sees a TOA only when the LB puts it in the SYN.
    SavedSyn,
    /// Only the kernel helper's record (`toa-shim ebpf attach`); binding fails
    /// when the helper is not attached or not readable.
    Ebpf,
    /// The saved SYN, and a packet socket that sees the TOA in the handshake's
    /// ACK or first data ([`crate::tap`]): CAP_NET_RAW, no root, no BPF
    /// program. Binding fails without CAP_NET_RAW. `Auto` uses it when the
    /// helper is not there and the capability is held.
    Capture,
    /// Do not look for a TOA: `client` is always the real peer.
    None,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Mode::Auto),
            "saved-syn" => Ok(Mode::SavedSyn),
            "ebpf" => Ok(Mode::Ebpf),
            "capture" => Ok(Mode::Capture),
            "none" => Ok(Mode::None),
            other => {
                Err(format!("unknown source {other:?}: expected auto, saved-syn, ebpf, capture or none"))
            }
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::SavedSyn => "saved-syn",
            Mode::Ebpf => "ebpf",
            Mode::Capture => "capture",
            Mode::None => "none",
        })
    }
}

/// Settings of a [`ToaListener`].
///
/// ```
/// use toa_core::{Format, Formats};
/// use toa_server_shim::{Config, Mode, TrustPolicy};
///
/// let config = Config::new(TrustPolicy::new("huawei-elb".parse().unwrap()).unwrap())
///     .formats(Formats::default().with(Format::AliV6))
///     .mode(Mode::SavedSyn);
/// ```
#[derive(Clone, Debug)]
pub struct Config {
    policy: TrustPolicy,
    formats: Formats,
    mode: Mode,
    proxy: ProxyProtocol,
    proxy_timeout: Duration,
}

impl Config {
    /// The default formats (`toa`, `toa6`) and mode (auto), trusting
    /// `policy`; no PROXY protocol.
    pub fn new(policy: TrustPolicy) -> Self {
        Self {
            policy,
            formats: Formats::default(),
            mode: Mode::Auto,
            proxy: ProxyProtocol::Off,
            proxy_timeout: proxy::DEFAULT_TIMEOUT,
        }
    }

    /// Whether connections start with a PROXY protocol header (v1 or v2),
    /// honoured only from peers the trust policy trusts. With both a PROXY
    /// header and a TOA, the header's client wins (the TOA stays in
    /// [`PeerInfo::toa`]).
    #[must_use]
    pub fn proxy_protocol(mut self, setting: ProxyProtocol) -> Self {
        self.proxy = setting;
        self
    }

    /// The trust policy.
    pub fn policy(&self) -> &TrustPolicy {
        &self.policy
    }

    /// How long a connection may take to send its PROXY header (default 3 s);
    /// then it is closed and counted.
    #[must_use]
    pub fn proxy_timeout(mut self, timeout: Duration) -> Self {
        self.proxy_timeout = timeout;
        self
    }

    /// The TOA formats to accept.
    #[must_use]
    pub fn formats(mut self, formats: Formats) -> Self {
        self.formats = formats;
        self
    }

    /// How to learn the client.
    #[must_use]
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
}

/// What std and tokio listeners share: the resolver and the mode.
#[derive(Debug)]
pub(crate) struct Shared {
    resolver: Resolver,
    mode: Mode,
    pub(crate) proxy: ProxyProtocol,
    pub(crate) proxy_timeout: Duration,
    local_v6: bool,
    /// The kernel helper's socket storage, when it is attached and readable.
    store: Option<PeerStore>,
    /// Capture mode's packet socket.
    tap: Option<std::sync::Mutex<Tap>>,
}

impl Shared {
    /// Prepares the listening socket `fd` (local address `local`) for `config`.
    pub(crate) fn new(fd: BorrowedFd<'_>, local: SocketAddr, config: Config) -> io::Result<Arc<Shared>> {
        if matches!(config.mode, Mode::Auto | Mode::SavedSyn | Mode::Capture) {
            sys::set_save_syn(fd)?;
        }
        let store = match config.mode {
            Mode::Auto => PeerStore::open(),
            Mode::Ebpf => Some(PeerStore::open().ok_or_else(|| {
                io::Error::other(
                    "source ebpf: the kernel helper is not attached or not readable (run `toa-shim ebpf attach` as root)",
                )
            })?),
            Mode::SavedSyn | Mode::Capture | Mode::None => None,
        };
        let tap = match config.mode {
            Mode::Capture => Some(Tap::open(local.port(), &config.policy, &config.formats).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("source capture: opening a packet socket (needs CAP_NET_RAW): {e}"),
                )
            })?),
            // Without the helper, and only when the capability is there.
            Mode::Auto if store.is_none() => Tap::open(local.port(), &config.policy, &config.formats).ok(),
            _ => None,
        };
        let resolver = Resolver { policy: config.policy, formats: config.formats, stats: Default::default() };
        Ok(Arc::new(Shared {
            resolver,
            mode: config.mode,
            proxy: config.proxy,
            proxy_timeout: config.proxy_timeout,
            local_v6: local.is_ipv6(),
            store,
            tap: tap.map(std::sync::Mutex::new),
        }))
    }

    /// The peer of the accepted socket `fd`, whose real peer is `peer`
    /// (`local`: its local address, asked for only in capture mode).
    pub(crate) fn peer_info(
        &self,
        fd: BorrowedFd<'_>,
        peer: SocketAddr,
        local: impl FnOnce() -> Option<SocketAddr>,
    ) -> PeerInfo {
        // The helper has the last word on sockets in its cgroup: their accept()
        // and getpeername() already answer with its client, so only its record
        // knows the LB.
        if let Some(stored) = self.store.as_ref().and_then(|store| store.get(&fd, self.local_v6)) {
            return self.resolver.resolve_helper(stored);
        }
        let mut syn = [0u8; SAVED_SYN_MAX];
        let len = match self.mode {
            Mode::None | Mode::Ebpf => 0,
            // A failure to read it is the same as no saved SYN: the peer is used, and counted.
            Mode::Auto | Mode::SavedSyn | Mode::Capture => sys::saved_syn(fd, &mut syn).unwrap_or(0),
        };
        let info = self.resolver.resolve(&syn[..len], peer, self.local_v6);
        let Some(tap) = &self.tap else { return info };
        // Taken also when the SYN had the TOA, so that the entry goes.
        let captured = local().and_then(|local| {
            tap.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take(peer, local)
        });
        match captured {
            Some(toa) if info.toa.is_none() => self.resolver.resolve_captured(toa, peer, self.local_v6),
            _ => info,
        }
    }

    pub(crate) fn stats(&self) -> StatsSnapshot {
        let mut stats = self.resolver.stats.snapshot();
        if let Some(tap) = &self.tap {
            let mut tap = tap.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            stats.capture_pending = tap.len() as u64;
            stats.capture_dropped = tap.dropped();
        }
        stats
    }

    /// Whether the policy trusts the connection's real peer to send a PROXY header.
    pub(crate) fn trusts(&self, info: &PeerInfo) -> bool {
        self.resolver.policy.trusts(info.lb.ip())
    }

    /// Applies (and counts) what reading the header gave.
    pub(crate) fn with_proxy(
        &self,
        info: PeerInfo,
        read: Result<Option<ProxyHeader>, ProxyError>,
    ) -> Result<PeerInfo, ProxyError> {
        self.resolver.resolve_proxy(info, read, self.local_v6)
    }
}

/// Reads the PROXY header at the start of `stream` (std, blocking, bounded
/// by the timeout): exactly the header is consumed.
fn read_proxy_header(
    stream: &TcpStream,
    shared: &Shared,
    info: &PeerInfo,
) -> Result<Option<ProxyHeader>, ProxyError> {
    let peer = info.lb;
    let trusted = shared.trusts(info);
    let deadline = Instant::now() + shared.proxy_timeout;
    let mut buf = vec![0u8; proxy::MAX_HEADER];
    let mut last = usize::MAX;
    let result = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(ProxyError::Timeout(peer, shared.proxy_timeout));
        }
        stream.set_read_timeout(Some(left)).map_err(|e| ProxyError::Io(peer, e))?;
        // Required and untrusted is refused before a byte is read.
        let seen = if shared.proxy == ProxyProtocol::Required && !trusted {
            0
        } else {
            match stream.peek(&mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
                Err(e) => break Err(ProxyError::Io(peer, e)),
            }
        };
        match proxy::step(shared.proxy, trusted, peer, &buf[..seen], seen == 0) {
            Step::Absent => break Ok(None),
            Step::Refuse(e) => break Err(e),
            Step::Consume(len) => {
                break io::Read::read_exact(&mut &*stream, &mut buf[..len])
                    .map_err(|e| ProxyError::Io(peer, e))
                    .and_then(|()| {
                        proxy::parse(&buf[..len]).map(Some).map_err(|why| ProxyError::Malformed(peer, why))
                    });
            }
            // The bytes so far are a header's beginning: wait for more. A
            // peek returns at once while data is queued, so pause while
            // nothing new came (headers come in one segment; this is rare).
            Step::Wait => {
                if seen == last {
                    std::thread::sleep(Duration::from_millis(2));
                }
                last = seen;
            }
        }
    };
    let _ = stream.set_read_timeout(None);
    result
}

/// A TCP listener whose `accept()` returns the original client behind a TOA
/// load balancer, from trusted load balancers only.
///
/// ```no_run
/// use toa_server_shim::{Config, ToaListener, TrustPolicy};
///
/// let policy = TrustPolicy::new("huawei-elb".parse()?)?;
/// let listener = ToaListener::bind("0.0.0.0:8080", Config::new(policy))?;
/// for conn in listener.incoming() {
///     let (stream, peer) = conn?;
///     println!("{peer}"); // client=203.0.113.7:40000 lb=100.125.0.1:40000 source=saved-syn
/// #   drop(stream);
/// }
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct ToaListener {
    inner: TcpListener,
    shared: Arc<Shared>,
}

impl ToaListener {
    /// Binds `addr` and prepares the socket for `config`.
    pub fn bind(addr: impl ToSocketAddrs, config: Config) -> io::Result<Self> {
        Self::from_std(TcpListener::bind(addr)?, config)
    }

    /// Wraps a listening socket. `TCP_SAVE_SYN` takes effect for SYNs that
    /// arrive from now on; connections already queued get `source=none`.
    pub fn from_std(listener: TcpListener, config: Config) -> io::Result<Self> {
        let shared = Shared::new(listener.as_fd(), listener.local_addr()?, config)?;
        Ok(Self { inner: listener, shared })
    }

    /// Accepts a connection and tells who is behind it.
    ///
    /// With [`Config::proxy_protocol`] on, this also reads the connection's
    /// header, and a connection that is refused (untrusted, missing or
    /// malformed header, timeout) is closed, counted, and skipped: the next
    /// one is accepted. A peer that sends its header slowly holds this call
    /// for up to [`Config::proxy_timeout`]; a server that must not wait
    /// uses [`ToaListener::accept_pending`] and reads the header on the
    /// connection's own thread.
    pub fn accept(&self) -> io::Result<(TcpStream, PeerInfo)> {
        loop {
            match self.accept_pending()?.finish() {
                Ok(accepted) => return Ok(accepted),
                Err(e) if e.get_ref().is_some_and(|inner| inner.is::<ProxyError>()) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Accepts a connection without reading its PROXY header yet: call
    /// [`Pending::finish`] where waiting is fine (a thread of its own), so a
    /// slow peer cannot stall the accept loop.
    ///
    /// ```no_run
    /// use toa_server_shim::{Config, ProxyProtocol, ToaListener, TrustPolicy};
    ///
    /// let policy = TrustPolicy::new("huawei-elb".parse()?)?;
    /// let config = Config::new(policy).proxy_protocol(ProxyProtocol::Required);
    /// let listener = ToaListener::bind("0.0.0.0:8080", config)?;
    /// loop {
    ///     let pending = listener.accept_pending()?;
    ///     std::thread::spawn(move || match pending.finish() {
    ///         Ok((stream, peer)) => println!("{peer}"),
    ///         Err(e) => eprintln!("{e}"), // refused: closed and counted
    ///     });
    /// }
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// ```
    pub fn accept_pending(&self) -> io::Result<Pending> {
        let (stream, peer) = self.inner.accept()?;
        let info = self.shared.peer_info(stream.as_fd(), peer, || stream.local_addr().ok());
        Ok(Pending { stream, info, shared: self.shared.clone() })
    }

    /// An endless iterator of [`ToaListener::accept`].
    pub fn incoming(&self) -> impl Iterator<Item = io::Result<(TcpStream, PeerInfo)>> + '_ {
        std::iter::repeat_with(|| self.accept())
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// The counters so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats()
    }

    /// The wrapped listener.
    pub fn get_ref(&self) -> &TcpListener {
        &self.inner
    }
}

/// An accepted connection whose PROXY header (if the listener expects one)
/// is not read yet; see [`ToaListener::accept_pending`].
#[derive(Debug)]
pub struct Pending {
    stream: TcpStream,
    info: PeerInfo,
    shared: Arc<Shared>,
}

impl Pending {
    /// The connection's real peer.
    pub fn peer_addr(&self) -> SocketAddr {
        self.info.lb
    }

    /// Reads the PROXY header (when the listener expects one; bounded in
    /// size and by [`Config::proxy_timeout`]) and tells who is behind the
    /// connection. A refused connection is closed and counted, and the error
    /// says why (its inner error is a [`ProxyError`]).
    pub fn finish(self) -> io::Result<(TcpStream, PeerInfo)> {
        if self.shared.proxy == ProxyProtocol::Off {
            return Ok((self.stream, self.info));
        }
        let read = read_proxy_header(&self.stream, &self.shared, &self.info);
        let info = self.shared.with_proxy(self.info, read)?;
        Ok((self.stream, info))
    }
}

/// Turns a `std::net::TcpListener` into a [`ToaListener`] in one line.
///
/// ```no_run
/// use std::net::TcpListener;
/// use toa_server_shim::{Config, TcpListenerExt, TrustPolicy};
///
/// let policy = TrustPolicy::new("100.125.0.0/16".parse()?)?;
/// let listener = TcpListener::bind("[::]:8080")?.with_toa(Config::new(policy))?;
/// let (_stream, peer) = listener.accept()?;
/// println!("{}", peer.client);
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// ```
pub trait TcpListenerExt: Sized {
    /// Wraps the listener; see [`ToaListener::from_std`].
    fn with_toa(self, config: Config) -> io::Result<ToaListener>;
}

impl TcpListenerExt for TcpListener {
    fn with_toa(self, config: Config) -> io::Result<ToaListener> {
        ToaListener::from_std(self, config)
    }
}
