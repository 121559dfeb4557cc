//! What a backend learns about a connection: [`PeerInfo`], and the counters
//! of how it was learned.

use std::fmt;
use std::net::{SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use toa_core::{Formats, TcpPacket, Toa};

use crate::helper::Stored;
use crate::proxy::{ProxyError, ProxyHeader};
use crate::trust::TrustPolicy;

/// Where [`PeerInfo::client`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// A trusted TOA in the connection's SYN, read with `TCP_SAVED_SYN`.
    SavedSyn,
    /// A trusted TOA found by the kernel helper (eBPF).
    Ebpf,
    /// A trusted TOA in the handshake's ACK or first data, seen by capture mode.
    Capture,
    /// A PROXY protocol v1 header from a trusted peer.
    ProxyV1,
    /// A PROXY protocol v2 header from a trusted peer.
    ProxyV2,
    /// An `X-Forwarded-For` header behind a trusted peer ([`crate::xff`]).
    Xff,
    /// A UOA from a trusted load balancer, for a UDP datagram ([`crate::uoa`]).
    Uoa,
    /// No trusted TOA or header: `client` is the real peer.
    None,
}

impl Source {
    /// The name used in output: `saved-syn`, `ebpf`, `capture`, `proxy-v1`, `proxy-v2`, `xff`, `uoa`, `none`.
    pub fn name(self) -> &'static str {
        match self {
            Source::SavedSyn => "saved-syn",
            Source::Ebpf => "ebpf",
            Source::Capture => "capture",
            Source::ProxyV1 => "proxy-v1",
            Source::ProxyV2 => "proxy-v2",
            Source::Xff => "xff",
            Source::Uoa => "uoa",
            Source::None => "none",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `addr` as a socket of that family shows it: an IPv4 address on an IPv6
/// (dual-stack) socket as `::ffff:a.b.c.d`; anything else unchanged.
pub(crate) fn as_seen_by(addr: SocketAddr, v6_socket: bool) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) if v6_socket => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        addr => addr,
    }
}

/// The peer of an accepted connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerInfo {
    /// The original client: the TOA's address when a trusted one was found,
    /// else the real peer. A v4 TOA on an IPv6 (dual-stack) listener is given
    /// as `::ffff:a.b.c.d`, as the socket would. An `ali-cdn` TOA carries no
    /// port: the port is then 0.
    pub client: SocketAddr,
    /// The real peer: the load balancer (or a client that reached the backend directly).
    pub lb: SocketAddr,
    /// How `client` was learned.
    pub source: Source,
    /// The TOA as decoded, when a trusted one was found. For an IPv6 TOA on
    /// an IPv4 listener (NAT64) this is the only faithful record of the client.
    pub toa: Option<Toa>,
    /// The PROXY protocol header, when a trusted peer sent one (also the
    /// LOCAL command of a health check, which leaves `client` the real peer):
    /// its addresses and v2 TLVs.
    pub proxy: Option<Arc<ProxyHeader>>,
}

impl PeerInfo {
    /// A peer without TOA: `client` and `lb` are both the real peer.
    pub fn direct(peer: SocketAddr) -> Self {
        PeerInfo { client: peer, lb: peer, source: Source::None, toa: None, proxy: None }
    }
}

impl fmt::Display for PeerInfo {
    /// `client=IP:PORT lb=IP:PORT source=NAME`, the `whoami` line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client={} lb={} source={}", self.client, self.lb, self.source)
    }
}

/// Counters of a listener, shared by its clones and safe to read at any time.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    accepted: AtomicU64,
    toa: AtomicU64,
    absent: AtomicU64,
    untrusted: AtomicU64,
    malformed: AtomicU64,
    v6_on_v4: AtomicU64,
    no_saved_syn: AtomicU64,
    capture: AtomicU64,
    proxy_v1: AtomicU64,
    proxy_v2: AtomicU64,
    proxy_local: AtomicU64,
    proxy_absent: AtomicU64,
    proxy_untrusted: AtomicU64,
    proxy_missing: AtomicU64,
    proxy_malformed: AtomicU64,
    proxy_timeout: AtomicU64,
}

/// A copy of a listener's counters ([`crate::ToaListener::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections whose client came from a trusted TOA.
    pub toa: u64,
    /// Connections whose SYN carried no TOA.
    pub absent: u64,
    /// TOAs ignored because the packet's source is not trusted.
    pub untrusted: u64,
    /// SYNs whose options could not be parsed (the peer is used).
    pub malformed: u64,
    /// IPv6 TOAs on an IPv4 listener (NAT64): honoured in [`PeerInfo`], but
    /// no `sockaddr_in` can hold them.
    pub v6_on_v4: u64,
    /// Connections without a saved SYN (SYN cookies, or the option set late).
    pub no_saved_syn: u64,
    /// Capture mode: TOAs found in the handshake's ACK or first data (the
    /// SYN had none; these connections are also in `absent`).
    pub capture: u64,
    /// Capture mode: connections whose TOA waits for their `accept()` now.
    pub capture_pending: u64,
    /// Capture mode: segments lost because the packet socket's queue was full,
    /// or because [`crate::tap::MAX_ENTRIES`] live entries filled the table.
    pub capture_dropped: u64,
    /// PROXY protocol v1 headers honoured.
    pub proxy_v1: u64,
    /// PROXY protocol v2 headers honoured.
    pub proxy_v2: u64,
    /// Of those, LOCAL commands (health checks) and `UNKNOWN` addresses: the real peer stands.
    pub proxy_local: u64,
    /// `Optional`: connections without a header.
    pub proxy_absent: u64,
    /// Refused: a header (or, `Required`, any connection) from an untrusted peer.
    pub proxy_untrusted: u64,
    /// Refused: `Required`, and no header.
    pub proxy_missing: u64,
    /// Refused: a malformed or oversized header.
    pub proxy_malformed: u64,
    /// Refused: the header did not arrive in time (or the peer went away first).
    pub proxy_timeout: u64,
}

impl Stats {
    /// The current values.
    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            accepted: get(&self.accepted),
            toa: get(&self.toa),
            absent: get(&self.absent),
            untrusted: get(&self.untrusted),
            malformed: get(&self.malformed),
            v6_on_v4: get(&self.v6_on_v4),
            no_saved_syn: get(&self.no_saved_syn),
            capture: get(&self.capture),
            capture_pending: 0,
            capture_dropped: 0,
            proxy_v1: get(&self.proxy_v1),
            proxy_v2: get(&self.proxy_v2),
            proxy_local: get(&self.proxy_local),
            proxy_absent: get(&self.proxy_absent),
            proxy_untrusted: get(&self.proxy_untrusted),
            proxy_missing: get(&self.proxy_missing),
            proxy_malformed: get(&self.proxy_malformed),
            proxy_timeout: get(&self.proxy_timeout),
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "accepted={} toa={} absent={} untrusted={} malformed={} v6_on_v4={} no_saved_syn={}",
            self.accepted,
            self.toa,
            self.absent,
            self.untrusted,
            self.malformed,
            self.v6_on_v4,
            self.no_saved_syn
        )?;
        if self.capture + self.capture_pending + self.capture_dropped > 0 {
            write!(
                f,
                " capture={} capture_pending={} capture_dropped={}",
                self.capture, self.capture_pending, self.capture_dropped
            )?;
        }
        let proxy = [
            self.proxy_v1,
            self.proxy_v2,
            self.proxy_local,
            self.proxy_absent,
            self.proxy_untrusted,
            self.proxy_missing,
            self.proxy_malformed,
            self.proxy_timeout,
        ];
        if proxy.iter().any(|&n| n > 0) {
            write!(
                f,
                " proxy_v1={} proxy_v2={} proxy_local={} proxy_absent={} proxy_untrusted={} proxy_missing={} proxy_malformed={} proxy_timeout={}",
                proxy[0], proxy[1], proxy[2], proxy[3], proxy[4], proxy[5], proxy[6], proxy[7]
            )?;
        }
        Ok(())
    }
}

/// The largest saved SYN read: IPv6 with extension headers and a full TCP header fits.
pub(crate) const SAVED_SYN_MAX: usize = 512;

/// How a listener turns the accepted peer and its saved SYN into a [`PeerInfo`].
#[derive(Debug)]
pub(crate) struct Resolver {
    pub(crate) policy: TrustPolicy,
    pub(crate) formats: Formats,
    pub(crate) stats: Stats,
}

impl Resolver {
    /// Applies what reading the PROXY header gave to `info` (the TOA's
    /// verdict): a header with addresses wins over a TOA (the documented
    /// order: it is in the stream, from the peer itself), LOCAL keeps the
    /// real peer; a refusal is counted and returned.
    pub(crate) fn resolve_proxy(
        &self,
        mut info: PeerInfo,
        read: Result<Option<ProxyHeader>, ProxyError>,
        local_v6: bool,
    ) -> Result<PeerInfo, ProxyError> {
        let header = match read {
            Ok(Some(header)) => header,
            Ok(None) => {
                Stats::bump(&self.stats.proxy_absent);
                return Ok(info);
            }
            Err(e) => {
                Stats::bump(match e {
                    ProxyError::Untrusted(_) => &self.stats.proxy_untrusted,
                    ProxyError::Missing(_) => &self.stats.proxy_missing,
                    ProxyError::Malformed(..) => &self.stats.proxy_malformed,
                    ProxyError::Timeout(..) | ProxyError::Io(..) => &self.stats.proxy_timeout,
                });
                return Err(e);
            }
        };
        Stats::bump(if header.version == 1 { &self.stats.proxy_v1 } else { &self.stats.proxy_v2 });
        match header.addresses {
            Some((client, _)) => {
                info.client = as_seen_by(client, local_v6);
                info.source = if header.version == 1 { Source::ProxyV1 } else { Source::ProxyV2 };
            }
            None => Stats::bump(&self.stats.proxy_local),
        }
        info.proxy = Some(Arc::new(header));
        Ok(info)
    }

    /// The helper's record of a socket.
    pub(crate) fn resolve_helper(&self, stored: Stored) -> PeerInfo {
        Stats::bump(&self.stats.accepted);
        match stored {
            Stored::Client { client, lb } => {
                Stats::bump(&self.stats.toa);
                PeerInfo { client, lb, source: Source::Ebpf, toa: None, proxy: None }
            }
            Stored::Nothing { lb } => {
                Stats::bump(&self.stats.absent);
                PeerInfo::direct(lb)
            }
        }
    }

    /// `syn` is the saved SYN (maybe empty), `peer` the accepted peer,
    /// `local_v6` whether the listening socket is IPv6.
    pub(crate) fn resolve(&self, syn: &[u8], peer: SocketAddr, local_v6: bool) -> PeerInfo {
        Stats::bump(&self.stats.accepted);
        let direct = PeerInfo::direct(peer);
        if syn.is_empty() {
            Stats::bump(&self.stats.no_saved_syn);
            return direct;
        }
        // The kernel saves headers only: a SYN that carried data (TCP Fast Open)
        // declares a longer IP length than was saved. Parse the headers as a
        // packet of exactly their size.
        let mut copy = [0u8; SAVED_SYN_MAX];
        let len = syn.len().min(SAVED_SYN_MAX);
        copy[..len].copy_from_slice(&syn[..len]);
        fit_ip_length(&mut copy[..len]);
        let found =
            TcpPacket::new_checked(&copy[..len]).and_then(|p| Ok((p.src_addr(), p.toa(&self.formats)?)));
        let (src, toa) = match found {
            Ok((_, None)) => {
                Stats::bump(&self.stats.absent);
                return direct;
            }
            Ok((src, Some(found))) => (src, found.toa),
            Err(_) => {
                Stats::bump(&self.stats.malformed);
                return direct;
            }
        };
        if !self.policy.trusts(src) {
            Stats::bump(&self.stats.untrusted);
            return direct;
        }
        Stats::bump(&self.stats.toa);
        self.with_toa(toa, peer, local_v6, Source::SavedSyn)
    }

    /// A trusted TOA that capture mode found in the handshake's ACK or the
    /// first data of the connection from `peer` (whose SYN had none).
    pub(crate) fn resolve_captured(&self, toa: Toa, peer: SocketAddr, local_v6: bool) -> PeerInfo {
        Stats::bump(&self.stats.capture);
        self.with_toa(toa, peer, local_v6, Source::Capture)
    }

    fn with_toa(&self, toa: Toa, peer: SocketAddr, local_v6: bool, source: Source) -> PeerInfo {
        let client = SocketAddr::new(toa.ip(), toa.port().unwrap_or(0));
        if client.is_ipv6() && !local_v6 {
            Stats::bump(&self.stats.v6_on_v4);
        }
        let client = as_seen_by(client, local_v6);
        PeerInfo { client, lb: peer, source, toa: Some(toa), proxy: None }
    }
}

/// Lowers the IP length field of the saved headers in `headers` to their own
/// size when it declares more (the data of a SYN is not saved).
pub(crate) fn fit_ip_length(headers: &mut [u8]) {
    let len = headers.len();
    let (field, base) = match headers.first().map(|b| b >> 4) {
        Some(4) if len >= 20 => (2..4, 0),
        Some(6) if len >= 40 => (4..6, 40),
        _ => return,
    };
    let declared = usize::from(u16::from_be_bytes([headers[field.start], headers[field.start + 1]]));
    if base + declared > len {
        // len is at most SAVED_SYN_MAX, so it fits the field.
        headers[field].copy_from_slice(&((len - base) as u16).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::TrustedSources;
    use toa_core::{Format, insert};

    fn resolver() -> Resolver {
        let policy = TrustPolicy::new("100.125.0.0/16".parse::<TrustedSources>().unwrap()).unwrap();
        Resolver { policy, formats: Formats::default(), stats: Stats::default() }
    }

    /// An IPv4 SYN from `src` with `toa` inserted.
    fn syn(src: [u8; 4], toa: Option<Toa>) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, src[0], src[1], src[2], src[3], 192, 0, 2, 10, 0x9c,
            0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
        ];
        if let Some(toa) = toa {
            p.resize(80, 0);
            let len = insert(&mut p, 40, &toa, &Formats::ALL).unwrap();
            p.truncate(len);
        }
        p
    }

    #[test]
    fn trusted_toa_wins_and_maps_to_the_listener_family() {
        let r = resolver();
        let toa = Toa::new(Format::Toa, "203.0.113.7:40000".parse().unwrap()).unwrap();
        let lb: SocketAddr = "100.125.0.1:40000".parse().unwrap();
        let info = r.resolve(&syn([100, 125, 0, 1], Some(toa)), lb, false);
        assert_eq!(info.to_string(), "client=203.0.113.7:40000 lb=100.125.0.1:40000 source=saved-syn");
        let mapped = r.resolve(&syn([100, 125, 0, 1], Some(toa)), lb, true);
        assert_eq!(mapped.client.to_string(), "[::ffff:203.0.113.7]:40000");
        assert_eq!(r.stats.snapshot().toa, 2);
    }

    #[test]
    fn untrusted_absent_malformed_and_missing() {
        let r = resolver();
        let toa = Toa::new(Format::Toa, "203.0.113.7:40000".parse().unwrap()).unwrap();
        let peer: SocketAddr = "198.51.100.9:5555".parse().unwrap();
        assert_eq!(r.resolve(&syn([198, 51, 100, 9], Some(toa)), peer, false), PeerInfo::direct(peer));
        assert_eq!(r.resolve(&syn([100, 125, 0, 1], None), peer, false), PeerInfo::direct(peer));
        let mut bad = syn([100, 125, 0, 1], Some(toa));
        bad[41] = 0; // toa length 0
        assert_eq!(r.resolve(&bad, peer, false), PeerInfo::direct(peer));
        assert_eq!(r.resolve(&[], peer, false), PeerInfo::direct(peer));
        let s = r.stats.snapshot();
        assert_eq!(
            (s.accepted, s.toa, s.untrusted, s.absent, s.malformed, s.no_saved_syn),
            (4, 0, 1, 1, 1, 1)
        );
    }

    #[test]
    fn v6_toa_on_a_v4_listener_is_kept_and_counted() {
        let r = resolver();
        let toa = Toa::new(Format::Toa6, "[2001:db8::7]:40000".parse().unwrap()).unwrap();
        let lb: SocketAddr = "100.125.0.1:40000".parse().unwrap();
        let info = r.resolve(&syn([100, 125, 0, 1], Some(toa)), lb, false);
        assert_eq!(info.client.to_string(), "[2001:db8::7]:40000");
        assert_eq!(info.toa, Some(toa));
        assert_eq!(r.stats.snapshot().v6_on_v4, 1);
    }

    #[test]
    fn saved_headers_of_a_syn_with_data() {
        // TCP Fast Open: the IP length counts 100 bytes of data that were not saved.
        let r = resolver();
        let toa = Toa::new(Format::Toa, "203.0.113.7:40000".parse().unwrap()).unwrap();
        let mut headers = syn([100, 125, 0, 1], Some(toa));
        let declared = headers.len() as u16 + 100;
        headers[2..4].copy_from_slice(&declared.to_be_bytes());
        let info = r.resolve(&headers, "100.125.0.1:1".parse().unwrap(), false);
        assert_eq!(info.source, Source::SavedSyn);
    }
}
